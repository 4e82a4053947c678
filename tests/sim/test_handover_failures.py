"""Handover failure paths and attacks, in the in-memory network.

Lost RRQ, lost SIU and lost RRP each recover by retransmission; an HA that never accepts leads
to the re-establishment event.  Every attack is refused with its specific reason and changes no
SA and no binding.
"""

import dataclasses
import random
from itertools import pairwise

import pytest

from mipsec.drops import DropReason
from mipsec.ipsec.sa import Direction
from mipsec.mip.constants import SIU_PORT
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.mip.siu import SiuSigner
from mipsec.node import timeline as tl
from mipsec.node.actions import ReestablishRequested
from mipsec.node.mobile_node import RegState, make_sa
from mipsec.node.packet import a2b, build_udp_packet
from mipsec.sim.network import Host
from mipsec.sim.scenario import merged_timeline, wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.mip import RegistrationRequest, RequestFlags, build_registration_request
from mipsec.wire.siu import SiuType


def _udp_dport(packet):
    ihl = (packet[0] & 0x0F) * 4
    return packet[9] == 17 and int.from_bytes(packet[ihl + 2:ihl + 4], "big")


def _registered_at_a(n=1, **kw):
    topo = build_topology(n, internet_delay_s=0.005, seed=3, **kw)
    for i in range(n):
        topo.move("a", i)
    assert wait_registered(topo, 2.0)
    return topo


def _snapshot(topo, counters=True):
    """What an attack must not change: SA outer addresses (and, for attacks that do not travel
    inside an MN's own tunnel, sequence numbers, replay windows, packet counters), bindings."""
    def sa(s):
        if not counters:
            return (s.local, s.remote)
        return (s.local, s.remote, s.sequence, s.replay.top, s.counters.packets)
    gw = {h: (m.care_of, sa(m.inbound), sa(m.outbound)) for h, m in topo.gw.role.mobiles.items()}
    ha = {h: (b.care_of_address, b.expires, b.gw_old) for h, b in topo.ha.role.bindings.items()}
    mns = [(m.role.state, m.role.care_of, sa(m.role.inbound), sa(m.role.outbound)) for m in topo.mobiles]
    return gw, ha, mns


def _rogue(topo, address="10.1.0.66"):
    host = Host(topo.sim, "rogue")
    host.add_interface("home", address, topo.home)
    return host.interfaces["home"]


def _inject(topo, iface, packet):
    iface.segment.transmit(packet, packet[16:20], iface)


# --- lost messages recover by retransmission -------------------------------------------------

@pytest.mark.parametrize("lost", ["rrq", "siu-not-resent", "rrp"])
def test_lost_message_recovers_by_retransmission(lost):
    topo = _registered_at_a()
    b = topo.care_of["b"][0]
    b_bytes = a2b(b)
    if lost == "rrq":
        topo.visited["b"].drop_next(lambda p: p[12:16] == b_bytes)
    elif lost == "siu-not-resent":
        # an HA that does not resend SIUs: the MN's retransmitted request repeats the move
        ha = topo.ha.role
        ha.config = dataclasses.replace(ha.config, siu_retransmit_s=0.0)
        topo.home.drop_next(lambda p: _udp_dport(p) == SIU_PORT)
    else:
        topo.outside.drop_next(lambda p: p[16:20] == b_bytes)
    topo.move("b")
    topo.sim.run(until=topo.mn.role.reg.deadline - 0.001)     # just before the retransmission
    assert topo.mn.role.state is RegState.REGISTERING
    assert wait_registered(topo, 3.0)
    mn, gw, ha = topo.mn.role, topo.gw.role, topo.ha.role
    assert gw.mobiles[mn.home_address].care_of == b
    assert gw.mobiles[mn.home_address].outbound.remote == b
    assert ha.bindings[mn.home_address].care_of_address == b
    move = tl.split_handovers(merged_timeline(topo))[-1]
    assert [e.kind for e in move].count("rrq-sent") == 2
    assert tl.in_order(move, ["rrq-sent", "rrq-retransmitted", "rrq-sent", "rrp-received"])
    if lost == "rrp":
        # the HA's second SIU repeats the move: the GW forwards the RRP and moves nothing
        assert [e.kind for e in move].count("gw-sa-repointed") == 1
        assert [e.kind for e in move].count("rrp-forwarded") == 2
    assert not gw.drops and not mn.drops


