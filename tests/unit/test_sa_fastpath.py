"""The SA's specialised data path (per-SA closures) against the reference behaviour it inlines:
the selector prefix comparison against ``Selector.matches_*``, closure state against rebind and
a new selector, and the integer forms kept for the last authenticated source."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason
from mipsec.errors import Dropped
from mipsec.ipsec.sa import Direction, SecurityAssociation, UdpEncap
from mipsec.ipsec.selector import ANY, Selector
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4, checksum, parse_ipv4

GW, COA_A, COA_B = "172.16.0.1", "172.16.1.10", "172.16.2.10"
HOME, CN = "10.1.0.100", "10.1.0.10"
KEY = bytes(range(20))


def sa_pair(selector=None, udp=None, **kw):
    common = dict(spi=0x2002, encryption="ENCR_AES_GCM_16", encryption_key=KEY, udp_encap=udp)
    out = SecurityAssociation(direction=Direction.OUTBOUND, local=COA_A, remote=GW,
                              selector=kw.get("out_selector"), **common)
    inb = SecurityAssociation(direction=Direction.INBOUND, local=GW, remote=COA_A,
                              selector=selector, **common)
    return out, inb


def raw_inner(src: int, dst: int, proto: int, ihl_words: int, extra: int, frag: int) -> bytes:
    """An IPv4 packet with any IHL (options of NOPs), total length = its length."""
    options = b"\x01" * (4 * (ihl_words - 5))
    body = bytes(range(extra))
    total = 4 * ihl_words + extra
    header = struct.pack("!BBHHHBBHII", 0x40 | ihl_words, 0, total, 1, frag, 64, proto, 0,
                         src, dst) + options
    return header + body


prefixes = st.sampled_from([None, "10.1.0.100", "10.1.0.0/24", "10.0.0.0/8", "0.0.0.0/1",
                            "192.168.0.0/16"])
addresses = st.sampled_from([0x0A010064, 0x0A01000A, 0x0A020304, 0xC0A80101, 0x7F000001])


@settings(max_examples=examples(300), deadline=None)
@given(local=prefixes, remote=prefixes, src=addresses, dst=addresses,
       proto=st.sampled_from([1, 6, 17, 50]), ihl=st.sampled_from([5, 5, 5, 6]),
       extra=st.integers(0, 12), frag=st.sampled_from([0, 0x4000, 0x0001]))
def test_inline_selector_check_agrees_with_the_selector(local, remote, src, dst, proto, ihl,
                                                        extra, frag):
    selector = Selector(local, remote)
    packet = raw_inner(src, dst, proto, ihl, extra, frag)
    # outbound: protect only what the selector allows (RFC 4301 §5.1)
    out = SecurityAssociation(spi=0x2002, direction=Direction.OUTBOUND,
                              encryption="ENCR_AES_GCM_16", encryption_key=KEY, local=COA_A,
                              remote=GW, selector=selector)
    try:
        out.encapsulate(packet)
        protected = True
    except Dropped as exc:
        assert exc.reason is DropReason.SELECTOR_MISMATCH
        protected = False
    assert protected == selector.matches_outbound(packet)
    # inbound: the inner packet (sent without a selector) must match (RFC 4301 §5.2)
    plain_out, inb = sa_pair(selector)
    try:
        assert inb.decapsulate(plain_out.encapsulate(packet)) == packet
        accepted = True
    except Dropped as exc:
        assert exc.reason is DropReason.SELECTOR_MISMATCH
        accepted = False
    assert accepted == selector.matches_inbound(packet)


def test_general_selectors_and_any_still_refuse():
    packet = build_ipv4(Ipv4Header(CN, HOME, 17), struct.pack("!HHHH", 1, 2, 8, 0))
    # protocol / ports: the selector's own method decides
    for selector, ok in ((Selector(HOME, CN, "udp"), True), (Selector(HOME, CN, "tcp"), False),
                         (Selector(HOME, CN, "udp", local_ports=(2, 2)), True),
                         (Selector(HOME, CN, "udp", local_ports=(3, 3)), False)):
        out, inb = sa_pair(selector)
        if ok:
            assert inb.decapsulate(out.encapsulate(packet)) == packet
        else:
            with pytest.raises(Dropped) as info:
                inb.decapsulate(out.encapsulate(packet))
            assert info.value.reason is DropReason.SELECTOR_MISMATCH
    # ANY refuses what Selector.matches_inbound refuses: a UDP packet too short for its ports
    short = raw_inner(0x0A01000A, 0x0A010064, 17, 5, 2, 0)
    assert not ANY.matches_inbound(short)
    out, inb = sa_pair(ANY)
    with pytest.raises(Dropped) as info:
        inb.decapsulate(out.encapsulate(short))
    assert info.value.reason is DropReason.SELECTOR_MISMATCH


def test_references_taken_before_rebind_follow_it():
    out, inb = sa_pair()
    encapsulate, decapsulate = out.encapsulate, inb.decapsulate
    packet = build_ipv4(Ipv4Header(CN, HOME, 17), bytes(8))
    out.rebind(local=COA_B)
    header, _ = parse_ipv4(encapsulate(packet))           # checksum verified by the parser
    assert header.source == COA_B
    with pytest.raises(Dropped) as info:
        decapsulate(encapsulate(packet))
    assert info.value.reason is DropReason.OUTER_SOURCE_MISMATCH
    inb.rebind(remote=COA_B)
    assert decapsulate(encapsulate(packet)) == packet
    assert inb.counters.last_authenticated_source == COA_B
    inb.rebind(remote=None)                               # wildcard source
    assert decapsulate(encapsulate(packet)) == packet


def test_udp_ports_follow_rebind_and_selector_follows_assignment():
    out, inb = sa_pair(udp=UdpEncap(4500, 4500))
    encapsulate, decapsulate = out.encapsulate, inb.decapsulate
    packet = build_ipv4(Ipv4Header(CN, HOME, 17), bytes(8))
    out.rebind(udp_encap=UdpEncap(4500, 40000))
    outer = encapsulate(packet)
    assert struct.unpack_from("!HH", outer, 20) == (4500, 40000)
    with pytest.raises(Dropped) as info:
        decapsulate(outer)
    assert info.value.reason is DropReason.WRONG_UDP_PORT
    inb.rebind(udp_encap=UdpEncap(40000, 4500))
    assert decapsulate(outer) == packet
    inb.selector = Selector("192.168.0.0/16")
    assert inb.selector == Selector("192.168.0.0/16")
    with pytest.raises(Dropped) as info:
        decapsulate(encapsulate(packet))
    assert info.value.reason is DropReason.SELECTOR_MISMATCH
    inb.selector = None
    assert decapsulate(encapsulate(packet)) == packet


def test_outer_checksum_fast_sum_matches_rfc1071():
    """Every single-bit error in the outer header is caught as the reference checksum says."""
    out, inb = sa_pair()
    packet = build_ipv4(Ipv4Header(CN, HOME, 17), bytes(8))
    outer = out.encapsulate(packet)
    assert checksum(outer[:20]) == 0
    for bit in range(160):
        if bit // 8 in (2, 3):
            continue                       # total length: refused earlier, for that reason
        damaged = bytearray(outer)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(Dropped) as info:
            inb.decapsulate(bytes(damaged))
        if bit // 8 == 0 and (damaged[0] >> 4) != 4:
            assert info.value.reason is DropReason.BAD_IP_VERSION
        elif bit // 8 == 0:
            assert info.value.reason in (DropReason.BAD_IP_HEADER_LENGTH,
                                         DropReason.BAD_IP_CHECKSUM)
        else:
            assert info.value.reason is DropReason.BAD_IP_CHECKSUM
    assert inb.counters.packets == 0 and inb.replay.top == 0
    assert inb.decapsulate(outer) == packet             # the undamaged packet still passes
