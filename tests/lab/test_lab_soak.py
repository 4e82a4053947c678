"""The lab left running, in short (mipsec/lab/soak*.py; benchmarks/bench_soak.py is the long run).

Real daemons in network namespaces, IKEv2 with short lifetimes, a steady UDP stream each way
between the CN and the MN's home address:

1. child SAs re-keyed every few seconds under traffic and no move: not one datagram lost, and
   afterwards only the current SPIs are known (one captured packet of every SPI replayed);
2. two minutes of moves between the visited networks with re-keys under traffic: no loss outside
   the handover windows, none at re-keys, no SPI left behind;
3. the same with two returns home, each longer than the child SA lifetime, so that a re-key
   falls due while the MN is at home: the tunnel comes back after each, with the same checks;
4. two MNs at once for two minutes: moves, a return home with a re-key due at home and re-keys
   under traffic, each MN's loss judged against its own handover windows, the same checks.

Losses and SPIs are asserted, never timings.  Needs root and network namespaces: in CI
(CI=true) a missing requirement FAILS, elsewhere skips.
"""

from __future__ import annotations

import os

import pytest

import needs
from mipsec.lab.lab import requirements_problem
from mipsec.lab.soak import SoakPlan, run_soak
from mipsec.lab.soak_analysis import analyse, format_report
from mipsec.lab.topology import existing_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _require() -> None:
    problem = requirements_problem()
    needs.need(problem, f"lab tests are required in CI: {problem}")


def _run(plan: SoakPlan) -> dict:
    _require()
    try:
        record = run_soak(plan, out=None)
    finally:
        assert existing_namespaces(plan.prefix) == []
    fig = analyse(record)
    print(format_report(fig, record["plan"]))
    return fig


def _no_spi_left_behind(fig: dict) -> None:
    assert fig["spis_replayed"] >= 2, fig
    assert not fig["spis_left_behind"], fig["spis_left_behind"]
    # the replay tells known from unknown: a current SPI of each receiver was still known
    assert fig["replay_control"] == {"gw": True, "mn": True}, fig


def test_rekeys_under_traffic_lose_nothing_in_the_lab():
    plan = SoakPlan(minutes=0.5, rate=500.0, child_lifetime_s=4.0, ike_lifetime_s=60.0,
                    delay_ms=5.0, schedule=[], sample_s=10.0,
                    prefix=f"kr{os.getpid() % 100000}-")
    fig = _run(plan)
    assert fig["child_rekeys"] >= 4, fig
    for name, d in fig["directions"].items():
        assert d["judged"] > 3000 and d["lost"] == 0, (name, d)
    assert fig["rekey_loss"] == 0
    _no_spi_left_behind(fig)
    assert fig["spis_replayed"] >= 2 * fig["child_rekeys"]


def test_two_minutes_of_moves_and_rekeys_under_traffic():
    schedule = [(12.0, "b"), (27.0, "a"), (41.0, "b"), (57.0, "a"), (73.0, "b"), (88.0, "a"),
                (102.0, "b")]
    plan = SoakPlan(minutes=2.0, rate=500.0, child_lifetime_s=9.0, ike_lifetime_s=40.0,
                    delay_ms=5.0, schedule=schedule, sample_s=15.0,
                    prefix=f"ks{os.getpid() % 100000}-")
    fig = _run(plan)
    assert fig["moves"] == len(schedule) and fig["failed_moves"] == 0, fig
    assert fig["child_rekeys"] >= 8 and fig["ike_rekeys"] >= 1, fig
    for name, d in fig["directions"].items():
        assert d["judged"] > 20000 and d["lost_outside_handover"] == 0, (name, d)
    assert fig["rekey_loss"] == 0, fig["per_rekey"]
    _no_spi_left_behind(fig)


def test_two_minutes_with_a_return_home_while_a_rekey_falls_due():
    # a stay at home longer than the child SA lifetime: a re-key falls due while at home; the
    # downlink must come back after leaving, and no SA may be left behind
    schedule = [(12.0, "b"), (27.0, "home"), (45.0, "a"), (62.0, "b"), (78.0, "home"),
                (96.0, "a"), (108.0, "b")]
    plan = SoakPlan(minutes=2.0, rate=500.0, child_lifetime_s=9.0, ike_lifetime_s=40.0,
                    delay_ms=5.0, schedule=schedule, sample_s=15.0,
                    prefix=f"kh{os.getpid() % 100000}-")
    fig = _run(plan)
    assert fig["moves"] == len(schedule) and fig["failed_moves"] == 0, fig
    assert fig["returns_home"] == 2 and fig["child_rekeys"] >= 4, fig
    for name, d in fig["directions"].items():
        assert d["judged"] > 20000 and d["lost_outside_handover"] == 0, (name, d)
    assert fig["rekey_loss"] == 0, fig["per_rekey"]
    _no_spi_left_behind(fig)


def test_two_mns_two_minutes_of_moves_a_return_home_and_rekeys():
    # Two MNs on one GW and HA, each with its own streams: moves between the visited networks,
    # a stay at home longer than the child SA lifetime (a re-key falls due at home) and re-keys
    # under traffic; MN 2 follows MN 1's plan 6 s later, so that one MN's handover happens
    # while the other's traffic and re-keys go on.  Each MN's loss is judged against its own
    # handover windows only (mipsec.lab.soak_analysis).
    schedule = [(12.0, "b"), (27.0, "home"), (45.0, "a"), (62.0, "b"), (80.0, "a"), (96.0, "b")]
    plan = SoakPlan(minutes=2.0, rate=250.0, child_lifetime_s=9.0, ike_lifetime_s=40.0,
                    delay_ms=5.0, schedule=schedule, sample_s=15.0, mobiles=2, stagger_s=6.0,
                    prefix=f"k2{os.getpid() % 100000}-")
    fig = _run(plan)
    assert set(fig["mobiles"]) == {"mn1", "mn2"}
    for name, m in fig["mobiles"].items():
        assert m["moves"] == len(schedule) and m["failed_moves"] == 0, (name, m)
        assert m["returns_home"] == 1 and m["child_rekeys"] >= 4, (name, m)
        for direction, d in m["directions"].items():
            assert d["judged"] > 10000, (name, direction, d)
            assert d["lost_outside_handover"] == 0, (name, direction, d, fig["loss_intervals"])
        assert m["rekey_loss"] == 0, (name, m["per_rekey"])
    assert fig["ike_rekeys"] >= 1, fig
    assert fig["spis_replayed"] >= 2 * fig["child_rekeys"], fig
    assert not fig["spis_left_behind"], fig["spis_left_behind"]
    assert fig["replay_control"] == {"gw": True, "mn1": True, "mn2": True}, \
        fig["replay_control_detail"]
