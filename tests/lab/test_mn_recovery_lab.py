"""The mobile node's recovery scenarios in the live lab (mipsec/lab/recovery.py): each one must
recover by itself.  These tests assert that traffic flows again both ways and what must (not)
have happened on the way, never a timing (benchmarks/bench_recovery.py prints the figures).

Needs root and network namespaces: in CI (CI=true) a missing requirement FAILS, elsewhere skips.
"""

from __future__ import annotations

import pytest

import labs
from recovery_runs import run_recovered

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _run(name: str):
    return run_recovered(name, labs.prefix("mn"))


def _kinds(outcome):
    return [(node, kind) for _t, node, kind in outcome.detail["timeline"]]


def test_dhcp_order_roam_recovers_without_a_retransmission():
    """Address first, default route after (as DHCP clients do): the MN reports the move when
    the route exists, so its first Registration Request is the one that is answered."""
    outcome = _run("dhcp-order-roam")
    kinds = _kinds(outcome)
    assert ("mn", "rrp-received") in kinds, kinds
    assert ("mn", "rrq-retransmitted") not in kinds, kinds


def test_dhcp_order_moves_back_and_forth_each_with_one_request(new_lab):
    lab = new_lab("mq", place="a")
    for where in ("b", "a", "b"):
        move = lab.move(where, wait=True, dhcp_order=True)
        assert move["registered"] is not None, move
        events = [e for e in lab.timelines(since=move["time"]) if e["node"] == "mn"]
        kinds = [e["kind"] for e in events]
        assert kinds.count("rrq-sent") == 1 and "rrq-retransmitted" not in kinds, kinds
        assert "rrp-received" in kinds, kinds


def test_gw_restart_with_ikev2_recovers_by_a_liveness_check():
    """The GW restarts and has no SA: the MN's traffic gets no answer, its liveness check none
    either, and it re-establishes the tunnel at once (no 30 s dead-peer detection)."""
    outcome = _run("gw-restart-ikev2")
    kinds = _kinds(outcome)
    for step in ("liveness-check", "reestablish-requested", "ike-established", "rrp-received"):
        assert ("mn", step) in kinds, (step, kinds)


def test_gw_restart_with_manual_keys_recovers_by_registering_again():
    outcome = _run("gw-restart-manual")
    kinds = _kinds(outcome)
    assert ("mn", "liveness-check") in kinds, kinds
    assert ("mn", "rrp-received") in kinds, kinds


def test_mn_restart_registers_again():
    outcome = _run("mn-restart")
    assert outcome.detail["mn_registrations"] >= 1
    assert outcome.detail["rrp_after_start_ms"] is not None, outcome.detail["timeline"]


def test_return_home_and_leave_again():
    """Home (the IKE SA ends there, deliberately), then away again: a new IKE SA at once and
    traffic both ways."""
    outcome = _run("return-home-leave")
    kinds = _kinds(outcome)
    assert ("mn", "deregistered") in kinds, kinds
    assert ("mn", "ike-established") in kinds, kinds
    assert kinds.count(("mn", "rrp-received")) >= 2, kinds
