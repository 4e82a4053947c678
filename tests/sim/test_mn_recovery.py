"""The MN never gives up while its configuration is valid (in-memory network, virtual clock).

Registrations are retransmitted for ever with a capped exponential back-off whose first
timeout comes from the measured registration round trip (RFC 6298 style); IKEv2 re-establishes
the tunnel when a whole round of requests goes unanswered, but not again at once; an HA that
refuses is logged clearly and backed off from, not looped on.
"""

from itertools import pairwise

import pytest

from mipsec.node import timeline as tl
from mipsec.node.actions import Log, ReestablishRequested
from mipsec.node.mobile_node import RegState
from mipsec.node.retransmit import RetransmitTimer
from mipsec.sim.scenario import start_streams, stream_reports, wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.mip import RegistrationReply, ReplyCode, build_registration_reply

# --- the timer's arithmetic (RFC 6298 §2) ----------------------------------------------------

def test_retransmit_timer_follows_rfc6298():
    t = RetransmitTimer(initial_s=1.0, floor_s=0.2, cap_s=30.0)
    assert t.rto == 1.0 and t.timeout(1) == 1.0 and t.timeout(3) == 4.0     # before a sample
    t.sample(0.1)                                  # first: srtt = R, rttvar = R / 2
    assert (t.srtt, t.rttvar) == (0.1, 0.05)
    assert t.rto == pytest.approx(0.1 + 4 * 0.05)
    t.sample(0.3)                                  # rttvar then srtt, alpha 1/8, beta 1/4
    assert t.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.2)
    assert t.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.3)
    assert t.rto == pytest.approx(t.srtt + 4 * t.rttvar)
    for _ in range(50):
        t.sample(0.001)                            # a fast path: the floor holds
    assert t.rto == 0.2
    assert [t.timeout(n) for n in range(1, 10)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0]
    assert t.timeout(10_000) == 30.0               # for ever, capped, no overflow
    for _ in range(50):
        t.sample(100.0)                            # a terrible path: the cap holds
    assert t.rto == 30.0
    with pytest.raises(ValueError):
        RetransmitTimer(initial_s=0.1, floor_s=0.2, cap_s=30.0)


def test_a_lost_request_costs_the_measured_timeout_not_a_second():
    """50 ms one way: the round trip is measured at the first registration; a lost request
    on the next move is sent again after srtt + 4 rttvar (at least the floor), well under the
    fixed 1 s of before, and the measured timeout is what the MN used."""
    topo = build_topology(1, internet_delay_s=0.050, seed=5)
    mn = topo.mn.role
    topo.move("a")
    assert wait_registered(topo, 3.0)
    assert mn.rtt.samples == 1 and mn.rtt.srtt == pytest.approx(topo.round_trip_s, rel=0.05)
    rto = mn.rtt.rto
    assert rto < 1.0
    b = topo.care_of["b"][0]
    topo.visited["b"].drop_next(lambda p: p[12:16] == bytes(map(int, b.split("."))))
    topo.move("b")
    t0 = topo.sim.now
    assert wait_registered(topo, 3.0)
    sent = [e.time for e in mn.timeline if e.kind == "rrq-sent" and e.time >= t0]
    assert len(sent) == 2 and sent[1] - sent[0] == pytest.approx(rto)
    assert topo.sim.now - t0 < 1.0


# --- never FAILED ------------------------------------------------------------------------------

@pytest.mark.parametrize("cap_s", [8.0, 30.0])
def test_forty_second_outage_of_the_visited_network_registers_within_one_backoff(cap_s):
    """Manual keys.  The MN moves to a visited network whose uplink is dead for 40 s: it keeps
    asking (the status says for what), and registers at most one back-off period (the cap)
    after the path returns; before, it stopped after five tries for good."""
    topo = build_topology(1, internet_delay_s=0.005, seed=6, retransmit_max_s=cap_s)
    mn = topo.mn.role
    topo.move("a")
    assert wait_registered(topo, 2.0)
    topo.visited["b"].drop_next(lambda p: True, count=10 ** 9, description="outage")
    topo.move("b")
    t_move = topo.sim.now
    topo.sim.run_for(40.0)
    assert mn.state is RegState.REGISTERING
    status = mn.status()
    assert status["state"] == "registering"
    assert "reply to registration request" in status["waiting_for"], status["waiting_for"]
    assert status["registration"]["retransmit"]["cap_s"] == cap_s
    topo.visited["b"]._drop_rules.clear()          # the path is back
    t_back = topo.sim.now
    assert wait_registered(topo, cap_s + 1.0)
    t_ok = tl.first([e for e in mn.timeline if e.time >= t_back], "rrp-received").time
    assert t_ok - t_back <= cap_s
    sent = [e.time for e in mn.timeline if e.kind == "rrq-sent" and e.time >= t_move]
    assert len(sent) > mn.config.max_attempts           # it went on after max_attempts
    assert max(y - x for x, y in pairwise(sent)) <= cap_s + 1e-9
    assert [type(a) for _t, a in topo.mn.driver.reestablish] == [ReestablishRequested]


