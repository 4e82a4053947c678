"""IKEv2 inside the roles, in the in-memory network (deterministic, virtual clock).

The MN negotiates its SA pair with the GW from its care-of address; the GW installs each child
for the MN named by the IKE identity, with a wildcard inbound source; the HA does not know the
GW's SPI in advance and learns it from the GW's SIU ACKs (docs/protocol.md §2.2).
"""

from mipsec.drops import DropReason
from mipsec.ike.constants import CHILD_SA_DELETE_GRACE_S
from mipsec.ike.sa import State as IkeState
from mipsec.mip.constants import SIU_PORT
from mipsec.mobility.registration import IKE_FALLBACK_ATTEMPTS
from mipsec.node import timeline as tl
from mipsec.node.config import LAB_SPI_GW_TO_MN, LAB_SPI_MN_TO_GW
from mipsec.node.mobile_node import RegState
from mipsec.sim.scenario import gw_log, merged_timeline, start_streams, stream_reports, wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.siu import SiuType, parse_siu

HANDOVER_STEPS = ["coa-changed", "sa-repointed", "rrq-sent", "rrq-forwarded", "rrq-accepted",
                  "siu-sent", "gw-sa-repointed", "rrp-forwarded", "rrp-received",
                  "first-downlink-at-new-coa"]


def _topo(**kw):
    kw.setdefault("internet_delay_s", 0.010)
    kw.setdefault("seed", 1)
    return build_topology(1, sa_source="ikev2", **kw)


def _sius(capture, kind=None):
    out = []
    for t, _sender, packet in capture:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] == 17 and int.from_bytes(packet[ihl + 2:ihl + 4], "big") == SIU_PORT:
            siu = parse_siu(packet[ihl + 8:])
            if kind is None or siu.type == kind:
                out.append((t, siu))
    return out


def _check_esp_follows_binding(topo):
    """Every ESP packet the GW sends goes to the CoA of its latest rebind (IKE packets aside)."""
    current, sends = None, 0
    for _pos, _t, kind, dst in gw_log(topo):
        if kind == "rebind":
            current = dst
        elif kind == "send":
            assert dst == current, (dst, current)
            sends += 1
    assert sends > 0


def test_ike_negotiated_stream_two_handovers_and_return_home():
    topo = _topo()
    mn, gw, ha = topo.mn.role, topo.gw.role, topo.ha.role
    a = topo.care_of["a"][0]
    capture = topo.home.start_capture()
    assert mn.inbound is None and mn.outbound is None and gw.mobiles == {}
    topo.move("a")
    assert wait_registered(topo, 2.0)
    # the SA pair came from IKEv2: SPIs are not the lab's manual ones, both ends agree
    m = gw.mobiles[mn.home_address]
    assert mn.outbound.spi == m.inbound.spi and mn.inbound.spi == m.outbound.spi
    assert m.inbound.spi & 0xFFFF0000 not in (LAB_SPI_MN_TO_GW, LAB_SPI_GW_TO_MN)
    assert m.inbound.remote is None                      # wildcard source at the GW
    (ike_mn,) = mn.ike.endpoint.ike_sas
    (ike_gw,) = gw.ike.endpoint.ike_sas
    assert ike_mn.is_established and ike_gw.is_established
    assert ike_gw.peer_id == "mn@mipsec.lab" and ike_mn.local[0] == a
    # the HA knew no SPI: its first SIU says 0, the ACK teaches it the negotiated one
    first = _sius(capture, SiuType.UPDATE)[0][1]
    assert first.gateway_spi == 0
    assert ha._mobiles[mn.home_address].gateway_spi == m.outbound.spi
    steps = [e.kind for e in merged_timeline(topo)]
    assert tl.in_order(merged_timeline(topo), ["coa-changed", "ike-initiated", "gw-sas-installed",
                                                "ike-established", "sas-installed", "rrq-sent",
                                                "siu-sent", "gw-sa-repointed", "rrp-forwarded",
                                                "gateway-spi-learned", "rrp-received"]), steps

    start_streams(topo, interval_s=0.001, start=0.5, stop=3.5)
    topo.sim.run(until=1.0)
    topo.move("b")
    topo.sim.run(until=2.0)
    topo.move("a")
    topo.sim.run(until=3.0)
    topo.move("home")
    topo.sim.run(until=4.0)

    moves = tl.split_handovers(merged_timeline(topo))
    assert [mv[0].kind for mv in moves] == ["coa-changed"] * 3 + ["returned-home"]
    for move in moves[1:3]:
        assert tl.in_order(move, HANDOVER_STEPS), tl.format_table(move)
    # later SIUs name the learned SPI, and the IKE SAs followed the CoA on both ends
    assert all(s.gateway_spi == m.outbound.spi for _t, s in _sius(capture, SiuType.UPDATE)[1:])
    assert ike_gw.remote[0] == a and ike_mn.local[0] == a
    _check_esp_follows_binding(topo)
    rep = stream_reports(topo, since=0.5, until=3.0)
    bound = topo.round_trip_s + 0.001
    assert rep["downlink"].longest_interruption_s <= bound + 0.001, rep
    assert rep["uplink"].lost == 0, rep
    assert mn.state is RegState.AT_HOME and m.care_of is None
    assert sum(mn.drops.values()) == 0 and sum(ha.drops.values()) == 0, (mn.drops, ha.drops)


