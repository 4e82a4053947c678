"""Attacks on the GW and the SIU path, in the in-memory network (docs/security.md).

Each attack is refused with its own drop reason, counted, and changes no binding and no SA; the
honest cases next to them (two MNs behind one NAT, restarts, reordering on the home link) keep
working without retransmissions.
"""

from __future__ import annotations

import json
import random

from mipsec.drops import DropReason as R
from mipsec.ike.events import PeerAddressChanged
from mipsec.mip import ipip
from mipsec.mip.constants import SIU_PORT
from mipsec.node import timeline as tl
from mipsec.node.actions import CareOfAddressChanged, SendToNet, WriteToTun
from mipsec.node.config import make_lab_configs
from mipsec.node.gateway import VpnGateway
from mipsec.node.home_agent import HomeAgent
from mipsec.node.mobile_node import MobileNode
from mipsec.node.packet import a2b, build_udp_packet
from mipsec.sim.network import Host
from mipsec.sim.scenario import restart_gateway, start_streams, stream_reports, wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.mip import RegistrationRequest, RequestFlags, build_registration_request
from mipsec.wire.siu import SiuFlags, parse_siu

WALL = 1_767_225_600.0


def _udp_dport(packet):
    ihl = (packet[0] & 0x0F) * 4
    return packet[9] == 17 and int.from_bytes(packet[ihl + 2:ihl + 4], "big")


def _registered_at_a(n=1, **kw):
    topo = build_topology(n, internet_delay_s=0.005, seed=5, **kw)
    for i in range(n):
        topo.move("a", i)
    assert wait_registered(topo, 2.0)
    return topo


def _gw_state(topo):
    return {h: (m.state, m.care_of, m.outbound.remote, m.outbound.sequence)
            for h, m in topo.gw.role.mobiles.items()}


def _rrq_for(mn, care_of):
    """A Registration Request of ``mn`` (its own MSA: it authenticates) naming ``care_of``."""
    rrq = RegistrationRequest(
        home_address=mn.home_address, home_agent=mn.config.home_agent, care_of_address=care_of,
        identification=mn.msa.new_identification(mn.wallclock()), lifetime=600,
        flags=RequestFlags.D | RequestFlags.T)
    return build_udp_packet(a2b(mn.care_of), a2b(mn.config.home_agent), 434, 434,
                            mn.msa.sign(build_registration_request(rrq)))


# --- one MN cannot take another MN's downlink ------------------------------------------------

def test_mn_registering_another_mns_care_of_cannot_take_its_downlink():
    topo = _registered_at_a(2)
    victim, attacker = topo.mobiles[0].role, topo.mobiles[1].role
    gw, ha = topo.gw.role, topo.ha.role
    before = _gw_state(topo)
    # the attacker registers the victim's CoA through its own (authenticated) tunnel
    host = topo.mobiles[1]
    host.send(attacker.outbound.encapsulate(_rrq_for(attacker, victim.care_of), topo.sim.now), "a")
    start_streams(topo, interval_s=0.01, start=topo.sim.now + 0.05,
                  stop=topo.sim.now + 0.55, index=0)
    topo.sim.run_for(1.0)
    # the HA accepted it (the request authenticates), the GW refused to point the attacker's SA
    # at the victim's address: its registration never came from there
    assert ha.bindings[attacker.home_address].care_of_address == victim.care_of
    assert gw.drops[R.SIU_CARE_OF_MISMATCH] >= 1
    assert _gw_state(topo) == {h: v[:3] + (topo.gw.role.mobiles[h].outbound.sequence,)
                               for h, v in before.items()}
    # ... and the victim's downlink is keyed by its home address: all 50 arrive
    rep = stream_reports(topo, 0)["downlink"]
    assert rep.sent == 50 and rep.received == 50, rep
    # the HA learnt from the ACK where the GW's SA really points
    assert ha.siu.gw_care_of[attacker.home_address] == attacker.care_of


