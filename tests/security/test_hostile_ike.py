"""Hostile input to the IKEv2 responder (RFC 7296) at the endpoint, not only at the codec.

Structure-aware attacks built from a genuine IKE_SA_INIT: payload lengths that overrun, SK
payloads nested or not last, tens of thousands of payloads in one datagram, unknown critical
payloads, floods of IKE_SA_INIT from many sources (half-open SAs must stay bounded: cookies,
RFC 7296 §2.6) and datagrams on the NAT-T port that are not IKE.  Nothing may raise; every
refusal is counted; no unauthenticated datagram may create more state than the half-open limit.
"""

from __future__ import annotations

import struct

from ike_harness import GW_ADDR, MN_ADDR, configs
from mipsec.drops import DropReason as R
from mipsec.ike import codec
from mipsec.ike.constants import NON_ESP_MARKER, ExchangeType, NotifyType, PayloadType
from mipsec.ike.endpoint import IkeEndpoint
from mipsec.ike.events import SendDatagram

LOCAL, PEER = (GW_ADDR, 500), (MN_ADDR, 500)


def _responder(**kw):
    _ci, cr = configs(**kw)
    return IkeEndpoint(cr)


def _init_request(spi_i: bytes = b"\x11" * 8) -> bytes:
    ci, _cr = configs()
    ini = IkeEndpoint(ci)
    (out,) = [o for o in ini.initiate(PEER, LOCAL, 0.0) if isinstance(o, SendDatagram)]
    m = codec.parse_message(out.data)
    return codec.build_message(codec.Header(spi_i, bytes(8), m.header.exchange, m.header.flags, 0),
                               list(m.payloads))


def _state(ep: IkeEndpoint):
    return len(ep._by_spi), len(ep._half_open), len(ep.ike_sas)


def _feed(ep: IkeEndpoint, data: bytes, remote=PEER, local=LOCAL, now=0.0):
    return ep.receive_datagram(data, local, remote, now)


def test_genuine_init_is_answered():
    ep = _responder()
    out = _feed(ep, _init_request())
    assert any(isinstance(o, SendDatagram) for o in out)
    assert _state(ep) == (1, 1, 1)


def test_overrunning_and_underrunning_payload_lengths():
    ep = _responder()
    good = _init_request()
    first = 28                                           # generic header of the first payload
    for what, length in [("0", 0), ("3", 3), ("past the datagram", len(good)),
                         ("0xFFFF", 0xFFFF), ("one short", None)]:
        bad = bytearray(good)
        old = struct.unpack_from("!H", bad, first + 2)[0]
        struct.pack_into("!H", bad, first + 2, old - 1 if length is None else length)
        assert _feed(ep, bytes(bad)) == [], what
    assert ep.drops[R.IKE_BAD_LENGTH] == 5
    assert _state(ep) == (0, 0, 0)
    # header length disagreeing with the datagram, both ways
    for delta in (-1, 1):
        bad = bytearray(good)
        struct.pack_into("!I", bad, 24, len(good) + delta)
        assert _feed(ep, bytes(bad)) == []
    assert ep.drops[R.IKE_BAD_LENGTH] == 7 and _state(ep) == (0, 0, 0)


def test_sk_payload_in_an_init_request_and_not_last():
    ep = _responder()
    m = codec.parse_message(_init_request())
    # an SK payload as the last payload of IKE_SA_INIT (which is never encrypted)
    sk = bytes((PayloadType.NONE, 0)) + struct.pack("!H", 4 + 40) + bytes(40)
    chain = codec.build_chain(list(m.payloads), last_next=PayloadType.SK)
    header = codec.build_header(m.header, _first_type(m), 28 + len(chain) + len(sk))
    assert _feed(ep, header + chain + sk) == []
    assert ep.drops[R.IKE_UNEXPECTED_EXCHANGE] == 1
    # SK followed by another payload: not last (§3.14)
    sk_mid = bytes((PayloadType.NONCE, 0)) + struct.pack("!H", 4 + 16) + bytes(16)
    nonce = bytes((PayloadType.NONE, 0)) + struct.pack("!H", 4 + 16) + bytes(16)
    header = codec.build_header(m.header, _first_type(m), 28 + len(chain) + len(sk_mid) + 20)
    assert _feed(ep, header + chain + sk_mid + nonce) == []
    assert ep.drops[R.IKE_BAD_LENGTH] == 1
    assert _state(ep) == (0, 0, 0)


def _first_type(m: codec.Message) -> int:
    return codec.parse_header(m.raw)[1]


def test_sk_nested_inside_sk_is_refused_by_the_chain_parser():
    inner_sk = bytes((PayloadType.NONE, 0)) + struct.pack("!H", 4 + 32) + bytes(32)
    try:
        codec.parse_payload_chain(PayloadType.SK, inner_sk)
    except codec.ParseError as exc:
        assert exc.reason is R.MALFORMED
    else:
        raise AssertionError("nested SK accepted")


