"""IKEv2 between two mipsec endpoints in memory: INIT + AUTH, ESP SAs that work, cookies,
retransmission, message-ID window, tampering, re-keys, delete, liveness, NAT, MOBIKE."""


import pytest

from ike_harness import GW_ADDR, MN_ADDR, configs, establish
from mipsec.drops import DropReason
from mipsec.ike import codec
from mipsec.ike.codec import TrafficSelector as TS
from mipsec.ike.constants import NON_ESP_MARKER, DhGroup, ExchangeType, NotifyType, PayloadType
from mipsec.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
    PeerAddressChanged,
    SendDatagram,
)
from mipsec.ike.proposals import parse_esp_suite, parse_ike_suite
from mipsec.ike.sa import State
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4

INNER_UP = build_ipv4(Ipv4Header("10.1.0.100", "10.1.0.10", 17), b"\x12\x34\x56\x78\x00\x0c\x00\x00up!!")
INNER_DOWN = build_ipv4(Ipv4Header("10.1.0.10", "10.1.0.100", 17), b"\x56\x78\x12\x34\x00\x0c\x00\x00down")


def inject(ep, raw, local, remote):
    """Hand ``raw`` to ``ep`` as received on ``local`` (with the non-ESP marker on 4500)."""
    return ep.receive_datagram((b"" if local[1] == 500 else NON_ESP_MARKER) + raw, local, remote, 0.0)


def hold_first(match):
    """(held, tap): a tap for ``establish`` that keeps back the first datagram ``match`` accepts
    (a lost packet) and appends it to ``held``; every other datagram passes."""
    held = []

    def tap(d):
        if not held and match(d):
            held.append(d)
            return None
        return d
    return held, tap


def only_sa(ep):
    (sa,) = [s for s in ep.ike_sas if s.state != State.CLOSED]
    return sa


def only_child(ep):
    (child,) = only_sa(ep).children.values()
    return child


def assert_esp_works(I, R):
    ci, cr = only_child(I), only_child(R)
    assert ci.spi_in == cr.spi_out and ci.spi_out == cr.spi_in
    i_in, i_out = ci.make_sas()
    r_in, r_out = cr.make_sas()
    assert r_in.decapsulate(i_out.encapsulate(INNER_UP)) == INNER_UP
    assert i_in.decapsulate(r_out.encapsulate(INNER_DOWN)) == INNER_DOWN


SUITES = [
    ("aes256-sha256-prfsha256-ecp256", "aes128-sha256"),
    ("aes128gcm16-prfsha256-x25519", "aes256gcm16"),
    ("aes128-sha256-prfsha256-modp2048", "aes128gcm16"),
    ("aes256gcm16-prfsha256-ecp256", "aes256-sha256"),
]


@pytest.mark.parametrize("ike,esp", SUITES)
def test_init_and_auth_give_two_working_esp_sa_pairs(ike, esp):
    net, I, R = establish(ike_suites=(parse_ike_suite(ike),), esp_suites=(parse_esp_suite(esp),))
    assert [type(e) for w, e in net.events if w == MN_ADDR] == [IkeSaEstablished, ChildSaEstablished]
    assert [type(e) for w, e in net.events if w == GW_ADDR] == [IkeSaEstablished, ChildSaEstablished]
    si, sr = only_sa(I), only_sa(R)
    assert si.keys == sr.keys and si.suite == sr.suite == parse_ike_suite(ike)
    assert si.peer_id == "gw.example" and sr.peer_id == "mn@example"
    assert only_child(I).suite == parse_esp_suite(esp)
    # the responder narrowed 10.1.0.0/24 x 0/0 against the initiator's 10.1.0.100/32
    assert only_child(R).remote_ts == (TS.from_network("10.1.0.100/32"),)
    assert_esp_works(I, R)
    assert not I.drops and not R.drops


def test_child_keys_follow_rfc7296_2_17_order():
    net, I, R = establish(esp_suites=(parse_esp_suite("aes128-sha256"),))
    from mipsec.ike.crypto import child_keymat
    sa = only_sa(I)
    km = child_keymat(sa.suite.prf, sa.keys.sk_d, sa.ni, sa.nr, 2 * (16 + 32))
    ci = only_child(I)
    # initiator -> responder encryption, integrity, then responder -> initiator
    assert (ci.keys.encr_out, ci.keys.integ_out, ci.keys.encr_in, ci.keys.integ_in) == \
        (km[:16], km[16:48], km[48:64], km[64:96])


