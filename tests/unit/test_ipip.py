"""IP-in-IP (RFC 2003) and the reverse-tunnel check (RFC 3024), cross-checked with Scapy."""

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP

from levels import examples
from mipsec.drops import DropReason
from mipsec.errors import ParseError
from mipsec.mip.ipip import check_reverse_tunnel, decapsulate, encapsulate, inner_source

HA, COA, HOME, CN = "10.1.0.2", "172.16.1.10", "10.1.0.100", "10.1.0.10"


def inner(df=True, tos=0x10, payload=b"hello"):
    return bytes(IP(src=CN, dst=HOME, tos=tos, flags="DF" if df else 0, ttl=63)
                 / UDP(sport=5000, dport=6000) / payload)


@pytest.mark.parametrize("df", [True, False])
def test_encapsulate_matches_scapy_view(df):
    pkt = inner(df=df)
    outer = encapsulate(pkt, HA, COA, identification=0x1234)
    sc = IP(outer)
    assert (sc.version, sc.ihl, sc.proto, sc.ttl, sc.src, sc.dst, sc.id) == (
        4, 5, 4, 64, HA, COA, 0x1234)
    assert sc.tos == 0x10                                       # RFC 2003 §3.1: TOS copied
    assert bool(sc.flags.DF) is df                              # DF copied
    assert sc.len == len(outer) == 20 + len(pkt)
    rebuilt = IP(outer)
    del rebuilt.chksum
    assert bytes(rebuilt)[:20] == outer[:20]                     # Scapy computes the same checksum
    assert bytes(sc.payload) == pkt


def test_round_trip():
    pkt = inner()
    assert decapsulate(encapsulate(pkt, HA, COA)) == (HA, COA, pkt)
    assert inner_source(pkt) == CN


def test_decapsulate_scapy_built():
    pkt = inner()
    outer = bytes(IP(src=COA, dst=HA, proto=4) / IP(pkt))
    assert decapsulate(outer) == (COA, HA, pkt)


def test_truncated_at_every_offset():
    outer = encapsulate(inner(), HA, COA)
    for n in range(len(outer)):
        with pytest.raises(ParseError) as info:
            decapsulate(outer[:n])
        assert info.value.reason in (DropReason.TRUNCATED, DropReason.BAD_IP_TOTAL_LENGTH,
                                     DropReason.BAD_IP_HEADER_LENGTH), n
        if n < 20:
            assert info.value.reason is DropReason.TRUNCATED


def mutate(packet, offset, value, fix_checksum=True):
    raw = bytearray(packet)
    raw[offset] = value
    if fix_checksum:
        sc = IP(bytes(raw))
        del sc.chksum
        raw[:20] = bytes(sc)[:20]
    return bytes(raw)


@pytest.mark.parametrize("offset,value,reason", [
    (0, 0x65, DropReason.BAD_IP_VERSION),
    (0, 0x44, DropReason.BAD_IP_HEADER_LENGTH),
    (9, 17, DropReason.WRONG_PROTOCOL),
    (9, 50, DropReason.WRONG_PROTOCOL),
    (6, 0x20, DropReason.IP_FRAGMENT),          # MF
    (7, 0x01, DropReason.IP_FRAGMENT),          # fragment offset
    (20, 0x65, DropReason.IPIP_BAD_INNER),      # inner version 6
    (20, 0x44, DropReason.IPIP_BAD_INNER),      # inner IHL 4
    (22, 0x7F, DropReason.IPIP_BAD_INNER),      # inner total length too large
])
def test_bad_headers_each_with_a_reason(offset, value, reason):
    outer = encapsulate(inner(), HA, COA)
    bad = mutate(outer, offset, value, fix_checksum=0 < offset < 20)
    with pytest.raises(ParseError) as info:
        decapsulate(bad)
    assert info.value.reason is reason


def test_bad_checksum_and_total_length():
    outer = encapsulate(inner(), HA, COA)
    with pytest.raises(ParseError) as info:
        decapsulate(mutate(outer, 15, outer[15] ^ 1, fix_checksum=False))
    assert info.value.reason is DropReason.BAD_IP_CHECKSUM
    with pytest.raises(ParseError) as info:
        decapsulate(outer + b"\0")
    assert info.value.reason is DropReason.BAD_IP_TOTAL_LENGTH


def test_inner_too_short():
    outer = bytes(IP(src=COA, dst=HA, proto=4) / (b"\x45" + b"\0" * 10))
    with pytest.raises(ParseError) as info:
        decapsulate(outer)
    assert info.value.reason is DropReason.IPIP_BAD_INNER


@dataclass
class Binding:
    home_address: str
    care_of_address: str | None


def test_reverse_tunnel_check():
    b = Binding(HOME, COA)
    assert check_reverse_tunnel(COA, HOME, b) is None
    assert check_reverse_tunnel("172.16.2.10", HOME, b) is DropReason.REVERSE_TUNNEL_SOURCE_MISMATCH
    assert check_reverse_tunnel(COA, "10.1.0.101", b) is DropReason.REVERSE_TUNNEL_SOURCE_MISMATCH
    assert check_reverse_tunnel(COA, HOME, None) is DropReason.IPIP_UNKNOWN_TUNNEL
    assert check_reverse_tunnel(COA, HOME, Binding(HOME, None)) is DropReason.IPIP_UNKNOWN_TUNNEL


def test_accepts_bytearray_and_memoryview():
    outer = encapsulate(inner(), HA, COA)
    for buf in (bytearray(outer), memoryview(outer)):
        src, dst, pkt = decapsulate(buf)
        assert (src, dst, pkt) == (HA, COA, inner()) and type(pkt) is bytes



@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=80), st.integers(0, 60), st.binary(min_size=1, max_size=3))
def test_random_and_spliced_input_only_raises_parse_error(noise, cut, patch):
    base = encapsulate(inner(), HA, COA)
    for data in (noise, base[:cut] + patch + base[cut + len(patch):]):
        try:
            decapsulate(data)
        except ParseError:
            pass