def _with_extra_payloads(count: int, ptype: int, body: bytes = b"", critical=False) -> bytes:
    m = codec.parse_message(_init_request())
    chain = codec.build_chain(list(m.payloads), last_next=ptype)
    one = struct.pack("!BBH", ptype, 0x80 if critical else 0, 4 + len(body)) + body
    extra = one * (count - 1) + struct.pack("!BBH", PayloadType.NONE, 0x80 if critical else 0,
                                            4 + len(body)) + body
    return codec.build_header(m.header, _first_type(m), 28 + len(chain) + len(extra)) \
        + chain + extra


def test_tens_of_thousands_of_payloads_in_one_datagram():
    ep = _responder()
    for ptype in (PayloadType.VENDOR_ID, 200):            # known but ignored; unknown, skipped
        data = _with_extra_payloads(16000, ptype)          # 64,000 octets of 4-byte payloads
        assert len(data) < 0xFFFF
        out = _feed(ep, data, remote=(MN_ADDR, 500 + ptype))
        assert out and all(isinstance(o, SendDatagram) for o in out)   # answered, not choked
    assert len(ep._half_open) <= 2


def test_unknown_critical_payload_in_init_creates_nothing():
    ep = _responder()
    _feed(ep, _with_extra_payloads(1, 201, critical=True))     # may answer UNSUPPORTED_CRITICAL
    assert ep.drops[R.IKE_UNKNOWN_CRITICAL_PAYLOAD] == 1
    assert _state(ep) == (0, 0, 0)


def test_init_flood_from_many_sources_is_bounded_by_cookies():
    ep = _responder()
    threshold = ep.config.cookie_threshold
    assert threshold is not None and threshold > 0
    cookies = 0
    for i in range(threshold * 4):
        src = (f"198.51.{i // 250}.{i % 250 + 1}", 500)
        out = _feed(ep, _init_request(spi_i=struct.pack("!Q", i + 1)), remote=src)
        for o in out:
            m = codec.parse_message(o.data)
            if m.notifies(NotifyType.COOKIE):
                cookies += 1
    assert len(ep._half_open) == threshold
    assert len(ep._by_spi) == threshold
    assert cookies == threshold * 3
    # a request that echoes a forged cookie is refused and counted; still bounded
    m = codec.parse_message(_init_request(spi_i=b"\x99" * 8))
    forged = codec.build_message(m.header, [codec.NotifyPayload(NotifyType.COOKIE, bytes(34))]
                                 + list(m.payloads))
    _feed(ep, forged, remote=("203.0.113.9", 500))
    assert ep.drops[R.IKE_INVALID_COOKIE] == 1
    assert len(ep._half_open) == threshold
    # half-open SAs time out (HALF_OPEN_TIMEOUT_S), freeing their state
    t = ep.get_timer()
    assert t is not None
    ep.handle_timer(t + 60.0)
    ep.handle_timer(t + 120.0)
    assert len(ep._half_open) == 0


def test_nat_t_port_datagrams_that_are_not_ike():
    ep = _responder()
    nat = (GW_ADDR, 4500)
    assert _feed(ep, b"\xff", local=nat) == []
    assert ep.drops[R.NAT_KEEPALIVE] == 1
    assert _feed(ep, b"\x00\x00\x10\x01" + bytes(40), local=nat) == []   # an ESP SPI
    assert ep.drops[R.WRONG_PROTOCOL] == 1
    for junk in (b"", b"\x00", b"\x00\x00\x00", NON_ESP_MARKER, NON_ESP_MARKER + b"\x00" * 10):
        assert _feed(ep, junk, local=nat) == []
    assert _state(ep) == (0, 0, 0)
    assert sum(ep.drops.values()) == 7


def test_response_and_other_exchanges_to_unknown_spis():
    ep = _responder()
    m = codec.parse_message(_init_request())
    for exchange, flags in [(ExchangeType.IKE_AUTH, 0x08), (ExchangeType.INFORMATIONAL, 0x08),
                            (ExchangeType.CREATE_CHILD_SA, 0x08),
                            (ExchangeType.IKE_SA_INIT, 0x20)]:
        h = codec.Header(m.header.spi_i, b"\x22" * 8, exchange, flags, 1)
        _feed(ep, codec.build_message(h, []))
    assert ep.drops[R.IKE_UNKNOWN_SA] == 4
    h = codec.Header(b"\x33" * 8, b"\x44" * 8, ExchangeType.IKE_SA_INIT, 0x08, 0)
    _feed(ep, codec.build_message(h, list(m.payloads)))         # INIT with a responder SPI
    assert ep.drops[R.MALFORMED] == 1
    assert _state(ep) == (0, 0, 0)


