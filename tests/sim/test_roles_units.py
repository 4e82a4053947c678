"""Role behaviour in detail: the MN's transition table, renewal, HA binding expiry, the refusal
reasons of each check, ESP-in-UDP / CBC / HMAC-SHA-256 variants, and JSON-able status."""

import collections
import json

import pytest

from mipsec.drops import DropReason
from mipsec.errors import UsageError
from mipsec.mip import ipip
from mipsec.mip.constants import SIU_PORT
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.mobility.registration import TRANSITIONS, RegEvent, RegState
from mipsec.node import timeline as tl
from mipsec.node.actions import (
    BindingChanged,
    CareOfAddressChanged,
    Log,
    PersistBinding,
    ReserveSiuSequence,
    SendToNet,
)
from mipsec.node.packet import a2b, build_udp_packet
from mipsec.sim.scenario import merged_timeline, start_streams, stream_reports, wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.mip import RegistrationRequest, RequestFlags, build_registration_request
from mipsec.wire.siu import SiuType, parse_siu


def _lab(n=1, **kw):
    kw.setdefault("internet_delay_s", 0.005)
    topo = build_topology(n, seed=7, **kw)
    for i in range(n):
        topo.move("a", i)
    assert wait_registered(topo, 2.0)
    return topo


def test_transition_table_is_complete_for_what_the_mn_does_and_refuses_the_rest():
    topo = build_topology(1)
    mn = topo.mn.role
    assert mn.state is RegState.IDLE
    with pytest.raises(UsageError, match="accepted is not allowed in state idle"):
        mn._event(RegEvent.ACCEPTED, 0.0)
    assert mn.state is RegState.IDLE
    # every state can be left by a move, and every away state by returning home
    for state in RegState:
        assert (state, RegEvent.MOVED) in TRANSITIONS
        assert (state, RegEvent.RETURNED_HOME) in TRANSITIONS
    with pytest.raises(UsageError):
        mn.handle_event(object(), 0.0)


def test_renewal_before_the_lifetime_ends():
    topo = _lab(lifetime_s=10)
    topo.sim.run(until=35.0)
    mn, ha = topo.mn.role, topo.ha.role
    sent = [e.time for e in mn.timeline if e.kind == "rrq-sent"]
    accepted = [e.time for e in mn.timeline if e.kind == "rrp-received"]
    assert len(sent) == 5 and len(accepted) == 5
    for reply, renewal in zip(accepted, sent[1:], strict=False):   # the last has no renewal
        assert abs(renewal - reply - 8.0) < 1e-9          # 0.8 x the granted 10 s
    assert mn.state is RegState.REGISTERED
    assert not any(e.kind == "binding-expired" for e in ha.timeline)
    # a renewal from the same CoA moves nothing at the GW: a repeat, reply forwarded
    gw_kinds = [e.kind for e in topo.gw.role.timeline]
    assert gw_kinds.count("gw-sa-repointed") == 1 and gw_kinds.count("rrp-forwarded") == len(sent)


def test_ha_binding_expiry_retires_the_gw_binding_and_stops_interception():
    topo = _lab(lifetime_s=10)
    ha_b = a2b(topo.ha.role.address)
    topo.home.drop_next(lambda p: p[16:20] == ha_b and p[9] == 17, count=100)   # renewals lost
    topo.sim.run(until=10.5)
    mn, gw, ha = topo.mn.role, topo.gw.role, topo.ha.role
    assert ha.bindings == {}
    exp = tl.first(ha.timeline, "binding-expired")
    assert exp is not None and abs(exp.time - 10.01) < 0.01
    assert tl.first(gw.timeline, "gw-binding-retired").time > exp.time
    assert gw.mobiles[mn.home_address].care_of is None
    # the CN's packets for the home address reach the MN's home link now, nobody is there
    acts = ha.receive_from_tun(build_udp_packet(a2b("10.1.0.10"), a2b(mn.home_address), 1, 2, b"x"), 11.0)
    assert acts == [] and ha.drops[DropReason.IPIP_NO_BINDING] == 1
    # and a downlink packet the GW still gets for the MN (IP-in-IP to the old CoA) finds its
    # SA without an outer binding
    inner = build_udp_packet(a2b("10.1.0.10"), a2b(mn.home_address), 1, 2, b"x")
    assert gw.receive_from_tun(ipip.encapsulate(inner, ha.address, mn.care_of), 11.0) == []
    assert gw.drops[DropReason.NO_SA] == 1            # retired binding (protocol.md: NO_SA)