def test_downlink_is_matched_by_the_home_address_inside_the_ip_in_ip():
    topo = _registered_at_a(2)
    gw = topo.gw.role
    a, b = topo.mobiles[0].role, topo.mobiles[1].role
    inner = build_udp_packet(a2b("10.1.0.10"), a2b(b.home_address), 1, 2, b"for b")
    # IP-in-IP to A's CoA carrying B's packet goes out on B's SA, to B
    (out,) = gw.receive_from_tun(ipip.encapsulate(inner, topo.ha.role.address, a.care_of),
                                 topo.sim.now)
    assert out.packet[16:20] == a2b(b.care_of)
    assert int.from_bytes(out.packet[20:24], "big") == gw.mobiles[b.home_address].outbound.spi
    # not IP-in-IP, or for nobody we serve: no policy; an MN without binding: no SA
    plain = build_udp_packet(a2b("10.1.0.10"), a2b(a.care_of), 1, 2, b"x")
    assert gw.receive_from_tun(plain, topo.sim.now) == []
    stranger = build_udp_packet(a2b("10.1.0.10"), a2b("10.1.0.99"), 1, 2, b"x")
    assert gw.receive_from_tun(ipip.encapsulate(stranger, topo.ha.role.address, a.care_of),
                               topo.sim.now) == []
    assert gw.drops == {R.NO_POLICY: 2}


# --- two MNs behind one NAT ---------------------------------------------------------------------

def _nat(packet: bytes, public: str, port: int) -> bytes:
    """What a NAT does to ESP in UDP leaving the private side: new source address and port."""
    from mipsec.wire.ipv4 import checksum
    header = bytearray(packet[:20])
    header[12:16] = a2b(public)
    header[10:12] = b"\0\0"
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + port.to_bytes(2, "big") + packet[22:26] + b"\0\0" + packet[28:]


def test_two_mns_behind_one_nat_each_get_their_own_downlink():
    """Both MNs sit at private 192.168.0.10/11 behind public 198.51.100.1 (ports 40001/40002),
    with ESP in UDP; both register their private CoAs through the GW; the HA tunnels both
    downlinks to their private CoAs; each reaches its own MN through its own NAT mapping."""
    lab = make_lab_configs(2, keys_from=random.Random(11), udp_encap=True)
    clock = [WALL]
    gw = VpnGateway(lab.gateway, wallclock=lambda: clock[0])
    ha = HomeAgent(lab.home_agent, wallclock=lambda: clock[0])
    public = "198.51.100.1"
    mns, ports = [], {}
    for i, cfg in enumerate(lab.mobiles):
        mn = MobileNode(cfg, wallclock=lambda: clock[0])
        coa = f"192.168.0.{10 + i}"
        ports[cfg.home_address] = 40001 + i
        rrq = [a.packet for a in mn.handle_event(CareOfAddressChanged(coa), 0.0)
               if isinstance(a, SendToNet)]
        assert len(rrq) == 1
        mns.append((mn, coa, rrq[0]))
    for mn, coa, esp in mns:
        # uplink: through the NAT, into the GW, the RRQ out to the HA, its SIU back to the GW
        actions = gw.receive_from_net(_nat(esp, public, ports[mn.home_address]), 0.0)
        # the GW forwards the request from its inside address (the HA learns the GW from it)
        (rrq,) = [a.packet for a in actions if isinstance(a, SendToNet)]
        sius = [a.packet for a in ha.receive_from_net(rrq, 0.0) if isinstance(a, SendToNet)]
        (siu,) = sius
        out = gw.receive_siu(siu, 0.0)
        rrp = [a.packet for a in out if isinstance(a, SendToNet)
               and a.packet[16:20] == a2b(public)]
        assert len(rrp) == 1 and int.from_bytes(rrp[0][22:24], "big") == ports[mn.home_address]
        m = gw.mobiles[mn.home_address]
        assert (m.care_of, m.outbound.remote, m.outbound.udp_encap.remote_port) == (
            coa, public, ports[mn.home_address])
    assert not gw.drops and not ha.drops
    # downlink: the HA's IP-in-IP for each MN goes to the public address, each on its own SA
    # and NAT port, and each MN accepts its own
    for mn, coa, _ in mns:
        inner = build_udp_packet(a2b("10.1.0.10"), a2b(mn.home_address), 7, 7, b"hello")
        (tunnelled,) = [a.packet for a in ha.receive_from_tun(inner, 0.0)]
        assert tunnelled[16:20] == a2b(coa)
        (out,) = gw.receive_from_tun(tunnelled, 0.0)
        assert out.packet[16:20] == a2b(public)
        assert int.from_bytes(out.packet[22:24], "big") == ports[mn.home_address]
        assert int.from_bytes(out.packet[28:32], "big") == gw.mobiles[mn.home_address].outbound.spi
        # the NAT delivers it to the MN's private address and port 4500
        delivered = (out.packet[:16] + a2b(coa) + out.packet[20:22] + (4500).to_bytes(2, "big")
                     + out.packet[24:])
        from mipsec.wire.ipv4 import checksum
        hdr = bytearray(delivered[:20])
        hdr[10:12] = b"\0\0"
        hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
        got = mn.receive_from_net(bytes(hdr) + delivered[20:], 0.0)
        assert [a.packet[-5:] for a in got if isinstance(a, WriteToTun)] == [b"hello"], mn.drops