def test_invalid_key_exchange_values_create_nothing():
    """RFC 7296 §3.4 + RFC 8247: a KE that is the wrong length for its group, the identity /
    p-1 / 0 for MODP (RFC 6989 §2.1), not a curve point for ECP, or all-zero X25519 (RFC 7748
    §6.1): refused and counted, no half-open SA, nothing raises."""
    from mipsec.ike.proposals import parse_ike_suite

    for suite in ("aes256-sha256-prfsha256-ecp256", "aes128gcm16-prfsha256-x25519",
                  "aes128-sha256-prfsha256-modp2048"):
        ci, cr = configs(ike_suites=(parse_ike_suite(suite),))
        ini = IkeEndpoint(ci)
        (out,) = [o for o in ini.initiate(PEER, LOCAL, 0.0) if isinstance(o, SendDatagram)]
        m = codec.parse_message(out.data)
        ke = m.find(codec.KePayload)
        n = len(ke.data)
        bad_values = [b"", b"\x00", bytes(n), ke.data[:-1], ke.data + b"\x00"]
        if n == 256:                                        # MODP 2048: 1 and p - 1
            bad_values += [(1).to_bytes(n, "big"), b"\xff" * n]
        elif n == 64:                                       # ECP 256: not on the curve
            bad_values += [b"\x01" * n, b"\xff" * n]
        for i, data in enumerate(bad_values):
            ep = IkeEndpoint(cr)
            payloads = [codec.KePayload(ke.group, data) if isinstance(p, codec.KePayload) else p
                        for p in m.payloads]
            h = codec.Header(bytes([i + 1]) * 8, bytes(8), m.header.exchange, m.header.flags, 0)
            assert _feed(ep, codec.build_message(h, payloads)) == [], (suite, i)
            assert sum(ep.drops.values()) == 1 and _state(ep) == (0, 0, 0), (suite, i, ep.drops)


# --- values an authenticated peer (or an on-path rewrite) controls -----------------
from ike_harness import Net, ike_sa_of  # noqa: E402
from mipsec.ike.book import ChildSaBook  # noqa: E402
from mipsec.ike.events import ChildSaEstablished, PeerAddressChanged  # noqa: E402


def _children(net, who):
    return [e for w, e in net.events if w == who and isinstance(e, ChildSaEstablished)]


def test_esp_spi_zero_offered_by_the_initiator_is_no_proposal_chosen():
    """Observed: a peer with the PSK offering ESP SPI 0 got a ChildSaEstablished whose
    make_sas() raised ConfigError (RFC 4303 §2.1: SPI 0 is never on the wire)."""
    ci, cr = configs()
    initiator, responder = IkeEndpoint(ci), IkeEndpoint(cr)
    initiator._alloc_esp_spi = lambda: 0
    net = Net({MN_ADDR: initiator, GW_ADDR: responder})
    net.deliver(initiator.initiate((MN_ADDR, 500), (GW_ADDR, 500), 0.0), MN_ADDR)
    assert _children(net, GW_ADDR) == [] and _children(net, MN_ADDR) == []
    assert responder.drops[R.IKE_NO_PROPOSAL_CHOSEN] == 1


def test_esp_spi_zero_answered_by_the_responder_is_not_accepted():
    ci, cr = configs()
    initiator, responder = IkeEndpoint(ci), IkeEndpoint(cr)
    responder._alloc_esp_spi = lambda: 0
    net = Net({MN_ADDR: initiator, GW_ADDR: responder})
    net.deliver(initiator.initiate((MN_ADDR, 500), (GW_ADDR, 500), 0.0), MN_ADDR)
    assert _children(net, MN_ADDR) == []
    assert initiator.drops[R.IKE_NO_PROPOSAL_CHOSEN] == 1


def test_ike_from_udp_source_port_zero_or_no_unicast_source_is_dropped():
    """The UDP/IP header is not covered by IKE's integrity: a rewrite to source port 0 made a
    child with UdpEncap(remote_port=0) (ConfigError in make_sas)."""
    for public in [("198.51.100.1", 0), ("0.0.0.0", 500), ("224.0.0.9", 500),
                   ("255.255.255.255", 500)]:
        ci, cr = configs()
        initiator, responder = IkeEndpoint(ci), IkeEndpoint(cr)
        net = Net({MN_ADDR: initiator, GW_ADDR: responder},
                  nat={(MN_ADDR, 500): public, (MN_ADDR, 4500): public})
        net.deliver(initiator.initiate((MN_ADDR, 500), (GW_ADDR, 500), 0.0), MN_ADDR)
        book = ChildSaBook(inbound_any_source=True)
        for who, ev in net.events:
            if who == GW_ADDR:
                book.apply(ev)
        assert _children(net, GW_ADDR) == [] and responder.ike_sas == [], public
        assert responder.drops[R.MALFORMED] >= 1