def test_gcm_child_key_includes_salt():
    net, I, R = establish(esp_suites=(parse_esp_suite("aes128gcm16"),))
    assert len(only_child(I).keys.encr_out) == 20 and only_child(I).keys.integ_out == b""


def test_wrong_ke_group_is_corrected_by_invalid_ke_payload():
    net, I, R = establish(
        i_ike_suites=(parse_ike_suite("aes128-sha256-x25519"), parse_ike_suite("aes128-sha256-modp2048")),
        r_ike_suites=(parse_ike_suite("aes128-sha256-modp2048"),))
    assert only_sa(I).suite.dh == DhGroup.MODP_2048
    # the first KE was in the wrong group: counted as such, not as a proposal mismatch (the
    # round is normal, RFC 7296 §1.2, and "no proposal chosen" makes the operator look for one)
    assert R.drops[DropReason.IKE_INVALID_KE_PAYLOAD] == 1
    assert DropReason.IKE_NO_PROPOSAL_CHOSEN not in R.drops and not I.drops
    assert_esp_works(I, R)


def test_no_proposal_chosen_fails_the_initiator_once_retransmissions_are_over():
    net, I, R = establish(i_ike_suites=(parse_ike_suite("aes128-sha256-x25519"),),
                          r_ike_suites=(parse_ike_suite("aes256gcm16-modp2048"),))
    # §2.21.1: the unprotected refusal could be forged, so the initiator keeps trying
    assert only_sa(I).state == State.INIT_SENT and not R.ike_sas
    net.run_timers(40.0)
    assert [e.reason for e in net.of(IkeSaFailed, MN_ADDR)] == ["IKE_SA_INIT refused: NO_PROPOSAL_CHOSEN"]
    assert not I.ike_sas and R.drops[DropReason.IKE_NO_PROPOSAL_CHOSEN] == 6


def test_forged_init_error_does_not_stop_a_good_answer():
    from mipsec.ike.codec import Header
    from mipsec.ike.constants import Flag
    held, tap = hold_first(lambda d: d.local[0] == GW_ADDR)
    net, I, R = establish(tap=tap)
    sa = only_sa(I)
    forged = codec.build_message(Header(sa.spi_i, bytes(8), ExchangeType.IKE_SA_INIT, Flag.RESPONSE, 0),
                                 [codec.NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)])
    I.receive_datagram(forged, (MN_ADDR, 500), (GW_ADDR, 500), 0.0)
    assert sa.state == State.INIT_SENT
    net.tap = None
    net.deliver(I.receive_datagram(held[0].data, held[0].remote, held[0].local, 0.0), MN_ADDR)
    assert only_sa(I).is_established and only_sa(R).is_established


def test_wrong_psk_fails_both_sides():
    ci, cr = configs()
    from dataclasses import replace
    cr = replace(cr, psks={"mn@example": b"another secret!"})
    net, I, R = establish(ci, cr)
    assert net.of(IkeSaFailed, GW_ADDR) and net.of(IkeSaFailed, MN_ADDR)
    assert R.drops[DropReason.IKE_AUTH_FAILED] == 1 and I.drops[DropReason.IKE_AUTH_FAILED] == 1
    assert not net.of(ChildSaEstablished)


def test_unknown_peer_identity_is_refused():
    ci, cr = configs()
    from dataclasses import replace
    ci = replace(ci, local_id="intruder@example")
    net, I, R = establish(ci, cr)
    assert R.drops[DropReason.IKE_AUTH_FAILED] == 1 and net.of(IkeSaFailed, MN_ADDR)


def test_responder_identity_is_checked():
    ci, cr = configs(r_psks={"mn@example": b"correct horse battery staple"})
    from dataclasses import replace
    cr = replace(cr, local_id="evil.example")
    net, I, R = establish(ci, cr)
    assert I.drops[DropReason.IKE_AUTH_FAILED] == 1 and net.of(IkeSaFailed, MN_ADDR)


def test_cookie_flow():
    net, I, R = establish(r_cookie_threshold=0)
    assert only_sa(I).is_established and only_sa(R).is_established
    init_requests = [d for d in net.sent if d.remote == (GW_ADDR, 500)]
    assert len(init_requests) == 2                       # without, then with the cookie
    m = codec.parse_message(init_requests[1].data)
    assert isinstance(m.payloads[0], codec.NotifyPayload) and m.payloads[0].type == NotifyType.COOKIE
    assert_esp_works(I, R)