def test_child_and_ike_rekeys_after_a_handover_keep_the_current_care_of():
    # short lifetimes: the MN re-keys its child at ~1.5 s, its IKE SA at ~2.5 s (after the
    # handover at 1.0 s); the GW, original responder, waits 10 % longer and is preempted
    topo = _topo(ike={"child_lifetime_s": 1.5, "ike_lifetime_s": 2.5, "dpd_interval_s": 0})
    mn, gw = topo.mn.role, topo.gw.role
    b = topo.care_of["b"][0]
    topo.move("a")
    assert wait_registered(topo, 2.0)
    m = gw.mobiles[mn.home_address]
    first_out = m.outbound.spi
    start_streams(topo, interval_s=0.001, start=0.2, stop=4.0)
    topo.sim.run(until=1.0)
    topo.move("b", make_before_break=True)        # loses nothing: every loss would be a re-key's
    topo.sim.run(until=4.2)

    kinds = [e.kind for e in mn.timeline]
    assert kinds.count("sas-rekeyed") >= 2 and "ike-rekeyed" in kinds, kinds
    assert [e for e in gw.timeline if e.kind == "gw-sas-rekeyed"]
    assert "gw-sas-installed" not in [e.kind for e in gw.timeline[1:]]   # no re-install
    # every re-key after the handover was made at the current CoA on both ends
    for e in gw.timeline:
        if e.kind == "gw-sas-rekeyed":
            assert e.detail["care_of"] == b, e
    assert m is gw.mobiles[mn.home_address] and m.care_of == b
    assert m.outbound.spi != first_out and m.outbound.remote == b
    assert mn.outbound.spi == m.inbound.spi and mn.inbound.spi == m.outbound.spi
    assert mn.outbound.local == b and mn.inbound.local == b
    live = [sa for sa in mn.ike.endpoint.ike_sas if sa.state != IkeState.CLOSED]
    assert len(live) == 1 and live[0].local[0] == b
    gw_live = [sa for sa in gw.ike.endpoint.ike_sas if sa.state != IkeState.CLOSED]
    assert len(gw_live) == 1 and gw_live[0].remote[0] == b and m.ike_id == gw_live[0].ike_id
    # old inbound SAs were deleted with their children; each is kept only for the grace
    # period after its Delete (ESP may still be queued behind it), then forgotten
    assert set(gw.sad.by_spi) - {m.inbound.spi} <= set(gw.book.retired)
    assert set(mn._inbound_sas) - {mn.inbound.spi} <= set(mn.book.retired)
    topo.sim.run(until=4.2 + CHILD_SA_DELETE_GRACE_S)
    assert set(gw.sad.by_spi) - {m.inbound.spi} <= set(gw.book.retired)
    assert all(at > 4.2 for at in gw.book.retired.values()), gw.book.retired
    rep = stream_reports(topo, since=1.1, until=4.0)
    assert rep["downlink"].lost == 0 and rep["uplink"].lost == 0, rep
    assert mn.state is RegState.REGISTERED
    assert DropReason.UNKNOWN_SPI not in gw.sad.drops and sum(mn.drops.values()) == 0