def test_nat_remapping_to_port_zero_does_not_break_the_book():
    """Observed: a later request from port 0 -> PeerAddressChanged(port 0) -> ChildSaBook.apply
    -> UdpEncap(remote_port=0) -> ConfigError."""
    ci, cr = configs()
    initiator, responder = IkeEndpoint(ci), IkeEndpoint(cr)
    net = Net({MN_ADDR: initiator, GW_ADDR: responder},
              nat={(MN_ADDR, 500): ("198.51.100.1", 1500), (MN_ADDR, 4500): ("198.51.100.1", 14500)})
    net.deliver(initiator.initiate((MN_ADDR, 500), (GW_ADDR, 500), 0.0), MN_ADDR)
    book = ChildSaBook(inbound_any_source=True)
    for who, ev in net.events:
        if who == GW_ADDR:
            book.apply(ev)
    assert book.outbound is not None and book.outbound.udp_encap.remote_port == 14500
    seen = len(net.events)
    net.nat[(MN_ADDR, 4500)] = ("198.51.100.1", 0)
    net.run_timers(400.0, step=5.0)
    for who, ev in net.events[seen:]:
        if who == GW_ADDR:
            assert not (isinstance(ev, PeerAddressChanged) and ev.remote[1] == 0)
            book.apply(ev)
    # the peer is unreachable from port 0 (its datagrams are dropped): the SAs may die of
    # that, but none ever points at port 0
    for _child, sin, sout in book.pairs.values():
        assert sout.udp_encap.remote_port == 14500 and sin.udp_encap.remote_port == 14500


def _ike_topology(n=1, **kw):
    from mipsec.sim.topology import build_topology
    return build_topology(n, sa_source="ikev2", internet_delay_s=0.002, seed=3, **kw)


def test_gateway_receive_from_net_does_not_raise_for_esp_spi_zero():
    """Observed: VpnGateway.receive_from_net -> _ike_event (ChildSaEstablished) -> make_sas ->
    SecurityAssociation(spi=0) -> ConfigError out of the role."""
    topo = _ike_topology()
    topo.mn.role.ike.endpoint._alloc_esp_spi = lambda: 0
    topo.move("a", 0)
    topo.sim.run_for(1.0)
    gw = topo.gw.role
    assert gw.mobiles.get(topo.mn.role.home_address) is None
    assert gw.ike.endpoint.drops[R.IKE_NO_PROPOSAL_CHOSEN] >= 1


def test_a_child_the_gateway_cannot_install_is_counted_and_deleted():
    """Defence in depth for anything make_sas / the SAD refuse: a re-key whose inbound SPI is
    already another MN's (forced here) is refused as IKE_CHILD_UNUSABLE, the child is deleted
    at the peer, and the other MN's SA stays where it was."""
    from mipsec.sim.scenario import wait_registered
    topo = _ike_topology(2)
    topo.move("a", 0)
    topo.move("a", 1)
    assert wait_registered(topo, 2.0)
    gw = topo.gw.role
    mn0, mn1 = topo.mobiles[0].role, topo.mobiles[1].role
    taken = gw.mobiles[mn0.home_address].inbound
    sa_gw = ike_sa_of(gw.ike.endpoint, gw.mobiles[mn1.home_address].ike_id)
    sa_gw._alloc_esp_spi = lambda: taken.spi
    sa_mn = ike_sa_of(mn1.ike.endpoint, mn1._ike_id)
    (spi_in,) = list(sa_mn.children)
    now = topo.sim.now
    topo.mobiles[1].driver.perform(mn1._ike_outputs(sa_mn.rekey_child(spi_in, now), now))
    topo.sim.run_for(1.0)                                    # must not raise
    assert gw.drops[R.IKE_CHILD_UNUSABLE] == 1
    assert gw.sad.get(taken.spi) is taken
    assert gw._by_spi[taken.spi] is gw.mobiles[mn0.home_address]
    assert taken.spi not in sa_gw.children                   # deleted (RFC 7296 §1.4.1)


def test_mobike_move_to_an_unusable_address_is_refused():
    from mipsec.sim.scenario import wait_registered
    topo = _ike_topology(handover_mode="mobike")
    topo.move("a", 0)
    assert wait_registered(topo, 2.0)
    gw = topo.gw.role
    m = gw.mobiles[topo.mn.role.home_address]
    before = (m.care_of, m.outbound.remote)
    for bad in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "172.16.0.1", "10.1.0.1", "10.1.0.10"]:
        ike = gw.ike.endpoint.info(m.ike_id)
        assert gw._ike_outputs([PeerAddressChanged(ike.ike_id, ike.peer_id, ike.local,
                                                   (bad, 4500))], topo.sim.now) == []
    assert (m.care_of, m.outbound.remote) == before
    assert gw.drops[R.MIP_BAD_CARE_OF] == 6