def test_forged_cookie_is_refused():
    net, I, R = establish(r_cookie_threshold=0, tap=None)
    first = [d for d in net.sent if d.remote == (GW_ADDR, 500)][1]
    codec.parse_message(first.data)                      # a well-formed message to start from
    bad = bytearray(first.data)
    off = 28 + 8                                         # inside the cookie data
    bad[off] ^= 0xFF
    out = R.receive_datagram(bytes(bad), (GW_ADDR, 500), ("172.16.9.9", 500), 0.0)
    assert R.drops[DropReason.IKE_INVALID_COOKIE] == 1
    assert len(out) == 1 and codec.parse_message(out[0].data).notifies(NotifyType.COOKIE)
    assert len(R.ike_sas) == 1                           # no state for it


def test_cookie_from_another_address_is_refused():
    net, I, R = establish(r_cookie_threshold=0)
    with_cookie = [d for d in net.sent if d.remote == (GW_ADDR, 500)][1]
    R.receive_datagram(with_cookie.data, (GW_ADDR, 500), ("172.16.9.9", 500), 0.0)
    assert R.drops[DropReason.IKE_INVALID_COOKIE] == 1 and len(R.ike_sas) == 1


def test_lost_init_response_is_retransmitted_and_answered_from_cache():
    lost, tap = hold_first(lambda d: d.local == (GW_ADDR, 500))
    net, I, R = establish(tap=tap)
    assert only_sa(I).state == State.INIT_SENT
    net.run_timers(1.0)
    assert only_sa(I).is_established and only_sa(R).is_established
    assert R.drops[DropReason.IKE_RETRANSMISSION] == 1
    # the cached answer is byte for byte the lost one
    assert [d.data for d in net.sent if d.local == (GW_ADDR, 500)] == [lost[0].data] * 2


def test_lost_auth_response_is_retransmitted_and_answered_from_cache():
    lost, tap = hold_first(lambda d: d.local == (GW_ADDR, 4500))
    net, I, R = establish(tap=tap)
    assert only_sa(I).state == State.AUTH_SENT and only_sa(R).is_established
    net.run_timers(1.0)
    assert only_sa(I).is_established
    assert R.drops[DropReason.IKE_RETRANSMISSION] == 1
    assert len(net.of(ChildSaEstablished, GW_ADDR)) == 1     # no second child
    assert_esp_works(I, R)


def test_unanswered_init_gives_up_after_retries():
    net, I, R = establish(tap=lambda d: None)
    # setting up, the retransmissions are at most SETUP_RETRANSMIT_MAX_S apart:
    # 0.5 + 1 + 2 + 2 + 2 + 2 = 9.5 s (a GW back from a restart is reached within 2 s)
    net.run_timers(9.25, step=0.25)
    assert not net.of(IkeSaFailed, MN_ADDR)
    net.run_timers(60.0, step=0.25)
    assert net.of(IkeSaFailed, MN_ADDR) and not I.ike_sas
    tries = [d for d in net.sent if d.local[0] == MN_ADDR]
    assert len(tries) == 6                                   # RETRANSMIT_TRIES
    assert I.get_timer() is None


def _auth_request(net):
    return next(d for d in net.sent if d.local[0] == MN_ADDR and d.remote[1] == 4500)


def test_every_tampered_auth_octet_is_refused_without_state_change():
    held, tap = hold_first(lambda d: d.local[0] == MN_ADDR and d.remote[1] == 4500)
    net, I, R = establish(tap=tap)
    sa = only_sa(R)
    before = (sa.state, sa._mid_in, sa.local, sa.remote)
    good = held[0]
    for i in range(len(NON_ESP_MARKER), len(good.data)):
        bad = bytearray(good.data)
        bad[i] ^= 0x5A
        out = R.receive_datagram(bytes(bad), good.remote, good.local, 0.0)
        assert out == [] or all(isinstance(o, SendDatagram) for o in out)
        assert (sa.state, sa._mid_in, sa.local, sa.remote) == before, i
    assert sum(R.drops.values()) == len(good.data) - 4
    assert R.drops[DropReason.IKE_INTEGRITY_FAILED] > 0
    net.tap = None
    net.deliver(R.receive_datagram(good.data, good.remote, good.local, 0.0), GW_ADDR)
    assert only_sa(I).is_established and only_sa(R).is_established


