"""SAD (RFC 4301 §4.4.2): SPI lookup, inbound processing through real SAs, SPD -> SA -> SAD."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason
from mipsec.errors import UsageError
from mipsec.ipsec.sa import Direction, SecurityAssociation, UdpEncap
from mipsec.ipsec.sad import Sad, find_spi
from mipsec.ipsec.selector import Selector
from mipsec.ipsec.spd import Action, Policy, Spd
from mipsec.wire.ipv4 import checksum

MN_HOME, CN = "10.1.0.100", "10.1.0.10"
COA, GW = "172.16.1.10", "172.16.0.1"
KEYS = {"encryption_key": bytes(range(16)), "integrity_key": bytes(range(32, 52))}


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def inner(src=CN, dst=MN_HOME, proto=17, sport=1000, dport=2000, payload=b"payload") -> bytes:
    body = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload \
        if proto in (6, 17) else payload
    header = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(body), 7, 0, 64, proto, 0,
                         ip(src), ip(dst))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + body


def outer_header(proto: int, payload: bytes, frag: int = 0, src=GW, dst=COA) -> bytes:
    return struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0,
                       ip(src), ip(dst)) + payload


def sa_pair(spi=0x1234, udp=False, selector=None, **transform):
    transform = transform or dict(encryption="ENCR_AES_CBC", integrity="AUTH_HMAC_SHA1_96", **KEYS)
    encap = UdpEncap() if udp else None
    out = SecurityAssociation(spi=spi, direction=Direction.OUTBOUND, local=GW, remote=COA,
                              udp_encap=encap, **transform)
    inb = SecurityAssociation(spi=spi, direction=Direction.INBOUND, local=COA, remote=None,
                              udp_encap=encap, selector=selector, **transform)
    return out, inb


# --- finding the SPI -----------------------------------------------------------------------------

def test_find_spi_raw_and_udp():
    assert find_spi(outer_header(50, struct.pack("!II", 0xABCDEF01, 1) + bytes(40))) == 0xABCDEF01
    udp = struct.pack("!HHHH", 4500, 4500, 8 + 48, 0) + struct.pack("!II", 0x1000, 1) + bytes(40)
    assert find_spi(outer_header(17, udp)) == 0x1000


@pytest.mark.parametrize("packet, reason", [
    (b"", DropReason.TRUNCATED),
    (outer_header(50, b"")[:19], DropReason.TRUNCATED),
    (outer_header(50, b"\x00\x00\x10"), DropReason.TRUNCATED),
    (b"\x65" + outer_header(50, bytes(12))[1:], DropReason.BAD_IP_VERSION),
    (b"\x44" + outer_header(50, bytes(12))[1:], DropReason.BAD_IP_HEADER_LENGTH),
    (b"\x4f" + outer_header(50, bytes(12))[1:], DropReason.BAD_IP_HEADER_LENGTH),
    (outer_header(50, bytes(12), frag=0x2000), DropReason.IP_FRAGMENT),
    (outer_header(50, bytes(12), frag=0x0010), DropReason.IP_FRAGMENT),
    (outer_header(6, bytes(12)), DropReason.WRONG_PROTOCOL),
    (outer_header(17, struct.pack("!HHHH", 4500, 4500, 9, 0) + b"\xff"), DropReason.NAT_KEEPALIVE),
    (outer_header(17, struct.pack("!HHHH", 4500, 4500, 20, 0) + bytes(12)),
     DropReason.WRONG_PROTOCOL),                                      # non-ESP marker: IKE
    (outer_header(17, struct.pack("!HHHH", 4500, 4500, 11, 0) + b"\x00\x01\x02"),
     DropReason.TRUNCATED),
    (outer_header(17, b"\x11\x94"), DropReason.TRUNCATED),
])
def test_find_spi_reasons(packet, reason):
    assert find_spi(packet) is reason


# --- the container ---------------------------------------------------------------------------------

def test_add_get_remove():
    _, inb = sa_pair()
    sad = Sad([inb])
    assert sad.get(0x1234) is inb and 0x1234 in sad and len(sad) == 1 and list(sad) == [inb]
    with pytest.raises(UsageError, match="already"):
        sad.add(sa_pair()[1])
    assert sad.remove(0x1234) is inb and sad.get(0x1234) is None
    with pytest.raises(UsageError):
        sad.remove(0x1234)


def test_reserved_spis_are_refused():
    class Fake:
        spi = 255
    with pytest.raises(UsageError, match="SPI"):
        Sad().add(Fake())


# --- inbound through real SAs ------------------------------------------------------------------

@pytest.mark.parametrize("udp", [False, True])
@pytest.mark.parametrize("transform", [
    dict(encryption="ENCR_AES_CBC", integrity="AUTH_HMAC_SHA2_256_128",
         encryption_key=bytes(32), integrity_key=bytes(range(32))),
    dict(encryption="ENCR_AES_GCM_16", encryption_key=bytes(range(20))),
    dict(encryption="ENCR_CHACHA20_POLY1305", encryption_key=bytes(range(36))),
    dict(encryption="ENCR_NULL", integrity="AUTH_HMAC_SHA1_96", encryption_key=b"",
         integrity_key=bytes(20)),
])
def test_process_inbound_round_trip(udp, transform):
    out, inb = sa_pair(udp=udp, **transform)
    _, other = sa_pair(spi=0x9999, udp=udp, **transform)
    sad = Sad([other, inb])
    p = inner()
    esp = out.encapsulate(p, now=1.0)
    assert sad.lookup(esp) is inb
    assert sad.process_inbound(esp, now=1.0) == p
    assert sad.process_inbound(esp, now=1.0) is DropReason.REPLAYED      # counted by the SA
    assert inb.counters.drops[DropReason.REPLAYED] == 1 and not sad.drops
    assert inb.counters.packets == 1 and other.counters.packets == 0


def test_unknown_spi_is_counted_on_the_sad():
    out, inb = sa_pair()
    sad = Sad()
    esp = out.encapsulate(inner())
    assert sad.lookup(esp) is DropReason.UNKNOWN_SPI and not sad.drops   # lookup counts nothing
    assert sad.process_inbound(esp) is DropReason.UNKNOWN_SPI
    assert sad.drops == {DropReason.UNKNOWN_SPI: 1}
    sad.add(inb)
    assert sad.process_inbound(esp) == inner()


def test_tampering_and_selector_mismatch_come_back_as_reasons():
    out, inb = sa_pair(selector=Selector(MN_HOME, "10.1.0.0/24"))  # inbound: CN -> MN home
    sad = Sad([inb])
    good = out.encapsulate(inner())
    bad = bytearray(out.encapsulate(inner()))
    bad[-1] ^= 1
    assert sad.process_inbound(bytes(bad)) is DropReason.ICV_MISMATCH
    assert sad.process_inbound(good) == inner()
    spoof = out.encapsulate(inner(src="192.168.7.7"))
    assert sad.process_inbound(spoof) is DropReason.SELECTOR_MISMATCH
    assert inb.counters.drops == {DropReason.ICV_MISMATCH: 1, DropReason.SELECTOR_MISMATCH: 1}
    assert not sad.drops


def test_spd_protect_then_sad_process_end_to_end():
    out, inb = sa_pair(selector=Selector(MN_HOME, "10.1.0.0/24"))
    spd = Spd([Policy("mn", Selector("10.1.0.0/24", MN_HOME), Action.PROTECT, sa=out),
               Policy("rest", Selector(), Action.DISCARD)])
    sad = Sad([inb])
    for port in range(5):
        p = inner(sport=port)
        esp = spd.protect_outbound(p, now=2.0)
        assert isinstance(esp, bytes) and esp != p
        assert sad.process_inbound(esp, now=2.0) == p
    assert spd.protect_outbound(inner(dst="10.1.0.101")) is DropReason.POLICY_DISCARD
    assert out.counters.packets == inb.counters.packets == 5


@settings(max_examples=examples(200), deadline=None)
@given(data=st.binary(max_size=80), udp=st.booleans())
def test_random_bytes_never_raise(data, udp):
    sad = Sad([sa_pair(udp=udp)[1]])
    result = sad.process_inbound(data)
    assert isinstance(result, DropReason)
    result = sad.process_inbound(outer_header(17 if udp else 50, struct.pack("!I", 0x1234) + data))
    assert isinstance(result, DropReason)


@settings(max_examples=examples(150), deadline=None)
@given(st.data())
def test_mutated_packets_never_raise_and_never_pass(data):
    udp = data.draw(st.booleans())
    out, inb = sa_pair(udp=udp)
    sad = Sad([inb])
    esp = bytearray(out.encapsulate(inner()))
    # RFC 3948 §2.1/§3.1: the UDP source port (a NAT rewrites it) and checksum (0, unchecked)
    # are not authenticated; every other byte is covered by the IP checksum or the ICV.
    unprotected = {20, 21, 26, 27} if udp else set()
    position = data.draw(st.integers(0, len(esp) - 1).filter(lambda i: i not in unprotected))
    esp[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(esp)))
    result = sad.process_inbound(bytes(esp[:cut]))
    assert isinstance(result, DropReason)
    assert inb.counters.packets == 0 and inb.replay.top == 0


@settings(max_examples=examples(200), deadline=None)
@given(udp=st.booleans(), known=st.booleans(), ihl=st.sampled_from([5, 5, 6]),
       frag=st.sampled_from([0, 0, 0x2000, 0x4000]), cut=st.integers(0, 60))
def test_fast_spi_path_agrees_with_find_spi(udp, known, ihl, frag, cut):
    """process_inbound's fixed-offset fast path finds the same SA as find_spi()."""
    class Probe:
        def __init__(self, spi):
            self.spi, self.seen = spi, []

        def decapsulate(self, packet, now=0.0):
            self.seen.append(packet)
            return b"inner"
    spi = 0x4242 if known else 0x4343
    probe = Probe(0x4242)
    esp = struct.pack("!II", spi, 1) + bytes(24)
    if udp:
        esp = struct.pack("!HHHH", 4500, 4500, 8 + len(esp), 0) + esp
    options = bytes(4 * (ihl - 5))
    pkt = (struct.pack("!BBHHHBBHII", 0x40 | ihl, 0, 0, 0, frag, 64, 17 if udp else 50, 0,
                       ip(GW), ip(COA)) + options + esp)[:cut]
    sad = Sad([probe])
    found = find_spi(pkt)
    result = sad.process_inbound(pkt)
    if found == 0x4242:
        assert result == b"inner" and probe.seen == [pkt]
    else:
        assert probe.seen == []
        assert result is (DropReason.UNKNOWN_SPI if isinstance(found, int) and
                          not isinstance(found, DropReason) else found)
