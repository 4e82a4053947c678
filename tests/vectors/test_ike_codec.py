"""The strict IKEv2 codec (RFC 7296 §3): vectors both ways, every bad length, critical bit."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason
from mipsec.errors import ParseError
from mipsec.ike import codec
from mipsec.ike.codec import (
    AuthPayload,
    DeletePayload,
    Header,
    IdPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Proposal,
    SaPayload,
    TrafficSelector,
    Transform,
    TsPayload,
    Unknown,
    UnknownCriticalPayload,
    VendorIdPayload,
)
from mipsec.ike.constants import ExchangeType, Flag, PayloadType, TransformType

H = bytes.fromhex

HDR = Header(H("0102030405060708"), bytes(8), ExchangeType.IKE_SA_INIT, Flag.INITIATOR, 0)

SA = SaPayload((Proposal(1, 1, b"", (
    Transform(TransformType.ENCR, 12, 128),
    Transform(TransformType.PRF, 5),
    Transform(TransformType.INTEG, 12),
    Transform(TransformType.DH, 19))),))

# Built by hand from §3.1 - §3.9 (not with the codec under test).
SA_BODY = (
    "00 00 002c 01 01 00 04"                      # last proposal, length 44, #1, IKE, no SPI, 4 T
    "03 00 000c 01 00 000c 800e 0080"             # ENCR_AES_CBC, Key Length 128
    "03 00 0008 02 00 0005"                       # PRF_HMAC_SHA2_256
    "03 00 0008 03 00 000c"                       # AUTH_HMAC_SHA2_256_128
    "00 00 0008 04 00 0013")                      # DH 19
VECTOR = H(
    "0102030405060708 0000000000000000 21 20 22 08 00000000 0000005c"   # header, 92 octets
    "22 00 0030" + SA_BODY +                      # SA -> KE
    "28 00 0008 0013 0000"                        # KE group 19, no data -> Nonce
    "00 00 0008 aabbccdd".replace(" ", ""))       # Nonce
PAYLOADS = (SA, KePayload(19, b""), NoncePayload(H("aabbccdd")))


def test_vector_parses_and_builds():
    m = codec.parse_message(VECTOR)
    assert m.header == HDR
    assert m.payloads == PAYLOADS and m.encrypted is None
    assert codec.build_message(HDR, PAYLOADS) == VECTOR


def test_vector_read_at_every_truncation_is_refused():
    for n in range(len(VECTOR)):
        with pytest.raises(ParseError):
            codec.parse_message(VECTOR[:n])


def test_header_length_must_match_the_datagram():
    with pytest.raises(ParseError) as e:
        codec.parse_message(VECTOR + b"\x00")
    assert e.value.reason == DropReason.IKE_BAD_LENGTH


def test_wrong_major_version_is_refused():
    bad = bytearray(VECTOR)
    bad[17] = 0x30
    with pytest.raises(ParseError) as e:
        codec.parse_message(bytes(bad))
    assert e.value.reason == DropReason.MALFORMED


@pytest.mark.parametrize("offset,value", [
    (30, 0x0003),      # SA payload length below its own header
    (30, 0x00FF),      # SA payload length past the message
    (30, 0x0031),      # SA longer than its proposal
    (78, 0x0007),      # KE length too short for its fixed part (< 4 + 4)
    (86, 0x0009),      # Nonce length past the end
])
def test_bad_payload_lengths(offset, value):
    bad = bytearray(VECTOR)
    struct.pack_into("!H", bad, offset, value)
    with pytest.raises(ParseError) as e:
        codec.parse_message(bytes(bad))
    assert e.value.reason in (DropReason.IKE_BAD_LENGTH, DropReason.MALFORMED)


def test_inner_proposal_length_disagreement_is_refused():
    bad = bytearray(VECTOR)
    struct.pack_into("!H", bad, 34, 0x002d)       # proposal claims one octet more than the SA
    with pytest.raises(ParseError) as e:
        codec.parse_message(bytes(bad))
    assert e.value.reason == DropReason.IKE_BAD_LENGTH


def test_transform_count_disagreement_is_refused():
    bad = bytearray(VECTOR)
    bad[39] = 3                                   # says 3 transforms, there are 4
    with pytest.raises(ParseError):
        codec.parse_message(bytes(bad))


def _with_extra(ptype, critical, body=b"xyz"):
    # put an extra payload after the Nonce
    chain = codec.build_chain(PAYLOADS, last_next=ptype)
    extra = bytes([0, 0x80 if critical else 0]) + struct.pack("!H", 4 + len(body)) + body
    head = codec.build_header(HDR, PayloadType.SA, 28 + len(chain) + len(extra))
    return head + chain + extra


def test_unknown_critical_payload_is_refused_with_its_type():
    with pytest.raises(UnknownCriticalPayload) as e:
        codec.parse_message(_with_extra(200, critical=True))
    assert e.value.reason == DropReason.IKE_UNKNOWN_CRITICAL_PAYLOAD and e.value.ptype == 200


def test_unknown_noncritical_payload_is_skipped():
    m = codec.parse_message(_with_extra(200, critical=False))
    assert m.payloads[-1] == Unknown(200, b"xyz")


def test_known_payload_with_critical_bit_is_accepted():
    m = codec.parse_message(_with_extra(PayloadType.VENDOR_ID, critical=True))
    assert m.payloads[-1] == VendorIdPayload(b"xyz")


ALL = (
    SA,
    KePayload(31, b"k" * 32),
    NoncePayload(b"n" * 32),
    IdPayload(PayloadType.IDi, 2, b"mn.example"),
    IdPayload(PayloadType.IDr, 1, bytes([172, 16, 0, 1])),
    AuthPayload(2, b"a" * 32),
    NotifyPayload(16388, b"h" * 20),
    NotifyPayload(16393, b"", 3, b"\x01\x02\x03\x04"),
    DeletePayload(3, (b"\x01\x02\x03\x04", b"\x05\x06\x07\x08")),
    DeletePayload(1),
    VendorIdPayload(b"mipsec"),
    TsPayload(PayloadType.TSi, (TrafficSelector("10.1.0.100", "10.1.0.100"),
                               TrafficSelector("0.0.0.0", "255.255.255.255", 17, 500, 500))),
    TsPayload(PayloadType.TSr, (TrafficSelector.from_network("10.1.0.0/24"),)),
    SaPayload((Proposal(1, 3, b"\xaa\xbb\xcc\xdd", (Transform(1, 20, 256), Transform(5, 0))),
               Proposal(2, 3, b"\xaa\xbb\xcc\xdd", (Transform(1, 12, 128), Transform(3, 12),
                                                    Transform(5, 0))))),
)


def test_every_payload_round_trips():
    wire = codec.build_message(HDR, ALL)
    assert codec.parse_message(wire).payloads == ALL


def test_payload_chain_truncated_at_every_offset():
    chain = codec.build_chain(ALL)
    for n in range(len(chain)):
        with pytest.raises(ParseError):
            codec.parse_payload_chain(PayloadType.SA, chain[:n])


def test_delete_with_wrong_spi_count_is_refused():
    body = struct.pack("!BBH", 3, 4, 3) + b"\x00" * 8
    chain = struct.pack("!BBH", 0, 0, 4 + len(body)) + body
    with pytest.raises(ParseError) as e:
        codec.parse_payload_chain(PayloadType.DELETE, chain)
    assert e.value.reason == DropReason.IKE_BAD_LENGTH


def test_ts_with_bad_selector_length_is_refused():
    ts = codec.payload_body(TsPayload(PayloadType.TSi, (TrafficSelector("1.2.3.4", "1.2.3.4"),)))
    bad = bytearray(ts)
    struct.pack_into("!H", bad, 6, 15)
    chain = struct.pack("!BBH", 0, 0, 4 + len(bad)) + bytes(bad)
    with pytest.raises(ParseError):
        codec.parse_payload_chain(PayloadType.TSi, chain)


def test_sk_payload_must_be_last():
    sk = struct.pack("!BBH", PayloadType.NONCE, 0, 8) + b"abcd"
    nonce = struct.pack("!BBH", 0, 0, 5) + b"n"
    chain = bytearray(sk + nonce)
    chain[0] = PayloadType.NONCE
    head = codec.build_header(HDR, PayloadType.SK, 28 + len(chain))
    with pytest.raises(ParseError):
        codec.parse_message(head + bytes(chain))


def test_traffic_selector_helpers():
    a = TrafficSelector.from_network("10.1.0.0/24")
    assert a.as_network() == "10.1.0.0/24"
    assert a.contains(TrafficSelector("10.1.0.5", "10.1.0.9"))
    assert a.intersect(TrafficSelector.from_network("0.0.0.0/0")) == a
    assert a.intersect(TrafficSelector.from_network("10.2.0.0/16")) is None
    assert TrafficSelector("10.1.0.1", "10.1.0.2").as_network() is None


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_parse_error(data):
    try:
        codec.parse_message(data)
    except ParseError:
        pass
    try:
        codec.parse_payload_chain(PayloadType.SA, data)
    except ParseError:
        pass


@settings(max_examples=examples(300), deadline=None)
@given(st.integers(0, len(VECTOR) - 1), st.integers(1, 255))
def test_mutated_vector_parses_or_gives_parse_error(i, x):
    bad = bytearray(VECTOR)
    bad[i] ^= x
    try:
        codec.parse_message(bytes(bad))
    except ParseError:
        pass


def test_reversed_traffic_selector_ranges_are_refused():
    for start, end, ports in (("10.0.0.9", "10.0.0.1", (0, 65535)), ("10.0.0.1", "10.0.0.9", (80, 79))):
        body = codec.TS_HEADER.build({"count": 1}) + codec.TS_IPV4.build({
            "ts_type": 7, "ip_protocol": 0, "length": 16, "start_port": ports[0],
            "end_port": ports[1], "start_address": bytes(map(int, start.split("."))),
            "end_address": bytes(map(int, end.split(".")))})
        chain = struct.pack("!BBH", 0, 0, 4 + len(body)) + body
        with pytest.raises(ParseError) as e:
            codec.parse_payload_chain(PayloadType.TSi, chain)
        assert e.value.reason == DropReason.MALFORMED
    assert TrafficSelector("10.0.0.9", "10.0.0.1").as_network() is None