def test_request_outside_the_window_and_wrong_response_id_are_dropped():
    net, I, R = establish()
    si, sr = only_sa(I), only_sa(R)
    # a request with message ID 7 (we expect 2)
    raw = si._sk_out.protect(si._header(ExchangeType.INFORMATIONAL, 7, False), [])
    inject(R, raw, sr.local, si.local)
    assert R.drops[DropReason.IKE_BAD_MESSAGE_ID] == 1
    # a response nobody asked for
    raw = sr._sk_out.protect(sr._header(ExchangeType.INFORMATIONAL, 2, True), [])
    inject(I, raw, si.local, sr.local)
    assert I.drops[DropReason.IKE_BAD_MESSAGE_ID] == 1
    # an old request (ID 1) that is not the one we answered
    raw = si._sk_out.protect(si._header(ExchangeType.INFORMATIONAL, 1, False), [])
    inject(R, raw, sr.local, si.local)
    assert R.drops[DropReason.IKE_BAD_MESSAGE_ID] == 2
    assert si.is_established and sr.is_established and sr._mid_in == 2


def test_unexpected_exchange_and_unknown_spi():
    held, tap = hold_first(lambda d: d.local[0] == MN_ADDR and d.remote[1] == 4500)
    net, I, R = establish(tap=tap)
    si, sr = only_sa(I), only_sa(R)
    # CREATE_CHILD_SA before IKE_AUTH
    raw = si._sk_out.protect(si._header(ExchangeType.CREATE_CHILD_SA, 1, False), [])
    inject(R, raw, sr.local, si.local)
    assert R.drops[DropReason.IKE_UNEXPECTED_EXCHANGE] == 1 and sr.state == State.INIT_ANSWERED
    bad = bytearray(held[0].data)
    bad[4 + 8:4 + 16] = b"\x99" * 8                     # responder SPI nobody has
    R.receive_datagram(bytes(bad), held[0].remote, held[0].local, 0.0)
    assert R.drops[DropReason.IKE_UNKNOWN_SA] == 1


def test_unknown_critical_payload_inside_sk_is_answered():
    net, I, R = establish()
    si, sr = only_sa(I), only_sa(R)
    raw = si._sk_out.protect(si._header(ExchangeType.INFORMATIONAL, 2, False),
                             [codec.Unknown(222, b"what", critical=True)])
    out = inject(R, raw, sr.local, si.local)
    assert R.drops[DropReason.IKE_UNKNOWN_CRITICAL_PAYLOAD] == 1
    m = codec.parse_message(out[0].data[4:])
    inner = si._sk_in.open(m)
    assert inner[0].type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD and inner[0].data == bytes([222])


def test_garbage_never_raises():
    net, I, R = establish()
    import random
    rnd = random.Random(7)
    good = _auth_request(net).data
    for _ in range(500):
        data = bytearray(good[:rnd.randrange(len(good))])
        for _ in range(3):
            if data:
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        for port in (500, 4500):
            R.receive_datagram(bytes(data), (GW_ADDR, port), (MN_ADDR, port), 0.0)
            I.receive_datagram(bytes(data), (MN_ADDR, port), (GW_ADDR, port), 0.0)
    assert only_sa(I).is_established and only_sa(R).is_established


@pytest.mark.parametrize("pfs", [0, DhGroup.CURVE25519, DhGroup.MODP_2048])
@pytest.mark.parametrize("who", ["initiator", "responder"])
def test_child_rekey(pfs, who):
    net, I, R = establish(pfs_group=pfs)
    old_i, old_r = only_child(I), only_child(R)
    ep, name = (I, MN_ADDR) if who == "initiator" else (R, GW_ADDR)
    net.deliver(only_sa(ep).rekey_child(only_child(ep).spi_in, net.now), name)
    assert len(net.of(ChildSaRekeyed, MN_ADDR)) == 1 and len(net.of(ChildSaRekeyed, GW_ADDR)) == 1
    assert [e.child for e in net.of(ChildSaDeleted, MN_ADDR)] == [old_i]
    assert [e.child for e in net.of(ChildSaDeleted, GW_ADDR)] == [old_r]
    assert only_child(I).spi_in != old_i.spi_in
    assert only_child(I).keys != old_i.keys
    assert_esp_works(I, R)
    assert not I.drops and not R.drops


def test_pfs_rekey_uses_a_new_dh_value():
    net, I, R = establish(pfs_group=DhGroup.ECP_256)
    net.deliver(only_sa(I).rekey_child(only_child(I).spi_in, 0.0), MN_ADDR)
    req = [d for d in net.sent if d.local[0] == MN_ADDR][-2]    # CREATE_CHILD_SA (then DELETE)
    m = codec.parse_message(req.data[4:])
    inner = only_sa(R)._sk_in.open(m)
    assert any(isinstance(p, codec.KePayload) and p.group == DhGroup.ECP_256 for p in inner)


