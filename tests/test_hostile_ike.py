"""Hostile input to the IKEv2 responder (RFC 7296) at the endpoint, not only at the codec.

Structure-aware attacks built from a genuine IKE_SA_INIT: payload lengths that overrun, SK
payloads nested or not last, tens of thousands of payloads in one datagram, unknown critical
payloads, floods of IKE_SA_INIT from many sources (half-open SAs must stay bounded: cookies,
RFC 7296 §2.6) and datagrams on the NAT-T port that are not IKE.  Nothing may raise; every
refusal is counted; no unauthenticated datagram may create more state than the half-open limit.
"""

from __future__ import annotations

import struct

from mipsec.drops import DropReason as R
from mipsec.ike import codec
from mipsec.ike.config import SendDatagram
from mipsec.ike.constants import ExchangeType, NON_ESP_MARKER, NotifyType, PayloadType
from mipsec.ike.endpoint import IkeEndpoint

from test_ike_harness import GW_ADDR, MN_ADDR, configs

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