def test_raw_esp_registration_must_come_from_the_care_of_it_registers():
    topo = _registered_at_a(1)
    gw, mn = topo.gw.role, topo.mn.role
    mobile = gw.mobiles[mn.home_address]
    mobile.note_rrq_source(a2b("172.16.9.9"), a2b(mn.care_of), None, topo.sim.now)
    assert mobile.rrq_source("172.16.9.9", topo.sim.now) is None       # not recorded
    mobile.note_rrq_source(a2b("172.16.9.9"), a2b(mn.care_of), 40000, topo.sim.now)
    assert mobile.rrq_source("172.16.9.9", topo.sim.now) == (mn.care_of, 40000)   # NAT-T
    # too old to name
    assert mobile.rrq_source("172.16.9.9", topo.sim.now + 60.0) is None


# --- SIUs only from the inside ------------------------------------------------------------------

def test_siu_arriving_from_the_outside_is_refused():
    topo = _registered_at_a(1)
    gw, ha, mn = topo.gw.role, topo.ha.role, topo.mn.role
    before = _gw_state(topo)
    # a genuine, fresh SIU (signed with the real key) sent to the GW's inside address from the
    # Internet: it arrives on the outside interface
    signer = ha._signers[gw.inside]
    data = signer.build(home_address=mn.home_address, old_care_of=mn.care_of,
                        new_care_of="172.16.2.10", gateway_spi=0, lifetime=600,
                        wallclock=ha.wallclock(), gateway_epoch=gw.epoch)
    packet = build_udp_packet(a2b(ha.address), a2b(gw.inside), SIU_PORT, SIU_PORT, data)
    outsider = Host(topo.sim, "outsider")
    outsider.add_interface("out", "172.16.0.77", topo.outside)
    iface = outsider.interfaces["out"]
    iface.segment.transmit(packet, a2b(gw.outside), iface)
    topo.sim.run_for(0.2)
    assert gw.drops == {R.SIU_WRONG_INTERFACE: 1}
    assert _gw_state(topo) == before
    # the role's own refusal, whatever the adapter did
    assert gw.receive_from_net(packet, topo.sim.now) == []
    assert gw.drops == {R.SIU_WRONG_INTERFACE: 2}


# --- replays across restarts ---------------------------------------------------------------------