@pytest.mark.parametrize("who", ["initiator", "responder"])
def test_ike_rekey_moves_children_and_deletes_old(who):
    net, I, R = establish()
    child_i = only_child(I)
    old_i, old_r = only_sa(I), only_sa(R)
    ep, name = (I, MN_ADDR) if who == "initiator" else (R, GW_ADDR)
    net.deliver(only_sa(ep).rekey(net.now), name)
    assert old_i.state == State.CLOSED and old_r.state == State.CLOSED
    new_i, new_r = only_sa(I), only_sa(R)
    assert new_i is not old_i and new_i.keys == new_r.keys and new_i.keys != old_i.keys
    assert new_i.spi_i == new_r.spi_i and new_i.spi_r == new_r.spi_r
    assert new_i.initiator == (who == "initiator")
    assert only_child(I) == child_i
    assert len(net.of(IkeSaRekeyed)) == 2 and not net.of(ChildSaDeleted)
    # the new IKE SA works: a child re-key and a liveness check over it
    net.deliver(new_i.rekey_child(child_i.spi_in, net.now), MN_ADDR)
    net.deliver(new_r.check_liveness(net.now), GW_ADDR)
    assert_esp_works(I, R)
    assert not I.drops and not R.drops


def test_delete_ike_sa():
    net, I, R = establish()
    net.deliver(only_sa(R).delete(0.0), GW_ADDR)
    assert net.of(IkeSaDeleted, MN_ADDR) and net.of(IkeSaDeleted, GW_ADDR)
    assert len(net.of(ChildSaDeleted)) == 2
    assert not I.ike_sas and not R.ike_sas


def test_delete_child_sa():
    net, I, R = establish()
    net.deliver(only_sa(I).delete_child(only_child(I).spi_in, 0.0), MN_ADDR)
    assert len(net.of(ChildSaDeleted)) == 2
    assert not only_sa(I).children and not only_sa(R).children


def test_liveness_check_and_dead_peer():
    net, I, R = establish(dpd_interval_s=10.0, ike_lifetime_s=None, child_lifetime_s=None)
    net.run_timers(25.0)
    assert only_sa(I).is_established and not net.of(IkeSaFailed)
    dpd = [d for d in net.sent if d.local[0] == MN_ADDR and d.remote[1] == 4500]
    assert len(dpd) >= 2                                   # AUTH + at least one check
    # now the peer disappears
    net.tap = lambda d: None
    net.run_timers(90.0, step=0.5)
    assert net.of(IkeSaFailed, MN_ADDR) or net.of(IkeSaFailed, GW_ADDR)


def test_timers_rekey_children_and_ike_sa():
    net, I, R = establish(child_lifetime_s=100.0, ike_lifetime_s=250.0, dpd_interval_s=None)
    net.run_timers(300.0, step=1.0)
    assert len(net.of(ChildSaRekeyed, MN_ADDR)) >= 2 and len(net.of(IkeSaRekeyed, MN_ADDR)) == 1
    assert_esp_works(I, R)
    assert not I.drops and not R.drops


def test_nat_detected_switches_to_4500_and_sends_keepalives():
    nat = {(MN_ADDR, 500): ("172.16.2.254", 40000), (MN_ADDR, 4500): ("172.16.2.254", 40001)}
    net, I, R = establish(nat=nat, nat_keepalive_s=20.0, dpd_interval_s=None)
    si, sr = only_sa(I), only_sa(R)
    assert si.nat_local and not si.nat_remote and sr.nat_remote and not sr.nat_local
    assert sr.remote == ("172.16.2.254", 40001)
    ci, cr = only_child(I), only_child(R)
    assert ci.udp_encap and cr.udp_encap and cr.remote_port == 40001
    net.run_timers(45.0)
    keepalives = [d for d in net.sent if d.keepalive]
    assert len(keepalives) == 2 and all(d.local[0] == MN_ADDR for d in keepalives)
    assert R.drops[DropReason.NAT_KEEPALIVE] == 2


def test_forced_encapsulation():
    net, I, R = establish(i_force_encap=True)
    assert only_sa(R).nat_remote and only_child(R).udp_encap and only_child(I).udp_encap
    i_in, i_out = only_child(I).make_sas()
    r_in, r_out = only_child(R).make_sas()
    pkt = i_out.encapsulate(INNER_UP)
    assert pkt[9] == 17                                    # ESP in UDP
    assert r_in.decapsulate(pkt) == INNER_UP