@pytest.mark.parametrize("lost", ["siu", "ack"])
def test_lost_siu_or_ack_is_resent_by_the_home_agent(lost):
    """The HA resends an SIU that is not ACKed on its own short timer: the move completes
    before the MN's first retransmission timeout, with one Registration Request.  A lost ACK
    makes the GW see the resent SIU as a repeat: it forwards the reply again, moves nothing."""
    topo = _registered_at_a()
    b = topo.care_of["b"][0]
    gw_inside = a2b(topo.gw.role.inside)
    if lost == "siu":
        topo.home.drop_next(lambda p: _udp_dport(p) == SIU_PORT and p[16:20] == gw_inside)
    else:
        topo.home.drop_next(lambda p: _udp_dport(p) == SIU_PORT and p[12:16] == gw_inside)
    topo.move("b")
    topo.sim.run_for(0.6)        # less than the MN's first timeout (1 s)
    mn, gw, ha = topo.mn.role, topo.gw.role, topo.ha.role
    assert mn.state is RegState.REGISTERED
    assert gw.mobiles[mn.home_address].outbound.remote == b
    assert ha.bindings[mn.home_address].care_of_address == b
    kinds = [e.kind for e in tl.split_handovers(merged_timeline(topo))[-1]]
    assert kinds.count("rrq-sent") == 1 and "rrq-retransmitted" not in kinds, kinds
    assert kinds.count("siu-retransmitted") == 1, kinds
    assert kinds.count("gw-sa-repointed") == 1, kinds
    assert kinds.count("rrp-forwarded") == (1 if lost == "siu" else 2), kinds
    assert ha.siu.resend == {} and ha.get_timer() == ha.machine.next_expiry()     # ACKed: no more resends
    assert not gw.drops
    # the reply forwarded twice after a lost ACK: the MN drops the second copy, counted
    assert mn.drops == ({} if lost == "siu" else {DropReason.MIP_UNEXPECTED_REPLY: 1})


def test_an_siu_never_acked_is_resent_a_bounded_number_of_times():
    topo = _registered_at_a()
    gw_inside = a2b(topo.gw.role.inside)
    topo.home.drop_next(lambda p: _udp_dport(p) == SIU_PORT and p[16:20] == gw_inside,
                        count=1000)
    # only the MN's first request reaches the HA: one SIU, resent on the HA's own timer
    b_bytes = a2b(topo.care_of["b"][0])
    seen = []

    def later_requests(p):
        if p[12:16] != b_bytes:
            return False
        seen.append(p)
        return len(seen) > 1
    topo.visited["b"].drop_next(later_requests, count=1000)
    topo.move("b")
    topo.sim.run_for(2.0)       # the HA's resends and its last wait end before the MN's timer
    ha = topo.ha.role
    kinds = [e.kind for e in ha.timeline]
    assert kinds.count("siu-retransmitted") == ha.config.siu_retransmit_tries
    assert kinds[-1] == "siu-unacknowledged"
    assert ha.siu.resend == {}