def test_recorded_siu_replayed_after_a_gw_restart_is_refused():
    topo = build_topology(1, internet_delay_s=0.005, seed=5)
    home, outside = topo.home.start_capture(), topo.outside.start_capture()
    topo.move("a")
    assert wait_registered(topo, 2.0)
    topo.move("b")
    assert wait_registered(topo, 2.0)
    mn = topo.mn.role
    # the attacker recorded the SIU of the move to B and the MN's ESP-protected request
    sius = [p for _t, _n, p in home if _udp_dport(p) == SIU_PORT and p[12:16] == a2b(
        topo.ha.role.address)]
    esp = [p for _t, _n, p in outside if p[9] == 50 and p[12:16] == a2b(topo.care_of["b"][0])]
    assert sius and esp
    topo.move("a")
    assert wait_registered(topo, 2.0)
    gw = restart_gateway(topo)     # manual keys: same SAs, fresh replay windows, FRESH binding
    start_streams(topo, interval_s=0.01, start=topo.sim.now + 0.2, stop=topo.sim.now + 0.6)
    rogue = Host(topo.sim, "rogue")
    rogue.add_interface("home", "10.1.0.66", topo.home)
    out = Host(topo.sim, "rogue-out")
    out.add_interface("out", "172.16.0.66", topo.outside)
    for packet in esp[:1]:        # the request goes through again: a restarted GW's window is new
        out.interfaces["out"].segment.transmit(packet, a2b(gw.outside), out.interfaces["out"])
    topo.sim.run_for(0.02)
    for packet in sius:
        rogue.interfaces["home"].segment.transmit(packet, a2b(gw.inside), rogue.interfaces["home"])
    topo.sim.run_for(0.05)
    mobile = gw.mobiles[mn.home_address]
    # (the replayed request also reached the HA, whose 133 reply rode in an old-epoch SIU too)
    assert gw.drops[R.SIU_STALE_EPOCH] >= len(sius)
    assert mobile.state.value == "fresh" and mobile.outbound.remote == "0.0.0.0"
    # the refusals were ACKed with the new epoch (flag E): the HA knows it now, and the MN's
    # next registration binds the SA at once
    assert topo.ha.role.siu.gw_epoch[gw.inside] == gw.epoch
    topo.move("b")
    assert wait_registered(topo, 3.0)
    assert mobile.care_of == topo.care_of["b"][0] and mobile.outbound.remote == mobile.care_of
    # a replay of a recorded SIU now: a number the window has seen, refused as a replay
    replayed = gw.drops[R.SIU_REPLAYED]
    for packet in sius:
        rogue.interfaces["home"].segment.transmit(packet, a2b(gw.inside), rogue.interfaces["home"])
    topo.sim.run_for(0.05)
    assert gw.drops[R.SIU_REPLAYED] == replayed + len(sius)
    assert mobile.care_of == topo.care_of["b"][0]


def test_after_a_gw_restart_the_ha_resends_its_siu_with_the_new_epoch():
    topo = _registered_at_a(1)
    topo.move("b")
    assert wait_registered(topo, 2.0)
    gw = restart_gateway(topo)
    topo.move("a")
    topo.sim.run_for(0.5)
    mn, ha = topo.mn.role, topo.ha.role
    move = tl.split_handovers(tl.merge(mn.timeline, gw.timeline, ha.timeline))[-1]
    # the HA's SIU named the old epoch: refused and ACKed with E; the HA sent it again at once
    # (a correction, with the reply inside) and the GW bound the SA
    assert tl.in_order(move, ["rrq-forwarded", "siu-sent", "siu-refused", "siu-sent",
                              "gw-sa-repointed", "rrp-forwarded"]), tl.format_table(move)
    assert tl.first(move, "siu-refused").detail["reason"] == str(R.SIU_STALE_EPOCH)
    assert tl.first(move, "siu-sent", correction=True) is not None
    assert gw.mobiles[mn.home_address].outbound.remote == topo.care_of["a"][0]
    assert gw.drops == {R.SIU_STALE_EPOCH: 1}


def test_ack_of_a_stale_epoch_sets_e_and_carries_the_new_epoch():
    topo = _registered_at_a(1)
    gw, ha, mn = topo.gw.role, topo.ha.role, topo.mn.role
    data = ha._signers[gw.inside].build(home_address=mn.home_address, old_care_of=mn.care_of,
                                        new_care_of=mn.care_of, gateway_spi=0, lifetime=600,
                                        wallclock=ha.wallclock(), gateway_epoch=gw.epoch ^ 1)
    before = _gw_state(topo)
    out = gw.receive_siu(build_udp_packet(a2b(ha.address), a2b(gw.inside), SIU_PORT, SIU_PORT,
                                          data), topo.sim.now)
    (ack,) = [a.packet for a in out if isinstance(a, SendToNet)]
    siu = parse_siu(ack[28:])
    assert siu.flags & SiuFlags.STALE_EPOCH and siu.gateway_epoch == gw.epoch
    assert gw.drops == {R.SIU_STALE_EPOCH: 1} and _gw_state(topo) == before
    # the same SIU again is a replay: counted only, no second ACK
    assert gw.receive_siu(build_udp_packet(a2b(ha.address), a2b(gw.inside), SIU_PORT, SIU_PORT,
                                           data), topo.sim.now) == []
    assert gw.drops == {R.SIU_STALE_EPOCH: 1, R.SIU_REPLAYED: 1}