def test_mobike_update_sa_addresses():
    net, I, R = establish()
    new_coa = "172.16.2.10"
    net.endpoints[new_coa] = I
    del net.endpoints[MN_ADDR]
    net.deliver(only_sa(I).update_addresses((new_coa, 4500), 0.0), new_coa)
    assert net.of(PeerAddressChanged, GW_ADDR) and net.of(PeerAddressChanged, new_coa)
    assert only_sa(R).remote == (new_coa, 4500)
    assert only_child(R).remote_address == new_coa and only_child(I).local_address == new_coa
    i_in, i_out = only_child(I).make_sas()
    r_in, r_out = only_child(R).make_sas()
    up = i_out.encapsulate(INNER_UP)
    assert up[12:16] == bytes([172, 16, 2, 10])
    assert r_in.decapsulate(up) == INNER_UP


def test_mobike_refused_when_not_negotiated():
    net, I, R = establish(r_mobike=False)
    from mipsec.errors import UsageError
    with pytest.raises(UsageError):
        only_sa(I).update_addresses(("172.16.2.10", 4500), 0.0)


def test_gateway_serves_many_initiators_with_one_endpoint():
    from dataclasses import replace

    from ike_harness import Net
    from mipsec.ike.endpoint import IkeEndpoint
    ci, cr = configs(r_psks={"*": b"correct horse battery staple"})
    R = IkeEndpoint(cr)
    eps = {GW_ADDR: R}
    for n in range(5):                                   # five MNs, each its own identity
        eps[f"172.16.1.{20 + n}"] = IkeEndpoint(replace(ci, local_id=f"mn{n}@example"))
    net = Net(eps)
    for n in range(5):
        addr = f"172.16.1.{20 + n}"
        net.deliver(eps[addr].initiate((addr, 500), (GW_ADDR, 500), 0.0), addr)
    assert sorted(s.peer_id for s in R.ike_sas if s.is_established) == \
        [f"mn{n}@example" for n in range(5)]
    spis = {c.spi_in for s in R.ike_sas for c in s.children.values()}
    assert len(spis) == 5


def test_inbound_sa_with_wildcard_source_for_the_gateway():
    net, I, R = establish()
    r_in, _ = only_child(R).make_sas(inbound_any_source=True)
    _, i_out = only_child(I).make_sas(local="172.16.2.10")
    assert r_in.decapsulate(i_out.encapsulate(INNER_UP)) == INNER_UP


def test_rekeyed_ike_sa_that_the_peer_never_deletes_goes_away():
    net, I, R = establish(ike_lifetime_s=None, child_lifetime_s=None, dpd_interval_s=None)
    old_r = only_sa(R)
    # the initiator re-keys but every DELETE of the old SA is lost
    net.tap = lambda d: None if (d.local[0] == MN_ADDR and len(net.of(IkeSaRekeyed)) == 2
                                 and d.data[4:12] == old_r.spi_i) else d
    net.deliver(only_sa(I).rekey(0.0), MN_ADDR)
    assert old_r.state == State.REKEYED
    net.run_timers(40.0)
    assert old_r.state == State.CLOSED
    assert [e.reason for e in net.of(IkeSaDeleted, GW_ADDR)] == ["superseded by its re-key"]
    assert only_sa(R).children and only_sa(I).children
    assert_esp_works(I, R)


def test_reestablish_from_a_new_address_replaces_the_old_sas_on_both_sides():
    net, I, R = establish()
    old_i, old_r = only_sa(I), only_sa(R)
    old_child_r = only_child(R)
    new_coa = "172.16.2.10"
    net.endpoints[new_coa] = I
    del net.endpoints[MN_ADDR]
    net.deliver(I.reestablish((new_coa, 500), (GW_ADDR, 500), 1.0), new_coa)
    assert old_i.state == State.CLOSED and old_r.state == State.CLOSED
    assert [e.reason for e in net.of(IkeSaDeleted, GW_ADDR)] == ["INITIAL_CONTACT from the peer"]
    assert [e.child for e in net.of(ChildSaDeleted, GW_ADDR)] == [old_child_r]
    assert len(R.ike_sas) == 1 and only_sa(R).remote[0] == new_coa
    assert only_child(R).remote_address == new_coa
    assert_esp_works(I, R)
    # the SPIs of the replaced children are free again on both sides
    assert I.sizes()["esp_spis"] == R.sizes()["esp_spis"] == 1


def test_without_initial_contact_old_sas_stay():
    net, I, R = establish(i_initial_contact=False)
    net.deliver(I.initiate((MN_ADDR, 500), (GW_ADDR, 500), 1.0), MN_ADDR)
    assert len([s for s in R.ike_sas if s.is_established]) == 2