def test_home_agent_that_never_accepts_leads_to_reestablishment():
    """The MN asks for re-establishment once, after max_attempts, and never gives up: it goes
    on asking with a capped exponential back-off (it used to stop in a FAILED state for good,
    which no later recovery of the path could end)."""
    topo = _registered_at_a()
    a, b = topo.care_of["a"][0], topo.care_of["b"][0]
    ha_b = a2b(topo.ha.role.address)
    topo.home.drop_next(lambda p: p[16:20] == ha_b and _udp_dport(p) == 434, count=1000)
    before = _snapshot(topo, counters=False)
    topo.move("b")
    topo.sim.run_for(120.0)
    mn = topo.mn.role
    assert mn.state is RegState.REGISTERING
    assert [type(a) for _t, a in topo.mn.driver.reestablish] == [ReestablishRequested]
    req = topo.mn.driver.reestablish[0][1]
    assert req.home_address == mn.home_address and req.attempts == mn.config.max_attempts
    move = tl.split_handovers(merged_timeline(topo))[-1]
    sent = [e.time for e in move if e.kind == "rrq-sent"]
    assert len(sent) > mn.config.max_attempts + 2
    gaps = [round(y - x, 6) for x, y in pairwise(sent)]
    rto = mn.rtt.rto                                     # from the round trips measured at a
    assert rto < 1.0
    cap = mn.config.retransmit_max_s
    assert gaps == [min(cap, round(rto * 2 ** i, 6)) for i in range(len(gaps))]  # doubled, capped
    assert gaps[-1] == cap
    kinds = [e.kind for e in move]
    assert kinds.count("reestablish-requested") == 1
    assert kinds.index("reestablish-requested") > kinds.index("rrq-sent")
    # the GW and the HA still hold the old binding
    assert _snapshot(topo, False)[:2] == before[:2]
    assert topo.gw.role.mobiles[mn.home_address].care_of == a

    # the IKE hook: fresh SAs on both ends and the MN registers again through them
    topo.home._drop_rules.clear()
    cfg = mn.config
    rnd = random.Random(9)
    esp_in = dataclasses.replace(cfg.esp_in, spi=0x30000001, encryption_key=rnd.randbytes(20))
    esp_out = dataclasses.replace(cfg.esp_out, spi=0x30000002, encryption_key=rnd.randbytes(20))
    gw = topo.gw.role
    gw_in = make_sa(esp_out, Direction.INBOUND, local=gw.outside, remote=None)
    gw_out = make_sa(esp_in, Direction.OUTBOUND, local=gw.outside, remote="0.0.0.0")
    gw.install_mobile(mn.home_address, gw_in, gw_out, home_agent=cfg.home_agent,
                      allowed_destinations=(f"{cfg.home_agent}/32", cfg.home_prefix))
    topo.ha.role.set_gateway_spi(mn.home_address, esp_in.spi)
    topo.mn.driver.perform(mn.install_sas(
        make_sa(esp_in, Direction.INBOUND, local=None, remote=cfg.gateway),
        make_sa(esp_out, Direction.OUTBOUND, local="0.0.0.0", remote=cfg.gateway), topo.sim.now))
    assert wait_registered(topo, 2.0)
    assert gw.mobiles[mn.home_address].care_of == b


# --- attacks: each refused with its reason, nothing changes ------------------------------------

def _send_in_tunnel(topo, index, inner):
    """Put ``inner`` into MN ``index``'s own ESP tunnel (what a malicious MN can do)."""
    host = topo.mobiles[index]
    host.send(host.role.outbound.encapsulate(inner, topo.sim.now), "a")


def _rrq(mn, *, home_address=None, msa=None, identification=None):
    msa = msa or mn.msa
    rrq = RegistrationRequest(
        home_address=home_address or mn.home_address, home_agent=mn.config.home_agent,
        care_of_address=mn.care_of, identification=identification or msa.new_identification(mn.wallclock()),
        lifetime=600, flags=RequestFlags.D | RequestFlags.T)
    data = msa.sign(build_registration_request(rrq))
    return build_udp_packet(a2b(mn.care_of), a2b(mn.config.home_agent), 434, 434, data)


def _assert_refused(topo, role, reason, before, *, no_siu=True, counters=True):
    siu_before = sum(e.kind == "siu-sent" for e in topo.ha.role.timeline)
    topo.sim.run_for(0.5)
    assert role.drops == {reason: 1}, role.drops
    assert _snapshot(topo, counters) == before
    if no_siu:
        assert sum(e.kind == "siu-sent" for e in topo.ha.role.timeline) == siu_before


def test_mn_ha_authentication_failure():
    topo = _registered_at_a()
    mn = topo.mn.role
    forged = MobilitySecurityAssociation(mn.msa.spi, b"not the key....!")
    before = _snapshot(topo, counters=False)
    _send_in_tunnel(topo, 0, _rrq(mn, msa=forged))
    _assert_refused(topo, topo.ha.role, DropReason.MIP_AUTH_FAILED, before, counters=False)
    # not authenticated: counted only, no timeline event (anyone could flood it)
    assert not [e for e in topo.ha.role.timeline if e.kind == "rrq-rejected"]