def test_ha_restart_its_new_sius_are_neither_replays_nor_stale():
    topo = _registered_at_a(1)
    gw = topo.gw.role
    topo.sim.run_for(5.0)
    old = topo.ha.role
    new = HomeAgent(old.config, wallclock=old.wallclock)   # forgets the epoch and sequences
    topo.ha.role = new
    topo.ha.driver.role = new
    topo.move("b")
    assert wait_registered(topo, 2.0)
    mn = topo.mn.role
    assert gw.mobiles[mn.home_address].care_of == topo.care_of["b"][0]
    # (a restarted HA that lost its bindings names no old CoA: the GW refuses that one as
    # stale and the HA corrects it from the ACK; never a replay, never a stale epoch)
    assert set(gw.drops) <= {R.SIU_STALE_CARE_OF}
    move = tl.split_handovers(tl.merge(mn.timeline, gw.timeline, new.timeline))[-1]
    assert [e.kind for e in move].count("rrq-sent") == 1
    assert new.siu.gw_epoch[gw.inside] == gw.epoch               # learnt from the first ACK


# --- reordering on the home link -----------------------------------------------------------------

def test_forty_mns_moving_at_once_with_reordering_cost_no_retransmission():
    topo = build_topology(40, internet_delay_s=0.005, seed=7, with_apps=False)
    for i in range(40):
        topo.move("a", i)
    assert wait_registered(topo, 5.0)
    topo.home.reorder, topo.home.reorder_extra_s = 0.5, 0.001
    reordered = topo.home.counters["reordered"]
    t0 = topo.sim.now
    for i in range(40):
        topo.move("b", i)
    assert wait_registered(topo, 2.0)
    assert topo.home.counters["reordered"] - reordered >= 20
    gw, ha = topo.gw.role, topo.ha.role
    for i, host in enumerate(topo.mobiles):
        mn = host.role
        assert gw.mobiles[mn.home_address].care_of == topo.care_of["b"][i]
        sent = [e for e in mn.timeline if e.kind == "rrq-sent" and e.time >= t0]
        assert len(sent) == 1, (i, sent)                     # no retransmission
    assert not gw.drops and not ha.drops


# --- NAT-T floating ---------------------------------------------------------------------------------

def test_ike_address_change_moves_no_esp_sa_in_siu_mode():
    topo = build_topology(1, internet_delay_s=0.005, seed=5, sa_source="ikev2")
    topo.move("a")
    assert wait_registered(topo, 3.0)
    gw, mn = topo.gw.role, topo.mn.role
    mobile = gw.mobiles[mn.home_address]
    before = (mobile.care_of, mobile.outbound.remote)
    (ike_sa,) = gw.ike.endpoint.ike_sas
    # what the IKE SA reports after it followed a relayed request from a third address (a NAT-T
    # float, RFC 7296 §2.23): the IKE SA may follow, the ESP SA must not
    ev = PeerAddressChanged(ike_sa.ike_id, ike_sa.peer_id, ike_sa.local, ("172.16.0.99", 4500),
                            explicit=False)
    assert gw._ike_event(ev, topo.sim.now) == []
    assert (mobile.care_of, mobile.outbound.remote) == before
    assert gw.drops == {R.ESP_MOVE_NOT_BY_SIU: 1}
    # an explicit UPDATE_SA_ADDRESSES does not move it in SIU mode either
    ev = PeerAddressChanged(ike_sa.ike_id, ike_sa.peer_id, ike_sa.local, ("172.16.0.99", 4500),
                            explicit=True)
    assert gw._ike_event(ev, topo.sim.now) == []
    assert (mobile.care_of, mobile.outbound.remote) == before
    assert gw.drops == {R.ESP_MOVE_NOT_BY_SIU: 2}
    assert tl.first(gw.timeline, "gw-esp-not-moved") is not None


