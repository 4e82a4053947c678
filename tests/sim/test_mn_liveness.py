"""The MN notices a GW that lost its state, and the IKE SA's life across home and away
(in-memory network, virtual clock).

A GW restart loses the ESP binding (manual keys) or every SA (IKEv2) while the MN still believes
it is registered.  The MN notices that its traffic gets no answer: with manual keys it registers
again (the HA's SIU re-binds the GW), with IKEv2 it sends a liveness check and, unanswered,
re-establishes at once.  At home no IKE exchange is sent from the care-of address it left.
"""

from itertools import pairwise

import pytest

from mipsec.ike.sa import State as IkeState
from mipsec.node import timeline as tl
from mipsec.node.mobile_node import LIVENESS_IDLE_S, LIVENESS_MAX_S, RegState
from mipsec.sim.scenario import restart_gateway, start_streams, stream_reports, wait_registered
from mipsec.sim.topology import build_topology


def _topo(sa_source, **kw):
    kw.setdefault("internet_delay_s", 0.005)
    if sa_source == "ikev2":
        kw.setdefault("ike", {"dpd_interval_s": 0})
    return build_topology(1, seed=11, sa_source=sa_source, **kw)


@pytest.mark.parametrize("sa_source", ["manual", "ikev2"])
def test_gw_restart_without_a_move_recovers_by_itself(sa_source):
    topo = _topo(sa_source)
    mn = topo.mn.role
    topo.move("a")
    assert wait_registered(topo, 2.0)
    start_streams(topo, interval_s=0.01, start=0.1, stop=12.0)
    topo.sim.run(until=2.0)
    old = topo.gw.role
    gw = restart_gateway(topo)                      # up again at once, with nothing
    if sa_source == "manual":
        # as the daemon does (mipsec/io/seqstate.py): manual SAs continue their sequence
        # numbers after a restart, so the MN's replay window takes the GW's packets
        for home, m in gw.mobiles.items():
            m.outbound.sequence = old.mobiles[home].outbound.sequence + 65536
    t_up = topo.sim.now
    topo.sim.run(until=12.5)
    events = [e for e in mn.timeline if e.time >= t_up]
    kinds = [e.kind for e in events]
    if sa_source == "manual":
        steps = ["liveness-check", "rrq-sent", "rrp-received"]
    else:
        steps = ["liveness-check", "reestablish-requested", "ike-reestablish", "ike-established",
                 "sas-installed", "rrq-sent", "rrp-received"]
    assert tl.in_order(events, steps), kinds
    assert mn.state is RegState.REGISTERED
    assert gw.mobiles[mn.home_address].care_of == topo.care_of["a"][0]
    t_ok = tl.first(events, "rrp-received").time
    # the check follows LIVENESS_IDLE_S of one-way traffic; IKEv2 adds the probe's timeout
    assert t_ok - t_up < LIVENESS_IDLE_S + 1.0
    rep = stream_reports(topo, since=t_ok + 0.05, until=11.9)
    for direction in ("uplink", "downlink"):
        assert rep[direction].longest_interruption_s <= 0.0201, (direction, rep)
    if sa_source == "ikev2":
        live_mn = [s for s in mn.ike.endpoint.ike_sas if s.state != IkeState.CLOSED]
        assert len(live_mn) == 1 and len(gw.ike.endpoint.ike_sas) == 1
        # the old child SAs ended with their IKE SA: only the new pair is known
        assert set(mn.book.pairs) == set(live_mn[0].children)
        why = tl.first(events, "reestablish-requested").detail["reason"]
        assert "liveness check" in why


@pytest.mark.parametrize("sa_source", ["manual", "ikev2"])
def test_one_way_traffic_to_a_live_gw_backs_the_check_off(sa_source):
    """Only uplink traffic and a GW that is fine: the MN checks, gets its answer, and checks
    less and less often (no storm, no re-establishment)."""
    topo = _topo(sa_source)
    mn = topo.mn.role
    topo.move("a")
    assert wait_registered(topo, 2.0)
    mn_app = topo.mn.app
    mn_app.start_stream(topo.cn.app.address, interval_s=0.05, start=0.1, stop=120.0)
    topo.mn.app_driver.rearm()
    topo.sim.run(until=120.0)
    checks = [e.time for e in mn.timeline if e.kind == "liveness-check"]
    assert 2 <= len(checks) <= 8, checks
    gaps = [round(y - x, 3) for x, y in pairwise(checks)]
    assert gaps == sorted(gaps) and max(gaps) <= LIVENESS_MAX_S + 2.0, gaps
    kinds = [e.kind for e in mn.timeline]
    assert "reestablish-requested" not in kinds and mn.state is RegState.REGISTERED