def test_replayed_rrq():
    topo = _registered_at_a()
    captured = topo.home.start_capture()
    topo.move("b")
    assert wait_registered(topo, 2.0)
    rrq = next(p for _t, who, p in captured if who == "gw" and _udp_dport(p) == 434)
    topo.home.capture = None
    topo.move("a")
    assert wait_registered(topo, 2.0)
    before = _snapshot(topo, counters=False)
    _inject(topo, _rogue(topo), rrq)            # replayed on the home network to the HA
    _assert_refused(topo, topo.ha.role, DropReason.MIP_REPLAYED, before, no_siu=False,
                    counters=False)
    # RFC 5944 §3.8.3.1: the request authenticated, so the HA answers 133 (in a REJECT SIU); the
    # GW sends that reply once to the replayed CoA B and moves nothing; nobody is at B any more
    last = topo.ha.role.timeline[-1]
    assert last.kind == "siu-sent" and last.detail["type"] == "reject"
    assert last.detail["new"] == topo.care_of["b"][0]
    fwd = topo.gw.role.timeline[-1]
    assert fwd.kind == "rrp-forwarded" and fwd.detail == {
        "home_address": topo.mn.role.home_address, "care_of": topo.care_of["b"][0], "rejected": True}
    assert topo.gw.role.mobiles[topo.mn.role.home_address].outbound.remote == topo.care_of["a"][0]
    assert not topo.gw.role.drops


def test_forged_siu():
    topo = _registered_at_a()
    mn, ha = topo.mn.role, topo.ha.role
    signer = SiuSigner(ha.address, b"attacker-guessed-key-0123456789")
    data = signer.build(SiuType.UPDATE, home_address=mn.home_address, old_care_of=mn.care_of,
                        new_care_of="172.16.1.66", gateway_spi=mn.inbound.spi, lifetime=600,
                        wallclock=ha.wallclock())
    before = _snapshot(topo)
    _inject(topo, _rogue(topo), build_udp_packet(a2b(ha.address), a2b(topo.gw.role.inside),
                                                 SIU_PORT, SIU_PORT, data))
    _assert_refused(topo, topo.gw.role, DropReason.SIU_AUTH_FAILED, before)


def test_replayed_siu():
    topo = _registered_at_a()
    captured = topo.home.start_capture()
    topo.move("b")
    assert wait_registered(topo, 2.0)
    siu = next(p for _t, who, p in captured if _udp_dport(p) == SIU_PORT)
    topo.move("a")
    assert wait_registered(topo, 2.0)
    before = _snapshot(topo)
    _inject(topo, _rogue(topo), siu)          # would move the SA back to B
    _assert_refused(topo, topo.gw.role, DropReason.SIU_REPLAYED, before)


def test_fresh_siu_with_stale_old_care_of_cannot_move_the_sa():
    topo = _registered_at_a()
    mn, ha = topo.mn.role, topo.ha.role
    signer = ha._signers[topo.gw.role.inside]           # the real key, a fresh sequence
    data = signer.build(SiuType.UPDATE, home_address=mn.home_address, old_care_of="172.16.2.10",
                        new_care_of="172.16.2.10", gateway_spi=mn.inbound.spi, lifetime=600,
                        wallclock=ha.wallclock())
    data = data  # delayed SIU from an older handover that was never delivered
    before = _snapshot(topo)
    _inject(topo, _rogue(topo), build_udp_packet(a2b(ha.address), a2b(topo.gw.role.inside),
                                                 SIU_PORT, SIU_PORT, data))
    _assert_refused(topo, topo.gw.role, DropReason.SIU_STALE_CARE_OF, before)


def test_siu_from_a_host_that_is_not_a_configured_ha():
    topo = _registered_at_a()
    mn = topo.mn.role
    key = topo.configs.gateway.home_agents[0].key        # even with the right key
    signer = SiuSigner("10.1.0.10", key)
    data = signer.build(SiuType.UPDATE, home_address=mn.home_address, old_care_of=mn.care_of,
                        new_care_of="172.16.1.66", gateway_spi=mn.inbound.spi, lifetime=600,
                        wallclock=topo.ha.role.wallclock())
    before = _snapshot(topo)
    _inject(topo, topo.cn.interfaces["home"], build_udp_packet(
        a2b("10.1.0.10"), a2b(topo.gw.role.inside), SIU_PORT, SIU_PORT, data))
    _assert_refused(topo, topo.gw.role, DropReason.SIU_UNKNOWN_SENDER, before)