def _rrq_packet(mn, *, src=None, spi=None, key=None, home_agent=None, home=None, sign=True):
    msa = MobilitySecurityAssociation(spi or mn.msa.spi, key or mn.config.msa.key)
    rrq = RegistrationRequest(home_address=home or mn.home_address,
                              home_agent=home_agent or mn.config.home_agent,
                              care_of_address="172.16.1.10",
                              identification=msa.new_identification(mn.wallclock()),
                              lifetime=600, flags=RequestFlags.D | RequestFlags.T)
    data = build_registration_request(rrq)
    if sign:
        data = msa.sign(data)
    return build_udp_packet(a2b(src or "172.16.1.10"), a2b(mn.config.home_agent), 434, 434, data)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(sign=False), DropReason.MIP_NO_AUTH),
    (dict(spi=0x9999), DropReason.MIP_UNKNOWN_SPI),
    (dict(key=b"k" * 16), DropReason.MIP_AUTH_FAILED),
    (dict(home_agent="10.1.0.3"), DropReason.MIP_UNKNOWN_HOME_AGENT),
    (dict(home="10.1.0.99"), DropReason.MIP_UNKNOWN_HOME_ADDRESS),
])
def test_ha_refusals_have_their_reason_and_no_reply(kwargs, reason):
    topo = build_topology(1)
    mn, ha = topo.mn.role, topo.ha.role
    acts = ha.receive_from_net(_rrq_packet(mn, **kwargs), 0.0)
    assert ha.drops == {reason: 1} and ha.bindings == {}
    if reason in (DropReason.MIP_NO_AUTH, DropReason.MIP_UNKNOWN_SPI, DropReason.MIP_AUTH_FAILED):
        # not authenticated: only counted (a flood must not fill the timeline or the log)
        assert acts == [] and ha.timeline == []
    else:
        assert [type(a) for a in acts] == [Log]
        assert tl.first(ha.timeline, "rrq-rejected").detail["reason"] == str(reason)


def test_ha_direct_registration_at_home_and_via_the_gateway_rule():
    topo = build_topology(1)
    mn, ha = topo.mn.role, topo.ha.role
    # from an address on the home prefix: the MN is at home: direct reply, no SIU
    acts = ha.receive_from_net(_rrq_packet(mn, src="10.1.0.100"), 0.0)
    # the binding is made durable first, then the routes move and the reply leaves
    assert [type(a) for a in acts] == [PersistBinding, BindingChanged, SendToNet]
    assert acts[0].record.care_of_address == "172.16.1.10"
    assert acts[2].packet[16:20] == a2b("10.1.0.100")
    # from outside the home prefix: it came through the GW: the reply travels in an SIU
    topo.sim.run(until=1.0)                       # a newer identification
    acts = ha.receive_from_net(_rrq_packet(mn, src="172.16.2.10"), 1.0)
    # the first SIU reserves its block of sequence numbers in the store before it leaves
    assert [type(a) for a in acts] == [PersistBinding, ReserveSiuSequence, SendToNet]
    assert not ha.drops
    assert acts[0].record.care_of_address == "172.16.1.10"
    assert acts[1].key == "siu-seq/" + topo.gw.role.inside and acts[1].expected is None
    assert acts[2].packet[16:20] == a2b(topo.gw.role.inside)
    assert int.from_bytes(acts[2].packet[22:24], "big") == SIU_PORT
    siu = parse_siu(acts[2].packet[28:])
    assert siu.type == SiuType.UPDATE and siu.new_care_of == "172.16.1.10" and siu.rrp


def test_gw_siu_for_an_unknown_mobile_or_sa():
    topo = _lab()
    mn, gw, ha = topo.mn.role, topo.gw.role, topo.ha.role
    signer = ha._signers[gw.inside]
    for kwargs, reason in [(dict(home_address="10.1.0.99", gateway_spi=mn.inbound.spi),
                            DropReason.SIU_UNKNOWN_MOBILE),
                           (dict(home_address=mn.home_address, gateway_spi=0x7777),
                            DropReason.SIU_UNKNOWN_SA)]:
        data = signer.build(SiuType.UPDATE, old_care_of=mn.care_of, new_care_of="172.16.1.66",
                            lifetime=600, wallclock=ha.wallclock(), **kwargs)
        pkt = build_udp_packet(a2b(ha.address), a2b(gw.inside), SIU_PORT, SIU_PORT, data)
        assert [type(a) for a in gw.receive_siu(pkt, topo.sim.now)] == [Log]
        assert gw.drops[reason] == 1
    assert gw.mobiles[mn.home_address].care_of == mn.care_of