def test_silent_home_agent_with_ikev2_reestablishes_with_backoff_not_in_a_loop():
    """The HA drops every request (a wrong MN-HA key: RFC 5944 §3.8, no reply).  The MN
    re-establishes its IKE SA once from its new CoA, then keeps backing off, checking that the
    GW answers, never re-IKEing again (before: a new IKE SA every 31 s for ever)."""
    from mipsec.mip.security import MobilitySecurityAssociation
    topo = build_topology(1, internet_delay_s=0.005, seed=7, sa_source="ikev2",
                          ike={"dpd_interval_s": 0})
    mn, ha = topo.mn.role, topo.ha.role
    topo.move("a")
    assert wait_registered(topo, 2.0)
    spi = mn.config.msa.spi
    good = ha._msa_by_spi[spi]
    ha._msa_by_spi[spi] = (MobilitySecurityAssociation(spi, b"\x55" * 16, "hmac-md5"), good[1])
    topo.move("b")
    t0 = topo.sim.now
    topo.sim.run_for(300.0)
    reest = [e.time - t0 for e in mn.timeline if e.kind == "ike-reestablish"]
    # one new tunnel from b (the old SAs dated from a); after that the GW answers its liveness
    # checks, so the missing reply is the HA's: logged, backed off from, never re-IKEd
    assert len(reest) == 1, reest
    assert "registration-unanswered" in [e.kind for e in mn.timeline]
    assert mn.state is RegState.REGISTERING
    ha._msa_by_spi[spi] = good                     # fixed: registered within one back-off
    t_fix = topo.sim.now
    assert wait_registered(topo, mn.config.retransmit_max_s + 1.0)
    assert topo.sim.now - t_fix <= mn.config.retransmit_max_s + 0.1


def _denial(mn, ha, code=ReplyCode.HA_ADMINISTRATIVELY_PROHIBITED):
    return mn.msa.sign(build_registration_reply(RegistrationReply(
        code=code, home_address=mn.home_address, home_agent=ha.address,
        identification=mn.reg.pending_id, lifetime=0)))


@pytest.mark.parametrize("sa_source", ["manual", "ikev2"])
def test_refusing_home_agent_is_logged_once_and_backed_off_from(sa_source):
    """An authenticated refusal proves the tunnel works: one clear WARNING (per code), the
    back-off goes on to its cap, the tunnel is not re-established, and the status says why."""
    topo = build_topology(1, internet_delay_s=0.005, seed=8, sa_source=sa_source,
                          ike={"dpd_interval_s": 0} if sa_source == "ikev2" else None)
    mn, ha = topo.mn.role, topo.ha.role
    topo.move("a")
    assert wait_registered(topo, 2.0)
    ha_b = bytes(map(int, ha.address.split(".")))
    topo.home.drop_next(lambda p: p[16:20] == ha_b, count=10 ** 9)    # the real HA is mute
    topo.move("b")
    logs, sent = [], []
    for _ in range(14):
        sent.append(topo.sim.now)
        out = mn._handle_reply(_denial(mn, ha), topo.sim.now, via="tunnel")
        logs += [a for a in out if isinstance(a, Log) and a.level == "warning"]
        topo.mn.driver.perform(out)
        topo.sim.run(until=mn.reg.deadline + 1e-6)               # the retransmission
    assert len(logs) == 1 and "refused" in logs[0].message and "code 129" in logs[0].message
    kinds = [e.kind for e in mn.timeline]
    assert "ike-reestablish" not in kinds and "reestablish-requested" not in kinds
    assert not topo.mn.driver.reestablish
    gaps = [y - x for x, y in pairwise(sent)]
    assert gaps == sorted(gaps) and gaps[-1] == pytest.approx(mn.config.retransmit_max_s)
    assert mn.state is RegState.REGISTERING
    assert "code 129" in mn.status()["waiting_for"]