def test_authenticated_nonsense_never_raises_and_keeps_the_sa():
    """A peer that holds the keys but sends odd CREATE_CHILD_SA / INFORMATIONAL contents: every
    request is answered (an error notify at worst), nothing raises, the SA stays up."""
    import random
    rnd = random.Random(7)
    net, I, R = establish()
    si, sr = only_sa(I), only_sa(R)
    spi4 = lambda: rnd.randbytes(4)                                        # noqa: E731
    pool = [
        codec.SaPayload((codec.Proposal(1, 3, spi4(), (codec.Transform(1, 20, 256),)),)),
        codec.SaPayload((codec.Proposal(1, 1, rnd.randbytes(8), (codec.Transform(1, 99),)),)),
        codec.SaPayload((codec.Proposal(1, 3, b"", ()),)),
        codec.SaPayload((codec.Proposal(1, 1, b"", (codec.Transform(1, 12, 128), codec.Transform(2, 5),
                                                     codec.Transform(3, 12), codec.Transform(4, 19))),)),
        codec.NoncePayload(rnd.randbytes(rnd.choice([0, 8, 32, 300]))),
        codec.KePayload(rnd.choice([14, 19, 31, 2, 0]), rnd.randbytes(rnd.choice([0, 32, 64, 256]))),
        codec.TsPayload(PayloadType.TSi, (TS("10.9.0.0", "10.9.0.255"),)),
        codec.TsPayload(PayloadType.TSr, (TS("0.0.0.0", "255.255.255.255"),)),
        codec.NotifyPayload(NotifyType.REKEY_SA, b"", 3, spi4()),
        codec.NotifyPayload(NotifyType.REKEY_SA, b"", 3, b""),
        codec.NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES),
        codec.NotifyPayload(NotifyType.COOKIE2, rnd.randbytes(16)),
        codec.NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, rnd.randbytes(20)),
        codec.DeletePayload(3, (spi4(), spi4())),
        codec.DeletePayload(3, ()),
        codec.DeletePayload(2, (spi4(),)),
        codec.IdPayload(PayloadType.IDi, 2, b"x"),
        codec.AuthPayload(2, b"y" * 32),
        codec.Unknown(47, b"cp-payload"),
    ]
    for i in range(300):
        exchange = rnd.choice([ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL,
                               ExchangeType.IKE_AUTH])
        payloads = rnd.sample(pool, rnd.randrange(0, 6))
        mid = sr._mid_in
        raw = si._sk_out.protect(si._header(exchange, mid, False), payloads)
        out = inject(R, raw, sr.local, si.local)
        if exchange == ExchangeType.IKE_AUTH:
            assert sr._mid_in == mid
        else:
            assert sr._mid_in == mid + 1, (i, exchange, payloads)
            assert any(isinstance(o, SendDatagram) for o in out)
        assert sr.state == State.ESTABLISHED, (i, payloads)
    assert only_sa(R) is sr and only_child(R)              # the original child is still there


def test_keepalives_do_not_stop_liveness_checks():
    # we send keepalives every 5 s, but a peer that never answers is still found dead
    net, I, R = establish(i_force_encap=True, nat_keepalive_s=5.0, dpd_interval_s=10.0,
                          ike_lifetime_s=None, child_lifetime_s=None)
    net.tap = lambda d: None
    net.run_timers(80.0, step=0.5)
    assert net.of(IkeSaFailed, MN_ADDR)


def test_nat_mapping_change_is_followed():
    nat = {(MN_ADDR, 500): ("172.16.2.254", 40000), (MN_ADDR, 4500): ("172.16.2.254", 40001)}
    net, I, R = establish(nat=nat, dpd_interval_s=None)
    net.nat[(MN_ADDR, 4500)] = ("172.16.2.254", 40777)       # the NAT forgot and re-mapped us
    net.deliver(only_sa(I).check_liveness(1.0), MN_ADDR)
    assert only_sa(R).remote == ("172.16.2.254", 40777)
    assert only_child(R).remote_port == 40777
    assert [e.remote for e in net.of(PeerAddressChanged, GW_ADDR)] == [("172.16.2.254", 40777)]