def test_a_child_rekey_due_at_home_is_not_sent_and_leaving_works():
    """Child lifetime 20 s: home at 5 s, away again at 60 s.  At home the MN sends no IKE
    message (before, it sent the re-key from its old CoA, the GW installed SAs whose reply
    never arrived and the downlink was lost for 30 s after leaving); on leaving a new IKE SA
    is set up at once and the stream flows both ways."""
    topo = _topo("ikev2", ike={"child_lifetime_s": 20.0, "dpd_interval_s": 0})
    mn, gw = topo.mn.role, topo.gw.role
    topo.move("a")
    assert wait_registered(topo, 2.0)
    topo.sim.run(until=5.0)
    topo.move("home")
    assert wait_registered(topo, 1.0) and mn.state is RegState.AT_HOME
    t_home = topo.sim.now
    topo.sim.run(until=60.0)
    sent_at_home = [a for t, a in topo.mn.driver.log
                    if t > t_home + 0.01 and a.__class__.__name__ == "SendToNet"]
    assert sent_at_home == []
    start_streams(topo, interval_s=0.01, start=60.0, stop=70.0)
    topo.move("b")
    assert wait_registered(topo, 1.0)
    t_ok = topo.sim.now
    topo.sim.run(until=70.5)
    rep = stream_reports(topo, since=t_ok + 0.05, until=69.9)
    for direction in ("uplink", "downlink"):
        assert rep[direction].longest_interruption_s <= 0.0201, (direction, rep)
    live_gw = [s for s in gw.ike.endpoint.ike_sas if s.state != IkeState.CLOSED]
    assert len(live_gw) == 1 and live_gw[0].remote[0] == topo.care_of["b"][0]
    # a child re-key after leaving goes from the right address and loses nothing
    topo.sim.run(until=95.0)
    assert [e for e in mn.timeline if e.kind == "sas-rekeyed" and e.time > 60.0]


def test_gw_down_for_seconds_manual_keys_is_found_soon_after_it_returns():
    """Manual keys, the GW gone for 8 s (restarting slowly) while the application keeps
    sending: the MN's requests are at most ACTIVE_RETRY_MAX_S apart while traffic waits, so it
    registers within that long after the GW is back (not one doubled back-off later)."""
    from mipsec.node.mobile_node import ACTIVE_RETRY_MAX_S
    topo = _topo("manual")
    mn = topo.mn.role
    topo.move("a")
    assert wait_registered(topo, 2.0)
    start_streams(topo, interval_s=0.01, start=0.1, stop=20.0)
    topo.sim.run(until=2.0)
    topo.outside.drop_next(lambda p: True, count=10 ** 9, description="GW down")
    topo.sim.run(until=10.0)
    old = topo.gw.role
    gw = restart_gateway(topo)
    for home, m in gw.mobiles.items():             # manual SAs continue their numbers
        m.outbound.sequence = old.mobiles[home].outbound.sequence + 65536
    topo.outside._drop_rules.clear()
    t_up = topo.sim.now
    topo.sim.run(until=20.0)
    sent = [e.time for e in mn.timeline if e.kind == "rrq-sent" and 2.0 < e.time < t_up]
    assert len(sent) >= 4 and max(y - x for x, y in pairwise(sent)) <= ACTIVE_RETRY_MAX_S
    t_ok = tl.first([e for e in mn.timeline if e.time >= t_up], "rrp-received").time
    assert t_ok - t_up <= ACTIVE_RETRY_MAX_S + 0.1
    assert mn.state is RegState.REGISTERED
    rep = stream_reports(topo, since=t_ok + 0.05, until=19.9)
    for direction in ("uplink", "downlink"):
        assert rep[direction].longest_interruption_s <= 0.0201, (direction, rep)


@pytest.mark.parametrize("sa_source", ["manual", "ikev2"])
def test_without_its_care_of_address_the_mn_sends_nothing_and_resumes_on_its_return(sa_source):
    """The care-of address goes (the watcher says CareOfAddressChanged(None)) while the
    application keeps sending: not one packet leaves (no request, no IKE exchange, no liveness
    check from an address the MN does not have), the binding stands; the address comes back
    and the MN registers again at once."""
    from mipsec.node.actions import CareOfAddressChanged
    topo = _topo(sa_source, ike={"child_lifetime_s": 10.0, "dpd_interval_s": 5.0}
                 if sa_source == "ikev2" else None)
    mn, host = topo.mn.role, topo.mn
    topo.move("a")
    assert wait_registered(topo, 2.0)
    start_streams(topo, interval_s=0.05, start=0.1, stop=45.0)
    topo.sim.run(until=2.0)
    topo.detach("a")                                 # the address is gone with its link
    host.driver.event(CareOfAddressChanged(None, "a"))
    assert mn.state is RegState.DETACHED
    t_gone = topo.sim.now
    topo.sim.run(until=40.0)
    sent = [a for t, a in host.driver.log if t > t_gone and a.__class__.__name__ == "SendToNet"]
    assert sent == [] and mn.state is RegState.DETACHED
    assert topo.ha.role.bindings[mn.home_address].care_of_address == topo.care_of["a"][0]
    topo.move("a")                                   # the same address is back
    assert wait_registered(topo, 2.0)
    t_ok = topo.sim.now
    topo.sim.run(until=45.0)
    rep = stream_reports(topo, since=t_ok + 0.1, until=44.9)
    for direction in ("uplink", "downlink"):
        assert rep[direction].longest_interruption_s <= 0.101, (direction, rep)