def test_stale_gateway_spi_after_a_rekey_is_accepted_and_corrected_by_the_ack():
    topo = _topo(ike={"child_lifetime_s": 1.0, "ike_lifetime_s": 100.0, "dpd_interval_s": 0})
    mn, gw, ha = topo.mn.role, topo.gw.role, topo.ha.role
    capture = topo.home.start_capture()
    topo.move("a")
    assert wait_registered(topo, 2.0)
    learned = ha._mobiles[mn.home_address].gateway_spi
    topo.sim.run(until=1.5)                        # the child is re-keyed: the GW's SPI changes
    m = gw.mobiles[mn.home_address]
    assert m.outbound.spi != learned and learned in m.lineage
    assert ha._mobiles[mn.home_address].gateway_spi == learned      # the HA does not know yet
    topo.move("b")
    assert wait_registered(topo, 1.0)
    last_t, last = _sius(capture, SiuType.UPDATE)[-1]
    assert last.gateway_spi == learned             # stale, but an earlier SPI of this MN's pair
    assert m.care_of == topo.care_of["b"][0] and DropReason.SIU_UNKNOWN_SA not in gw.drops
    acks = [s for _t, s in _sius(capture, SiuType.ACK) if s.sequence == last.sequence]
    assert acks and acks[0].gateway_spi == m.outbound.spi
    assert ha._mobiles[mn.home_address].gateway_spi == m.outbound.spi


def test_a_lost_siu_makes_the_ha_name_the_current_sa_by_zero():
    topo = _topo()
    mn, gw = topo.mn.role, topo.gw.role
    capture = topo.home.start_capture()
    topo.move("a")
    assert wait_registered(topo, 2.0)
    spi = gw.mobiles[mn.home_address].outbound.spi

    def is_siu(packet):
        return packet[9] == 17 and int.from_bytes(packet[22:24], "big") == SIU_PORT \
            and packet[16:20] == bytes([10, 1, 0, 1])
    topo.home.drop_next(is_siu)
    topo.move("b")
    assert wait_registered(topo, 3.0)
    updates = [s for _t, s in _sius(capture, SiuType.UPDATE)]
    assert [s.gateway_spi for s in updates[-2:]] == [spi, 0]
    assert gw.mobiles[mn.home_address].care_of == topo.care_of["b"][0]


def test_gw_restart_registrations_fail_then_reestablishment_from_the_new_coa_repairs():
    """The GW daemon restarts and loses its IKE and ESP SAs.  The MN moves: its RRQs die at the
    GW as unknown SPI, it retransmits, gives up after IKE_FALLBACK_ATTEMPTS (its SAs date from
    the old CoA), re-establishes IKE from its new CoA (INITIAL_CONTACT), registers through the
    new SAs and the stream resumes."""
    from mipsec.sim.scenario import restart_gateway
    topo = _topo(ike={"dpd_interval_s": 0})
    mn, ha = topo.mn.role, topo.ha.role
    b = topo.care_of["b"][0]
    topo.move("a")
    assert wait_registered(topo, 2.0)
    start_streams(topo, interval_s=0.01, start=0.2, stop=60.0)
    topo.sim.run(until=1.0)
    gw = restart_gateway(topo)
    topo.sim.run(until=1.5)
    topo.move("b")
    topo.sim.run(until=60.0)

    events = mn.timeline
    kinds = [e.kind for e in events]
    i_move = kinds.index("coa-changed", 1)
    after = kinds[i_move:]
    fallback = min(IKE_FALLBACK_ATTEMPTS, mn.config.max_attempts)
    assert after.count("rrq-sent") == fallback + 1        # then one through the new SAs
    assert tl.in_order(events[i_move:], ["coa-changed", "rrq-sent", "rrq-retransmitted",
                                         "registration-failed", "reestablish-requested",
                                         "ike-reestablish", "ike-established", "sas-installed",
                                         "rrq-sent", "rrp-received"]), after
    assert gw.drops[DropReason.UNKNOWN_SPI] >= fallback
    t_fail = next(e.time for e in events if e.kind == "reestablish-requested")
    t_ok = next(e.time for e in events if e.kind == "rrp-received" and e.time > t_fail)
    assert mn.state is RegState.REGISTERED
    ike = next(e for e in events if e.kind == "ike-reestablish")
    assert ike.detail["care_of"] == b
    m = gw.mobiles[mn.home_address]
    ike = gw.ike.endpoint.info(m.ike_id)
    assert m.care_of == b and ike.remote[0] == b and ike.peer_id == "mn@mipsec.lab"
    assert ha.bindings[mn.home_address].care_of_address == b
    # the old IKE SA is gone at the MN (replaced), one live IKE SA on each end
    assert len([s for s in mn.ike.endpoint.ike_sas if s.state != IkeState.CLOSED]) == 1
    rep = stream_reports(topo, since=t_ok + 0.1, until=59.0)
    assert rep["downlink"].longest_interruption_s <= 0.011, rep     # 10 ms stream: no gap
    assert rep["uplink"].longest_interruption_s <= 0.011, rep
    assert rep["downlink"].interruption_to is not None


