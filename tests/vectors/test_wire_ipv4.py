"""IPv4 / UDP / ESP codecs: the construct specifications and the struct fast paths agree, the
RFC 1071 checksum is right, parsers refuse bad input with the specific reason."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from levels import examples
from mipsec.drops import DropReason
from mipsec.errors import ParseError
from mipsec.wire import esp as wesp
from mipsec.wire import ipv4 as w

addresses = st.integers(min_value=0, max_value=2**32 - 1).map(w.int_to_addr)
headers = st.builds(
    w.Ipv4Header, source=addresses, destination=addresses,
    protocol=st.integers(0, 255), tos=st.integers(0, 255),
    identification=st.integers(0, 0xFFFF), dont_fragment=st.booleans(),
    more_fragments=st.booleans(), fragment_offset=st.integers(0, 0x1FFF),
    ttl=st.integers(0, 255),
    options=st.integers(0, 10).map(lambda n: bytes(range(1, 4 * n + 1))),
)


@settings(max_examples=examples(300), deadline=None)
@given(headers, st.binary(max_size=64))
def test_construct_and_struct_agree_on_ipv4(header, payload):
    packet = w.build_ipv4(header, payload)
    ihl = 20 + len(header.options)
    flags = (w.FLAG_DF if header.dont_fragment else 0) \
        | (w.FLAG_MF if header.more_fragments else 0) | header.fragment_offset
    total = ihl + len(payload)
    # the struct fast path reads the same fields at the named offsets...
    vihl, tos, length, ident, frag, ttl, proto, csum = w.unpack_ipv4_prefix(packet)
    assert (vihl, tos, length, ident, frag, ttl, proto) == (
        0x40 | ihl // 4, header.tos, total, header.identification, flags, header.ttl,
        header.protocol)
    assert packet[w.OFF_SOURCE:w.OFF_SOURCE + 4] == w.addr_to_bytes(header.source)
    assert packet[w.OFF_DESTINATION:w.OFF_DESTINATION + 4] == w.addr_to_bytes(header.destination)
    # ...and writes the same bytes (without options)
    if not header.options:
        rebuilt = w.pack_ipv4(vihl, tos, length, ident, frag, ttl, proto, csum,
                              w.addr_to_bytes(header.source), w.addr_to_bytes(header.destination))
        assert rebuilt == packet[:20]
    assert w.checksum(packet[:ihl]) == 0
    parsed, rest = w.parse_ipv4(packet)
    assert rest == payload
    assert parsed == w.Ipv4Header(**{**header.__dict__, "total_length": total, "checksum": csum})


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=200))
def test_checksum_against_the_rfc1071_reference(data):
    assert w.checksum(data) == w.checksum_reference(data)


@pytest.mark.parametrize("data", [b"", b"\x00" * 20, b"\xff" * 20, b"\xff\xff", b"\x01"])
def test_checksum_edges(data):
    assert w.checksum(data) == w.checksum_reference(data)


def test_ipv4_and_udp_match_scapy():
    header = w.Ipv4Header("10.1.0.1", "172.16.0.1", 17, identification=7, dont_fragment=True,
                          tos=0x10, ttl=64)
    payload = w.build_udp(w.UdpHeader(4500, 4500), b"hello")
    ours = w.build_ipv4(header, payload)
    theirs = bytes(IP(src="10.1.0.1", dst="172.16.0.1", id=7, flags="DF", tos=0x10, ttl=64)
                   / UDP(sport=4500, dport=4500, chksum=0) / Raw(b"hello"))
    assert ours == theirs
    datagram = w.build_udp(w.UdpHeader(1234, 53), b"query")
    checked = datagram[:6] + w.udp_checksum("10.1.0.1", "172.16.0.1", datagram).to_bytes(2, "big") \
        + datagram[8:]
    assert checked == bytes(UDP(bytes(IP(src="10.1.0.1", dst="172.16.0.1")
                                      / UDP(sport=1234, dport=53) / Raw(b"query"))[20:]))


@settings(max_examples=examples(200), deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.binary(max_size=32))
def test_construct_and_struct_agree_on_udp(sport, dport, csum, payload):
    datagram = w.build_udp(w.UdpHeader(sport, dport, checksum=csum), payload)
    assert w.unpack_udp(datagram) == (sport, dport, 8 + len(payload), csum)
    assert w.pack_udp(sport, dport, 8 + len(payload), csum) == datagram[:8]
    header, rest = w.parse_udp(datagram)
    assert (header.source_port, header.destination_port, header.checksum, rest) == \
        (sport, dport, csum, payload)


@settings(max_examples=examples(200), deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_construct_and_struct_agree_on_esp_header(spi, seq):
    built = wesp.build_esp_header(wesp.EspHeader(spi, seq))
    assert built == wesp.pack_esp_header(spi, seq)
    assert wesp.unpack_esp_header(built) == (spi, seq)
    assert wesp.parse_esp_header(built + b"rest") == wesp.EspHeader(spi, seq)


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=100), st.sampled_from([4, 16]), st.integers(0, 255))
def test_esp_trailer_round_trip(payload, align, next_header):
    trailer = wesp.build_trailer(len(payload), align, next_header)
    assert (len(payload) + len(trailer)) % align == 0
    assert wesp.ESP_TRAILER_TAIL.parse(trailer[-2:]).pad_length == len(trailer) - 2
    assert wesp.parse_trailer(payload + trailer) == (payload, next_header)


def test_esp_trailer_errors():
    with pytest.raises(ParseError) as info:
        wesp.parse_trailer(b"\x01\x03\x02\x04")
    assert info.value.reason is DropReason.BAD_PADDING
    with pytest.raises(ParseError) as info:
        wesp.parse_trailer(b"\x09\x04")
    assert info.value.reason is DropReason.BAD_PADDING
    with pytest.raises(ParseError) as info:
        wesp.parse_esp_header(b"1234567")
    assert info.value.reason is DropReason.TRUNCATED


GOOD = w.build_ipv4(w.Ipv4Header("1.2.3.4", "5.6.7.8", 50), b"x" * 12)


@pytest.mark.parametrize("packet, reason", [
    (GOOD[:19], DropReason.TRUNCATED),
    (b"\x65" + GOOD[1:], DropReason.BAD_IP_VERSION),
    (b"\x44" + GOOD[1:], DropReason.BAD_IP_HEADER_LENGTH),
    (b"\x4f" + GOOD[1:], DropReason.BAD_IP_HEADER_LENGTH),
    (GOOD + b"\x00", DropReason.BAD_IP_TOTAL_LENGTH),
    (GOOD[:10] + b"\x00\x00" + GOOD[12:], DropReason.BAD_IP_CHECKSUM),
])
def test_parse_ipv4_reasons(packet, reason):
    with pytest.raises(ParseError) as info:
        w.parse_ipv4(packet)
    assert info.value.reason is reason


def test_parse_udp_reasons():
    with pytest.raises(ParseError) as info:
        w.parse_udp(b"\x00" * 7)
    assert info.value.reason is DropReason.TRUNCATED
    with pytest.raises(ParseError) as info:
        w.parse_udp(struct.pack("!HHHH", 1, 2, 9, 0))
    assert info.value.reason is DropReason.BAD_UDP_LENGTH


@settings(max_examples=examples(100), deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_address_helpers_round_trip(value):
    text = w.int_to_addr(value)
    assert w.addr_to_int(text) == value
    assert w.bytes_to_addr(w.addr_to_bytes(text)) == text


@pytest.mark.parametrize("bad", ["1.2.3", "1.2.3.256", "a.b.c.d", "1.2.3.4.5", "", " 1.2.3.4",
                                 "1.2.3.-4", "1111.2.3.4"])
def test_bad_addresses(bad):
    with pytest.raises(ValueError):
        w.addr_to_bytes(bad)


def _ipv4(proto: int, body: bytes, ihl: int = 5) -> bytes:
    return bytes([0x40 | ihl, 0, 0, 20 + len(body)]) + bytes(5) + bytes([proto]) + bytes(
        4 * ihl - 10) + body


@pytest.mark.parametrize("packet, spi", [
    (_ipv4(50, bytes.fromhex("0000300300000001")), 0x3003),            # raw ESP
    (_ipv4(50, bytes.fromhex("000030"), ihl=6), None),                  # options: SPI cut
    (_ipv4(50, bytes.fromhex("00003003")), 0x3003),                     # the SPI is all it reads
    (_ipv4(17, bytes.fromhex("11941194000c0000" "00004004")), 0x4004),  # ESP in UDP 4500
    (_ipv4(17, bytes.fromhex("11941194000c0000" "00000000") + b"ike"), None),  # non-ESP marker
    (_ipv4(17, bytes.fromhex("119411940009" "0000ff")), None),          # NAT keepalive
    (_ipv4(17, bytes.fromhex("01f401f4000c0000" "00004004")), None),    # port 500: IKE only
    (_ipv4(6, bytes.fromhex("00003003" * 5)), None),                    # neither
    (bytes.fromhex("4500001c") + bytes(5) + b"\x32", None),            # shorter than IPv4
])
def test_esp_spi_of_tells_esp_from_ike_and_keepalives(packet, spi):
    """RFC 3948 §2: on port 4500 an SPI is ESP, four zero octets IKE, one 0xFF a keepalive."""
    assert wesp.esp_spi_of(packet) == spi
