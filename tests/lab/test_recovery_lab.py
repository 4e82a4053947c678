"""Recovery scenarios in the live lab (mipsec/lab/recovery.py): each one must recover by itself.

The home-agent side of benchmarks/bench_recovery.py's scenarios (HA restart, lost SIU, the
SIU path down), and the 40 s outage, at a lower rate (the mobile node's scenarios are in
test_mn_recovery_lab.py); these tests assert that traffic flows again both ways and what must
(not) have happened on the way — never a timing.

Needs root and network namespaces: in CI (CI=true) a missing requirement FAILS, elsewhere skips.
"""

from __future__ import annotations

import pytest

import labs
from recovery_runs import run_checked, run_recovered

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _run(name: str):
    return run_recovered(name, labs.prefix("rc"))


def test_ha_killed_and_restarted_keeps_its_bindings():
    """kill -9 of the HA under traffic, then a restart: the binding comes back from the store,
    the downlink resumes, and the MN never has to register again (nothing was lost)."""
    outcome = _run("ha-restart")
    kinds = [(node, kind) for _t, node, kind in outcome.detail["timeline"]]
    assert ("ha", "binding-restored") in kinds, kinds
    assert outcome.detail["mn_registrations"] == 0, kinds
    assert outcome.directions["down"]["back_after_ready_ms"] is not None


def test_a_lost_siu_is_resent_by_the_home_agent():
    """The first SIU of a roam is dropped on the HA's way out: the HA resends it on its own
    timer and the move completes."""
    outcome = _run("lost-siu")
    kinds = [(node, kind) for _t, node, kind in outcome.detail["timeline"]]
    assert ("ha", "siu-retransmitted") in kinds, kinds
    assert ("mn", "rrp-received") in kinds, kinds


def test_a_40_s_outage_with_manual_keys_ends_in_a_registration():
    """The visited networks lose their path for 40 s while the MN roams (manual keys): the MN
    keeps retrying on its capped back-off and registers once the path is back."""
    outcome = _run("outage-40s-manual")
    kinds = [(node, kind) for _t, node, kind in outcome.detail["timeline"]]
    assert ("mn", "rrp-received") in kinds, kinds


def test_siu_path_down_the_new_tunnel_carries_the_downlink_without_an_siu():
    """Every SIU from the HA is dropped on its way out while the MN roams a -> b (IKEv2): the
    HA's replies never arrive, so the MN re-establishes its tunnel from b once; the GW binds the
    new SAs to where IKE came from and the downlink flows again although no SIU reached it."""
    outcome = _run("siu-path-down")
    timeline = outcome.detail["timeline"]
    kinds = [(node, kind) for _t, node, kind in timeline]
    assert kinds.count(("mn", "ike-reestablish")) == 1, kinds
    assert ("gw", "gw-sa-bound-by-ike") in kinds, kinds
    assert ("gw", "gw-sa-repointed") not in kinds, kinds         # no SIU moved anything
    assert ("mn", "rrp-received") not in kinds, kinds            # no reply came back either
    bound = next(t for t, node, kind in timeline if (node, kind) == ("gw", "gw-sa-bound-by-ike"))
    assert any(t > bound and (node, kind) == ("mn", "first-downlink-at-new-coa")
               for t, node, kind in timeline), kinds


def test_ha_killed_right_after_accepting_a_move_has_it_after_the_restart():
    """No accepted registration is lost: the MN roams a -> b, and the moment its reply arrives
    the HA is killed with SIGKILL.  The reply left only after the binding was on disk, so the
    restarted HA serves b at once, and the MN does not register again."""
    from mipsec.lab.recovery import Scenario, kill_and_restart

    seen = {}

    def move_then_kill(lab):
        lab.move("b", wait=True)
        detail = kill_and_restart("ha")(lab)
        seen["bindings"] = lab.status("ha")["node"]["bindings"]
        return detail

    scenario = Scenario("ha-restart-after-move", "-", move_then_kill, after_s=4.0)
    outcome = run_checked(scenario, labs.prefix("rk"))
    assert seen["bindings"]["10.1.0.100"]["care_of"] == "172.16.2.10", seen
    kinds = [(node, kind) for _t, node, kind in outcome.detail["timeline"]]
    restored = kinds.index(("ha", "binding-restored"))
    assert ("mn", "rrq-sent") not in kinds[restored:], kinds      # no re-registration needed