def test_mobike_mode_handover_gw_moves_by_mobike_and_the_siu_confirms():
    topo = _topo(handover_mode="mobike")
    mn, gw, ha = topo.mn.role, topo.gw.role, topo.ha.role
    a, b = topo.care_of["a"][0], topo.care_of["b"][0]
    topo.move("a")
    assert wait_registered(topo, 2.0)
    (ike_gw,) = gw.ike.endpoint.ike_sas
    assert ike_gw.peer_mobike
    start_streams(topo, interval_s=0.001, start=0.5, stop=2.5)
    topo.sim.run(until=1.0)
    topo.move("b")
    topo.sim.run(until=1.5)
    topo.move("a")
    topo.sim.run(until=3.0)

    moves = tl.split_handovers(merged_timeline(topo))
    for move, (old, new) in zip(moves[1:3], [(a, b), (b, a)], strict=True):
        assert tl.in_order(move, ["coa-changed", "sa-repointed", "mobike-update-sent",
                                  "gw-sa-moved-by-mobike", "rrq-forwarded", "rrq-accepted",
                                  "siu-sent", "gw-siu-confirms-mobike", "rrp-forwarded",
                                  "rrp-received"]), tl.format_table(move)
        moved = tl.first(move, "gw-sa-moved-by-mobike")
        assert (moved.detail["old"], moved.detail["new"]) == (old, new)
        assert "gw-sa-repointed" not in [e.kind for e in move]        # "already there"
    m = gw.mobiles[mn.home_address]
    assert m.care_of == a and ike_gw.remote[0] == a and not m.mobike_moved   # SIU confirmed
    assert ha.bindings[mn.home_address].care_of_address == a
    assert DropReason.SIU_STALE_CARE_OF not in gw.drops
    _check_esp_follows_binding(topo)
    rep = stream_reports(topo, since=0.5, until=2.5)
    assert rep["uplink"].lost == 0, rep
    # MOBIKE moves the downlink after one MN -> GW trip (no GW -> HA -> GW detour): at most one
    # MN-GW round trip + 1 ms (the stream's spacing)
    mn_gw_round_trip = 2 * (topo.internet_delay_s + topo.lan_delay_s)
    assert rep["downlink"].longest_interruption_s <= mn_gw_round_trip + 0.001, rep


def test_home_and_away_again_ends_the_ike_sa_at_home_and_starts_one_on_leaving():
    """Going home ends the MN's IKE SA deliberately (it speaks from a care-of address the MN no
    longer has: it could be neither re-keyed nor checked), its child SAs with it, logged with
    the reason; leaving starts a new one at once, whose INITIAL_CONTACT makes the GW drop the
    old IKE SA and its children: both ends agree on the child SAs that exist.  (The IKE SA used
    to be kept, with its timers sending from the removed CoA, and the GW's copy died alone.)"""
    for mode in ("siu", "mobike"):
        topo = _topo(handover_mode=mode)
        mn, gw = topo.mn.role, topo.gw.role
        topo.move("a")
        assert wait_registered(topo, 2.0)
        (ike_mn,) = mn.ike.endpoint.ike_sas
        topo.move("home")
        assert wait_registered(topo, 1.0) and mn.state is RegState.AT_HOME
        assert ike_mn.state == IkeState.CLOSED and not ike_mn.children, mode
        assert mn.inbound is None and mn.outbound is None and not mn.book.pairs, mode
        ended = [e for e in mn.timeline if e.kind == "ike-ended"]
        assert ended and "at home" in ended[-1].detail["reason"], mode
        assert mn.get_timer() is None or mn.get_timer() > topo.sim.now + 60, mode  # nothing to send
        topo.sim.run_for(120.0)                      # long at home: not one IKE packet
        assert not [a for t, a in topo.mn.driver.log if t > topo.sim.now - 119
                    and a.__class__.__name__ == "SendToNet"], mode
        topo.move("b")
        assert wait_registered(topo, 1.0) and mn.state is RegState.REGISTERED, mode
        b = topo.care_of["b"][0]
        m = gw.mobiles[mn.home_address]
        assert m.care_of == b and m.outbound.remote == b, mode
        live_mn = [s for s in mn.ike.endpoint.ike_sas if s.state != IkeState.CLOSED]
        live_gw = [s for s in gw.ike.endpoint.ike_sas if s.state != IkeState.CLOSED]
        assert len(live_mn) == 1 and len(live_gw) == 1 and live_mn[0].local[0] == b, mode
        assert set(live_mn[0].children) == {c.spi_out for c in live_gw[0].children.values()}, mode
        assert mn.outbound.spi == m.inbound.spi and mn.inbound.spi == m.outbound.spi, mode
        start_streams(topo, interval_s=0.01, start=topo.sim.now + 0.01, stop=topo.sim.now + 0.5)
        topo.sim.run_for(0.7)
        rep = stream_reports(topo)
        assert rep["downlink"].lost == 0 and rep["uplink"].lost == 0, (mode, rep)