def test_lost_address_then_new_one():
    topo = _lab()
    mn = topo.mn.role
    coa = mn.care_of
    topo.mn.driver.event(CareOfAddressChanged(None))
    # detached: nothing is sent from the address that went; the registration stands (it used
    # to be forgotten: IDLE, so the same address coming back cost a full re-registration
    # either way, and nothing said the binding was still valid)
    assert mn.state is RegState.DETACHED and mn.care_of == coa and mn.get_timer() is not None
    pkt = build_udp_packet(a2b(mn.home_address), a2b("10.1.0.10"), 1, 2, b"x")
    assert mn.receive_from_tun(pkt, topo.sim.now) == []
    assert mn.drops == {DropReason.NO_SA: 1}
    assert "went" in mn.status()["waiting_for"]
    topo.move("b")
    assert wait_registered(topo, 1.0) and mn.care_of == topo.care_of["b"][0]


@pytest.mark.parametrize("variant", [
    dict(udp_encap=True),
    dict(encryption="ENCR_AES_CBC", integrity="AUTH_HMAC_SHA1_96"),
    dict(encryption="ENCR_CHACHA20_POLY1305", msa_algorithm="hmac-sha256"),
])
def test_handover_with_other_transforms_and_encapsulations(variant):
    topo = _lab(**variant)
    start_streams(topo, interval_s=0.002, start=topo.sim.now, stop=topo.sim.now + 0.6)
    topo.sim.run_for(0.2)
    topo.move("b")
    topo.sim.run_for(0.8)
    assert topo.mn.role.state is RegState.REGISTERED
    reports = stream_reports(topo)
    assert reports["uplink"].lost == 0 and reports["downlink"].received > 0.9 * reports["downlink"].sent
    if variant.get("udp_encap"):
        assert topo.gw.role.mobiles[topo.mn.role.home_address].outbound.udp_encap is not None
    assert tl.in_order(tl.split_handovers(merged_timeline(topo))[-1],
                       ["rrq-sent", "gw-sa-repointed", "rrp-received"])


def test_status_is_json():
    topo = _lab(2)
    for role in topo.roles() + [topo.cn.app]:
        text = json.dumps(role.status())
        assert json.loads(text)["name"] == role.name
    st = topo.gw.role.status()
    assert st["mobiles"][topo.mn.role.home_address]["care_of"] == topo.care_of["a"][0]
    assert topo.ha.role.status(topo.sim.now)["bindings"][topo.mn.role.home_address]["remaining_s"] > 500
    assert topo.mn.role.status()["state"] == "registered"


def _ha_gw_pair():
    """An HA and a GW wired by hand (no simulator): deliver SIUs and ACKs explicitly."""
    import random

    from mipsec.node.config import make_lab_configs
    from mipsec.node.gateway import VpnGateway
    from mipsec.node.home_agent import HomeAgent
    lab = make_lab_configs(1, keys_from=random.Random(3))
    clock = [1_767_225_600.0]
    ha = HomeAgent(lab.home_agent, wallclock=lambda: clock[0])
    gw = VpnGateway(lab.gateway, wallclock=lambda: clock[0])
    mn_cfg = lab.mobiles[0]
    msa = MobilitySecurityAssociation(mn_cfg.msa.spi, mn_cfg.msa.key)

    def register(coa):
        clock[0] += 1
        rrq = RegistrationRequest(home_address=mn_cfg.home_address, home_agent=mn_cfg.home_agent,
                                  care_of_address=coa, identification=msa.new_identification(clock[0]),
                                  lifetime=600, flags=RequestFlags.D | RequestFlags.T)
        pkt = build_udp_packet(a2b(coa), a2b(mn_cfg.home_agent), 434, 434,
                               msa.sign(build_registration_request(rrq)))
        # the request came through the GW's tunnel from coa (what receive_from_net records)
        gw.mobiles[mn_cfg.home_address].note_rrq_source(a2b(coa), a2b(coa), None, clock[0])
        return [a.packet for a in ha.receive_from_net(pkt, clock[0]) if isinstance(a, SendToNet)]

    def to_gw(packets):
        out = []
        for p in packets:
            out += [a.packet for a in gw.receive_siu(p, clock[0]) if isinstance(a, SendToNet)]
        to_ha = a2b(ha.address)
        return [p for p in out if p[16:20] == to_ha], [p for p in out if p[16:20] != to_ha]

    def to_ha(acks):
        out = []
        for p in acks:
            out += [a.packet for a in ha.receive_from_net(p, clock[0]) if isinstance(a, SendToNet)]
        return out

    return ha, gw, mn_cfg, register, to_gw, to_ha