def test_relayed_ike_request_from_a_third_address_moves_only_the_ike_sa():
    """The attack as seen on the wire: ESP in UDP (NAT-T), an on-path attacker sends the MN's
    authenticated IKE request on from its own address before the original arrives."""
    from mipsec.node.ike import RoleIke
    topo = build_topology(1, internet_delay_s=0.005, seed=5, sa_source="ikev2",
                          ike={"force_encap": True})
    topo.move("a")
    assert wait_registered(topo, 3.0)
    gw, mn = topo.gw.role, topo.mn.role
    mobile = gw.mobiles[mn.home_address]
    (gw_ike,) = gw.ike.endpoint.ike_sas
    assert gw_ike.nat_remote and mobile.outbound.udp_encap is not None
    (mn_ike,) = mn.ike.endpoint.ike_sas
    actions, _events = RoleIke.run(mn_ike.check_liveness(topo.sim.now))
    (request,) = [a.packet for a in actions if isinstance(a, SendToNet)]
    relayed = _nat(request, "172.16.0.99", 4500)          # only the outer source changes
    relay = Host(topo.sim, "relay")
    relay.add_interface("out", "172.16.0.99", topo.outside)
    relay.interfaces["out"].segment.transmit(relayed, a2b(gw.outside), relay.interfaces["out"])
    topo.sim.run_for(0.01)
    assert gw_ike.remote[0] == "172.16.0.99"               # the IKE SA followed (RFC 7296 §2.23)
    assert mobile.outbound.remote == mn.care_of            # the ESP SA did not
    assert gw.drops[R.ESP_MOVE_NOT_BY_SIU] == 1
    start_streams(topo, interval_s=0.01, start=topo.sim.now + 0.05, stop=topo.sim.now + 0.45)
    topo.sim.run_for(0.6)
    assert mobile.outbound.remote == mn.care_of
    rep = stream_reports(topo)["downlink"]
    assert rep.sent == 40 and rep.received == 40, rep


# --- bounded state --------------------------------------------------------------------------------

def test_udp_to_port_434_flood_keeps_the_timeline_bounded_per_mn_and_status_cheap():
    topo = _registered_at_a(2)
    gw = topo.gw.role
    victim, flooder = topo.mobiles[0].role, topo.mobiles[1].role
    victim_events = [e for e in gw.timeline if e.detail.get("home_address") == victim.home_address]
    assert victim_events
    rrq = _rrq_for(flooder, flooder.care_of)
    sa = flooder.outbound
    n = 3 * tl.TIMELINE_MAX_EVENTS
    for _ in range(n):
        gw.receive_from_net(sa.encapsulate(rrq, topo.sim.now), topo.sim.now)
    assert gw.mobiles[flooder.home_address].packets_up >= n
    assert len(gw.timeline) <= tl.TIMELINE_MAX_EVENTS
    mine = [e for e in gw.timeline if e.detail.get("home_address") == flooder.home_address]
    assert len(mine) <= tl.TIMELINE_MAX_EVENTS - tl.TIMELINE_KEEP_EVENTS \
        + tl.TIMELINE_EVENTS_PER_MOBILE
    # the victim's handover is still there
    kept = [e for e in gw.timeline if e.detail.get("home_address") == victim.home_address]
    assert kept == victim_events
    # per-MN structures stay small, and status is small whatever the flood
    assert len(gw.mobiles[flooder.home_address].rrq_sources) <= 4
    assert len(json.dumps(gw.status(), default=str)) < 20_000


def test_status_is_bounded_whatever_the_number_of_mns():
    from mipsec.node.gateway import STATUS_MOBILES
    lab = make_lab_configs(STATUS_MOBILES + 40, keys_from=random.Random(2))
    gw = VpnGateway(lab.gateway)
    status = gw.status()
    assert len(status["mobiles"]) == STATUS_MOBILES
    assert status["mobiles_total"] == STATUS_MOBILES + 40
    assert status["bindings"] == {"fresh": STATUS_MOBILES + 40}