def test_garbage_on_the_ike_ports_never_raises_and_changes_nothing():
    import random as _random

    from mipsec.node.packet import a2b, build_udp_packet
    topo = _topo()
    mn, gw = topo.mn.role, topo.gw.role
    topo.move("a")
    assert wait_registered(topo, 2.0)
    rnd = _random.Random(3)
    ike_gw = gw.ike.endpoint.ike_sas[0]
    before = (ike_gw.state, ike_gw._mid_in, dict(ike_gw.children), gw.mobiles[mn.home_address].care_of,
              mn.outbound.spi, mn.state)
    cases = [b"", b"\x00\x00\x00\x00", b"\xff", bytes(28), rnd.randbytes(27), rnd.randbytes(300),
             ike_gw.spi_i + ike_gw.spi_r + bytes([0x2E, 0x20, 0x25, 0x08]) + bytes(4)
             + (28).to_bytes(4, "big")]
    for data in cases:
        for dport, payload in ((500, data), (4500, b"\x00\x00\x00\x00" + data), (4500, data)):
            for role, src, dst in ((gw, "172.16.1.10", gw.outside), (mn, gw.outside, "172.16.1.10")):
                pkt = build_udp_packet(a2b(src), a2b(dst), 500 if dport == 500 else 4500, dport,
                                       payload)
                role.receive_from_net(pkt, topo.sim.now)
                role.receive_from_net(pkt[:len(pkt) - 1], topo.sim.now)     # truncated UDP
    after = (ike_gw.state, ike_gw._mid_in, dict(ike_gw.children), gw.mobiles[mn.home_address].care_of,
             mn.outbound.spi, mn.state)
    assert before == after
    assert sum(gw.ike.endpoint.drops.values()) + sum(gw.drops.values()) + sum(gw.sad.drops.values()) > 0
    # and the tunnel still works
    topo.move("b")
    assert wait_registered(topo, 1.0)


def test_ha_refuses_registrations_mn_reestablishes_from_the_new_coa_and_traffic_resumes():
    """The re-establishment fallback in the simulator: the HA refuses the MN's registrations (its MN-HA key
    was changed by mistake: every RRQ fails authentication, RFC 5944 §3.8: no reply); the
    operator fixes it while the MN is still retrying; the MN gives up, re-establishes its
    tunnel with IKEv2 from its new CoA, registers and the stream resumes."""
    from mipsec.mip.security import MobilitySecurityAssociation
    topo = _topo(ike={"dpd_interval_s": 0})
    mn, gw, ha = topo.mn.role, topo.gw.role, topo.ha.role
    b = topo.care_of["b"][0]
    topo.move("a")
    assert wait_registered(topo, 2.0)
    spi = mn.config.msa.spi
    good = ha._msa_by_spi[spi]
    ha._msa_by_spi[spi] = (MobilitySecurityAssociation(spi, b"\x55" * 16, "hmac-md5"), good[1])
    start_streams(topo, interval_s=0.01, start=0.5, stop=45.0)
    topo.sim.run(until=1.0)
    old_ike = mn.ike.endpoint.ike_sas[0]
    topo.move("b")
    topo.sim.run(until=20.0)
    assert ha.drops[DropReason.MIP_AUTH_FAILED] >= 4 and mn.state is RegState.REGISTERING
    ha._msa_by_spi[spi] = good                        # fixed before the MN gives up
    topo.sim.run(until=45.0)
    events = mn.timeline
    kinds = [e.kind for e in events]
    assert tl.in_order(events, ["coa-changed", "rrq-retransmitted", "registration-failed",
                                "reestablish-requested", "ike-reestablish", "ike-established",
                                "sas-installed", "rrq-sent", "rrp-received"]), kinds
    reest = tl.first(events, "ike-reestablish")
    assert reest.detail["care_of"] == b
    assert old_ike.state == IkeState.CLOSED and mn._ike_id != old_ike.ike_id
    assert mn.ike.endpoint.info(mn._ike_id).local[0] == b and mn.state is RegState.REGISTERED
    m = gw.mobiles[mn.home_address]
    assert m.care_of == b and gw.ike.endpoint.info(m.ike_id).remote[0] == b
    assert ha.bindings[mn.home_address].care_of_address == b
    t_ok = max(e.time for e in events if e.kind == "rrp-received")
    rep = stream_reports(topo, since=t_ok + 0.05, until=44.9)
    assert rep["downlink"].longest_interruption_s <= 0.011, rep
    assert rep["uplink"].longest_interruption_s <= 0.011, rep