def test_ack_lets_the_ha_recover_a_lost_siu_followed_by_a_second_move():
    ha, gw, mn, register, to_gw, to_ha = _ha_gw_pair()
    acks, rrps = to_gw(register("172.16.1.10"))
    assert len(rrps) == 1 and to_ha(acks) == []                    # GW at A, HA knows it
    register("172.16.2.10")                                        # this SIU is lost
    acks, rrps = to_gw(register("172.16.3.10"))                    # names A (acked), not B
    assert gw.mobiles[mn.home_address].care_of == "172.16.3.10" and len(rrps) == 1
    assert to_ha(acks) == [] and not gw.drops and not ha.drops


def test_ack_of_a_stale_siu_makes_the_ha_correct_the_gw():
    ha, gw, mn, register, to_gw, to_ha = _ha_gw_pair()
    to_ha(to_gw(register("172.16.1.10"))[0])
    to_gw(register("172.16.2.10"))                                 # applied, its ACK is lost
    acks, rrps = to_gw(register("172.16.3.10"))                    # names A: stale at the GW
    assert rrps == [] and gw.drops == {DropReason.SIU_STALE_CARE_OF: 1}
    correction = to_ha(acks)                                       # the ACK reports B
    assert len(correction) == 1
    assert tl.first(ha.timeline, "siu-sent", correction=True).detail["old"] == "172.16.2.10"
    acks, rrps = to_gw(correction)
    assert gw.mobiles[mn.home_address].care_of == "172.16.3.10"
    assert len(rrps) == 1                                          # the reply the MN waits for
    assert to_ha(acks) == [] and not ha.drops


def test_each_roles_timeline_is_bounded_by_the_mns_it_serves():
    # a daemon left running reaches its steady timeline size: an MN keeps at most twice one
    # MN's share, a GW or HA twice the shares of its MNs (and of events without one)
    import random as _random

    from mipsec.node import timeline as tl
    from mipsec.node.config import make_lab_configs
    from mipsec.node.gateway import VpnGateway
    from mipsec.node.home_agent import HomeAgent
    from mipsec.node.mobile_node import MobileNode
    lab = make_lab_configs(3, keys_from=_random.Random(1))
    share = tl.TIMELINE_EVENTS_PER_MOBILE
    roles = {"mn": MobileNode(lab.mobiles[0], wallclock=lambda: 0.0),
             "gw": VpnGateway(lab.gateway), "ha": HomeAgent(lab.home_agent, wallclock=lambda: 0.0)}
    assert roles["mn"].timeline.max_events == 2 * share
    assert roles["gw"].timeline.max_events == roles["ha"].timeline.max_events == 2 * share * 4
    homes = [m.home_address for m in lab.mobiles]
    for name, role in roles.items():
        limit = role.timeline.max_events
        for i in range(5 * limit):
            home = homes[0] if name == "mn" else homes[i % 3]
            tl.record(role.timeline, float(i), name, "rrq-sent", home_address=home)
            assert len(role.timeline) <= limit
        per_mn = collections.Counter(e.detail["home_address"] for e in role.timeline)
        assert max(per_mn.values()) <= share + (limit - limit // 2), (name, per_mn)
        assert role.timeline[-1].time == 5 * limit - 1          # the newest is always kept
    # a plain list (tests, old callers) keeps the global bound
    events: list = []
    for i in range(tl.TIMELINE_MAX_EVENTS + 10):
        tl.record(events, float(i), "gw", "rrq-sent", home_address="10.1.0.100")
    assert len(events) <= tl.TIMELINE_MAX_EVENTS
    with pytest.raises(ValueError):
        tl.Timeline(1)