def test_every_state_reachable_and_no_state_is_terminal():
    """No state of the machine is a dead end: from each one some event leads elsewhere, and a
    move or a return home is accepted in every state."""
    from mipsec.mobility.registration import TRANSITIONS, RegEvent
    for state in RegState:
        assert (state, RegEvent.MOVED) in TRANSITIONS
        assert (state, RegEvent.MOVED_WITHOUT_SAS) in TRANSITIONS
        assert (state, RegEvent.RETURNED_HOME) in TRANSITIONS
        assert any(new is not state for (st, _e), (new, _do) in TRANSITIONS.items() if st is state)
    reachable = {RegState.IDLE}
    while True:
        more = {new for (st, _e), (new, _do) in TRANSITIONS.items() if st in reachable} - reachable
        if not more:
            break
        reachable |= more
    assert reachable == set(RegState)


def test_stream_resumes_after_the_outage_without_help():
    topo = build_topology(1, internet_delay_s=0.005, seed=9)
    topo.move("a")
    assert wait_registered(topo, 2.0)
    start_streams(topo, interval_s=0.05, start=topo.sim.now + 0.01, stop=topo.sim.now + 80.0)
    topo.visited["b"].drop_next(lambda p: True, count=10 ** 9)
    topo.move("b")
    topo.sim.run_for(40.0)
    topo.visited["b"]._drop_rules.clear()
    topo.sim.run_for(38.0)
    rep = stream_reports(topo, since=topo.sim.now - 5.0, until=topo.sim.now - 0.1)
    for direction in ("uplink", "downlink"):
        assert rep[direction].longest_interruption_s <= 0.101, rep


def test_siu_path_down_one_new_tunnel_then_a_clear_log_and_a_capped_backoff():
    """Every SIU from the HA to the GW is lost, so the HA's replies never reach the MN.  After
    a move the MN concludes after IKE_FALLBACK_ATTEMPTS unanswered requests that its SAs (from
    the old CoA) give no reply, and re-establishes once from the new CoA: the GW binds the new
    pair there at IKE time and the downlink flows without any SIU.  From then on the GW answers
    its liveness checks: one clear warning, the request back-off capped, no further IKE SA."""
    from mipsec.mip.constants import SIU_PORT
    from mipsec.mobility.registration import IKE_FALLBACK_ATTEMPTS
    topo = build_topology(1, internet_delay_s=0.005, seed=11, sa_source="ikev2",
                          ike={"dpd_interval_s": 0})
    mn, gw = topo.mn.role, topo.gw.role
    topo.mn.driver.log = []
    b = topo.care_of["b"][0]
    inside = bytes(map(int, gw.inside.split(".")))
    topo.move("a")
    assert wait_registered(topo, 2.0)
    start_streams(topo, interval_s=0.05, start=topo.sim.now + 0.01, stop=topo.sim.now + 300.0)
    topo.home.drop_next(lambda p: p[9] == 17 and p[16:20] == inside
                        and int.from_bytes(p[22:24], "big") == SIU_PORT, count=10 ** 9)
    topo.move("b")
    t0 = topo.sim.now
    topo.sim.run_for(299.0)
    events = [e for e in mn.timeline if e.time >= t0]
    kinds = [e.kind for e in events]
    assert kinds.count("ike-reestablish") == 1, kinds
    assert tl.first(events, "ike-reestablish").detail["care_of"] == b
    sent = [e.time for e in events if e.kind == "rrq-sent"]
    assert kinds[:kinds.index("ike-reestablish")].count("rrq-sent") == IKE_FALLBACK_ATTEMPTS
    m = gw.mobiles[mn.home_address]
    assert m.state.value == "ike-bound" and m.outbound.remote == b     # no SIU bound it
    # the downlink came back with the new SAs and stayed (a 50 ms stream: no gap)
    t_bound = max(e.time for e in gw.timeline if e.kind == "gw-sa-bound-by-ike")
    rep = stream_reports(topo, since=t_bound + 0.1, until=topo.sim.now - 0.1)
    assert rep["downlink"].interruption_to is not None, rep
    assert rep["downlink"].longest_interruption_s <= 0.051, rep
    # the GW answered: what is missing is the HA's reply, said once, and the back-off capped
    warnings = [a.message for _t, a in topo.mn.driver.log
                if isinstance(a, Log) and a.level == "warning" and _t >= t0]
    unanswered = [w for w in warnings if "got no reply from the home agent" in w]
    assert len(unanswered) == 1, warnings
    assert "registration-unanswered" in kinds and "liveness-check" in kinds
    gaps = [y - x for x, y in pairwise(sent)]
    assert max(gaps) == pytest.approx(mn.config.retransmit_max_s)
    assert mn.state is RegState.REGISTERING
    assert "the GW answers" in mn.status()["waiting_for"]