def test_siu_path_down_reestablished_sas_carry_the_downlink_without_an_siu():
    """The HA->GW SIU path drops everything: after a move the MN gets no reply, gives up and
    re-establishes IKE from its new CoA.  The GW binds the new pair to where IKE_AUTH came from,
    so the downlink flows again through the new SA although no SIU ever reaches the GW."""
    topo = _topo(ike={"dpd_interval_s": 0})
    mn, gw = topo.mn.role, topo.gw.role
    b = topo.care_of["b"][0]
    gw_inside = bytes(int(x) for x in gw.inside.split("."))
    topo.move("a")
    assert wait_registered(topo, 2.0)
    start_streams(topo, interval_s=0.01, start=0.5, stop=45.0)
    topo.sim.run(until=1.0)
    first_out = gw.mobiles[mn.home_address].outbound.spi
    sius_seen = [e for e in gw.timeline if e.kind == "gw-sa-repointed"]
    topo.home.drop_next(lambda p: p[9] == 17 and p[16:20] == gw_inside
                        and int.from_bytes(p[22:24], "big") == SIU_PORT, count=100000)
    topo.move("b")
    topo.sim.run(until=45.0)
    kinds = [e.kind for e in mn.timeline]
    assert tl.in_order(mn.timeline, ["coa-changed", "registration-failed",
                                     "reestablish-requested", "ike-reestablish",
                                     "ike-established", "sas-installed"]), kinds
    m = gw.mobiles[mn.home_address]
    assert m.outbound.spi != first_out                       # the re-established pair ...
    assert m.outbound.remote == b and m.care_of == b         # ... bound by IKE, not by an SIU
    assert m.state.value == "ike-bound"
    assert [e for e in gw.timeline if e.kind == "gw-sa-repointed"] == sius_seen
    bound = [e for e in gw.timeline if e.kind == "gw-sa-bound-by-ike"][-1]
    assert bound.detail["remote"] == b and bound.detail["spi"] == m.outbound.spi
    since = bound.time + 0.5
    rep = stream_reports(topo, since=since, until=44.9)
    # the downlink flows through the IKE-bound pair: (nearly) every datagram of the window
    # arrives, without a gap (an SA that is bound but not used for the downlink gives none)
    arrived = [at for _sid, _seq, _st, at in topo.mn.app.arrivals if since <= at <= 44.9]
    assert len(arrived) >= 0.95 * (44.9 - since) / 0.01, (len(arrived), dict(gw.drops))
    assert rep["downlink"].longest_interruption_s <= 0.05, rep


def test_ike_packet_with_bad_udp_framing_is_one_counted_drop():
    """An IKE packet whose UDP header does not parse (length past the packet): the GW and the MN
    count BAD_UDP_LENGTH once, send nothing and keep their IKE state."""
    from mipsec.node.packet import a2b, build_udp_packet

    topo = _topo()
    topo.move("a")
    wait_registered(topo)
    gw, mn = topo.gw.role, topo.mn.role
    for role, dst, port in ((gw, gw.config.outside_address, 500), (mn, mn.care_of, 4500)):
        packet = bytearray(build_udp_packet(a2b("192.0.2.66"), a2b(dst), port, port,
                                            bytes(4) + bytes(40)))
        packet[24:26] = (200).to_bytes(2, "big")          # UDP length past the end
        before = role.drops[DropReason.BAD_UDP_LENGTH]
        ike_before = role.ike.status()
        assert role.receive_from_net(bytes(packet), topo.sim.now) == []
        assert role.drops[DropReason.BAD_UDP_LENGTH] == before + 1
        assert role.ike.status() == ike_before