def test_mn_registering_another_mns_home_address():
    topo = _registered_at_a(2)
    victim, attacker = topo.mobiles[0].role, topo.mobiles[1].role
    before = _snapshot(topo, counters=False)
    _send_in_tunnel(topo, 1, _rrq(attacker, home_address=victim.home_address))
    _assert_refused(topo, topo.ha.role, DropReason.MIP_HOME_ADDRESS_NOT_OWNED, before,
                    counters=False)
    assert topo.ha.role.bindings[victim.home_address].care_of_address == victim.care_of


def test_mn_sending_to_a_forbidden_destination():
    topo = _registered_at_a()
    mn = topo.mn.role
    received = []
    outsider = Host(topo.sim, "outsider")
    outsider.add_interface("home", "10.1.0.77", topo.home)   # would be reachable inside...
    outsider.received = received
    inner = build_udp_packet(a2b(mn.home_address), a2b("192.168.7.7"), 5000, 53, b"exfiltrate")
    before = _snapshot(topo, counters=False)
    _send_in_tunnel(topo, 0, inner)
    topo.sim.run_for(0.5)
    assert topo.gw.role.drops == {DropReason.FORBIDDEN_DESTINATION: 1}
    assert _snapshot(topo, counters=False) == before
    assert not received and topo.home.counters["undeliverable"] == 0


def test_mn_with_a_wrong_clock_resynchronises_from_the_133_reply():
    """RFC 5944 §5.7: the HA answers 133 with its time; the MN adopts it and registers."""
    topo = _registered_at_a()
    mn = topo.mn.role
    mn.wallclock = lambda: topo.ha.role.wallclock() + 3600.0     # an hour ahead
    mn.msa._last_sent_id = None
    topo.move("b")
    assert wait_registered(topo, 2.0)
    move = tl.split_handovers(merged_timeline(topo))[-1]
    assert tl.in_order(move, ["rrq-sent", "rrq-rejected", "siu-sent", "rrp-received",
                              "registration-failed", "rrq-sent", "rrq-accepted", "siu-sent",
                              "gw-sa-repointed", "rrp-received"]), tl.format_table(move)
    assert tl.first(move, "rrq-rejected").detail["code"] == 133
    assert tl.first(move, "registration-failed").detail["action"] == "resynchronised"
    assert topo.ha.role.drops == {DropReason.MIP_IDENTIFICATION_MISMATCH: 1}
    assert topo.gw.role.mobiles[mn.home_address].care_of == topo.care_of["b"][0]


@pytest.mark.parametrize("spoof", ["other-mn-via-reverse-tunnel", "home-host-directly"])
def test_mn_claiming_another_home_side_address(spoof):
    from mipsec.mip import ipip
    topo = _registered_at_a(2)
    victim, attacker = topo.mobiles[0].role, topo.mobiles[1].role
    cn_got = []
    topo.cn.app.arrivals = cn_got
    payload = build_udp_packet(a2b(victim.home_address), a2b("10.1.0.10"), 9000, 9000, b"as victim")
    if spoof == "other-mn-via-reverse-tunnel":
        # the victim's CoA as outer source: the HA's RFC 3024 check alone would accept it
        inner = ipip.encapsulate(payload, victim.care_of, attacker.config.home_agent)
    else:
        inner = build_udp_packet(a2b("10.1.0.10"), a2b(attacker.config.home_agent), 1, 2, b"as CN")
    before = _snapshot(topo, counters=False)
    _send_in_tunnel(topo, 1, inner)
    topo.sim.run_for(0.5)
    assert topo.gw.role.drops == {DropReason.FORBIDDEN_SOURCE: 1}
    assert _snapshot(topo, counters=False) == before
    assert not topo.ha.role.drops and not cn_got