def test_config_from_dict_and_identities():
    from mipsec.errors import ConfigError
    from mipsec.ike.config import IkeConfig, identity, identity_text
    c = IkeConfig.from_dict({"local_id": "mn@example", "psks": {"*": "a long enough key"},
                             "ike_proposals": ["aes256-sha256-x25519"], "esp_proposals": ["aes128gcm16"],
                             "local_ts": ["10.1.0.100/32"], "pfs_group": "ecp256", "mobike": False})
    assert c.pfs_group == DhGroup.ECP_256 and c.psk_for("anyone") == b"a long enough key"
    assert c.local_ts == (TS("10.1.0.100", "10.1.0.100"),) and not c.mobike
    for bad in ({"local_id": "x"}, {"local_id": "x", "psks": {"*": "short"}},
                {"local_id": "x", "psks": {"*": "a long enough key"}, "nonsense": 1},
                {"local_id": "x", "psks": {"*": "a long enough key"}, "local_ts": ["10.1/99"]},
                {"local_id": "x", "psks": {"*": "a long enough key"}, "ike_proposals": ["des"]}):
        with pytest.raises(ConfigError):
            IkeConfig.from_dict(bad)
    assert identity("172.16.0.1") == (1, bytes([172, 16, 0, 1]))
    assert identity("@gw.example") == (2, b"gw.example")
    assert identity("mn@example") == (3, b"mn@example")
    assert identity_text(1, bytes([10, 0, 0, 1])) == "10.0.0.1"
    assert identity_text(2, b"\xff\xfe") == "\ufffd\ufffd"


def test_cookies_start_above_the_half_open_threshold():
    from mipsec.ike.endpoint import IkeEndpoint
    ci, cr = configs(r_cookie_threshold=2)
    R = IkeEndpoint(cr)
    answers = []
    for n in range(4):                     # initiators that never send IKE_AUTH
        I = IkeEndpoint(ci)
        (req,) = I.initiate((f"172.16.3.{n + 1}", 500), (GW_ADDR, 500), 0.0)
        (resp,) = R.receive_datagram(req.data, (GW_ADDR, 500), (f"172.16.3.{n + 1}", 500), 0.0)
        answers.append(codec.parse_message(resp.data))
    assert [bool(m.find(codec.SaPayload)) for m in answers] == [True, True, False, False]
    assert all(m.notifies(NotifyType.COOKIE) for m in answers[2:])
    assert len(R.ike_sas) == 2
    # half-open SAs time out, and then no cookie is needed any more
    R.handle_timer(31.0)
    assert not R.ike_sas


def test_requests_queued_before_establishment_go_out_after_it():
    held, tap = hold_first(lambda d: d.local[0] == GW_ADDR and d.local[1] == 4500)
    net, I, R = establish(tap=tap)
    sa = only_sa(I)
    assert sa.state == State.AUTH_SENT
    assert sa.check_liveness(0.0) == []                   # queued: IKE_AUTH is in flight
    net.tap = None
    before = len(net.sent)
    net.deliver(I.receive_datagram(held[0].data, held[0].remote, held[0].local, 0.0), MN_ADDR)
    assert sa.is_established and len(net.sent) == before + 2   # the check and its answer


def test_simultaneous_ike_rekeys_resolve():
    net, I, R = establish(ike_lifetime_s=1000.0, child_lifetime_s=None, dpd_interval_s=None)
    si, sr = only_sa(I), only_sa(R)
    # both ends start a re-key before either request arrives
    out_i, out_r = si.rekey(1.0), sr.rekey(1.0)
    net.deliver(out_i + out_r, MN_ADDR)                    # (origin only labels events)
    assert si.is_established and sr.is_established        # both refused (TEMPORARY_FAILURE)
    net.run_timers(300.0, step=1.0)
    assert len(net.of(IkeSaRekeyed, MN_ADDR)) == 1 and len(net.of(IkeSaRekeyed, GW_ADDR)) == 1
    assert only_sa(I).keys == only_sa(R).keys
    assert_esp_works(I, R)


@pytest.mark.parametrize("order", ["crossing", "responder-late"])
def test_simultaneous_child_rekeys_leave_one_child(order):
    net, I, R = establish(ike_lifetime_s=None, child_lifetime_s=None, dpd_interval_s=None)
    si, sr = only_sa(I), only_sa(R)
    old_i, old_r = only_child(I), only_child(R)
    out_i = si.rekey_child(old_i.spi_in, 1.0)
    out_r = sr.rekey_child(old_r.spi_in, 1.0)
    if order == "crossing":              # both requests are on the wire before any answer
        net.deliver(out_i + out_r, MN_ADDR)
    else:                                # the GW's request arrives after the MN's exchange
        held = out_r
        net.deliver(out_i, MN_ADDR)
        net.deliver(held, GW_ADDR)
    ci, cr = only_child(I), only_child(R)                  # exactly one child on each end
    assert ci.spi_in == cr.spi_out and ci.spi_out == cr.spi_in
    assert ci.spi_in != old_i.spi_in
    assert_esp_works(I, R)
