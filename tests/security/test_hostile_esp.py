"""Hostile input to the ESP data path, beyond byte flips and truncation.

Structured attacks on one inbound SA and on the SAD in front of it: authenticated packets whose
inner datagram is not a usable IPv4 packet, trailers at their limits, reserved SPIs, sequence
number 0 and ESN edges, outer IHL 0..15, fragments, UDP framing.  Every case asserts the specific
DropReason, that it is counted once under that reason, that nothing else in the SA's status moved
(``describe()`` minus the drop counters, the replay bitmap), and that no exception other than
``Dropped`` comes out.  ``Sad.process_inbound`` must never raise at all.
"""

from __future__ import annotations

import os
import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason as R
from mipsec.errors import Dropped
from mipsec.ipsec.sa import Direction, SecurityAssociation, UdpEncap
from mipsec.ipsec.sad import Sad
from mipsec.ipsec.selector import Selector
from mipsec.wire.esp import build_trailer
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4, checksum

GW, COA = "172.16.0.1", "172.16.1.10"
HOME, CN = "10.1.0.100", "10.1.0.10"
SPI = 0x2001
SUITES = {
    "cbc-sha1": ("ENCR_AES_CBC", 16, "AUTH_HMAC_SHA1_96", 20),
    "gcm128": ("ENCR_AES_GCM_16", 20, None, 0),
    "chacha": ("ENCR_CHACHA20_POLY1305", 36, None, 0),
    "null-sha256": ("ENCR_NULL", 0, "AUTH_HMAC_SHA2_256_128", 32),
}


def _inner(payload: bytes = b"hostile", *, options: bytes = b"") -> bytes:
    udp = struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload
    return build_ipv4(Ipv4Header(HOME, CN, 17, ttl=63, options=options), udp)


def _pair(name="gcm128", *, esn=False, udp=False, selector=None, remote=COA):
    enc, ek, integ, ik = SUITES[name]
    keys = dict(encryption=enc, encryption_key=os.urandom(ek), integrity=integ,
                integrity_key=os.urandom(ik), esn=esn, udp_encap=UdpEncap() if udp else None)
    out = SecurityAssociation(spi=SPI, direction=Direction.OUTBOUND, local=COA, remote=GW, **keys)
    inb = SecurityAssociation(spi=SPI, direction=Direction.INBOUND, local=GW, remote=remote,
                              selector=selector, **keys)
    return out, inb


def _authentic(out: SecurityAssociation, plaintext: bytes) -> bytes:
    """A packet with a valid ICV from ``out``'s keys around an arbitrary ESP plaintext."""
    out.sequence += 1
    seq = out.sequence
    header = out.spi.to_bytes(4, "big") + (seq & 0xFFFFFFFF).to_bytes(4, "big")
    esp = out.transform.seal(header, seq, (seq >> 32).to_bytes(4, "big") if out.esn else b"",
                             plaintext)
    return build_ipv4(Ipv4Header(COA, GW, 50), esp)


def _fix(packet: bytearray) -> bytes:
    ihl = (packet[0] & 0x0F) * 4
    packet[10:12] = b"\0\0"
    packet[10:12] = checksum(bytes(packet[:max(20, ihl)])).to_bytes(2, "big")
    return bytes(packet)


def _state(sa: SecurityAssociation):
    d = sa.describe()
    d["counters"] = {k: v for k, v in d["counters"].items() if k != "drops"}
    return d, sa.replay.snapshot()


class Probe:
    def __init__(self, sa: SecurityAssociation):
        self.sa = sa
        self.expected: Counter = Counter(sa.counters.drops)

    def refuse(self, packet: bytes, reason: R, what: str = "") -> None:
        before = _state(self.sa)
        with pytest.raises(Dropped) as info:
            self.sa.decapsulate(packet, 1.0)
        assert info.value.reason is reason, f"{what}: {info.value.reason} instead of {reason}"
        self.expected[reason] += 1
        assert self.sa.counters.drops == self.expected, what
        assert _state(self.sa) == before, f"{what}: state moved"


def _bad_inner_cases():
    good = _inner()
    yield "IHL 0", bytes([0x40]) + good[1:]
    for ihl in range(1, 5):
        yield f"IHL {ihl}", bytes([0x40 | ihl]) + good[1:]
    yield "IHL 15 past a 20-byte packet", bytes([0x4F]) + good[1:2] + (20).to_bytes(2, "big") \
        + good[4:20]
    yield "IHL 7 past the total length", bytes([0x47]) + good[1:2] + (24).to_bytes(2, "big") \
        + good[4:24]
    yield "version 6", bytes([0x60]) + good[1:]
    yield "version 0", bytes([0x05]) + good[1:]
    yield "total length 19", good[:2] + (19).to_bytes(2, "big") + good[4:]
    yield "total length past the payload", good[:2] + (len(good) + 1).to_bytes(2, "big") + good[4:]
    yield "10 bytes", good[:10]
    yield "empty", b""


@pytest.mark.parametrize("name", sorted(SUITES))
@pytest.mark.parametrize("selector", [None, "any", "hosts"])
def test_authentic_packet_with_unusable_inner_datagram_is_malformed(name, selector):
    """RFC 4303 §3.4.4 / RFC 4301 §5.2: after decryption the tunnel-mode payload must be an IPv4
    datagram; an inner header whose IHL is below 5 or past its own total length is not one, even
    when the SA has no selector to look at it (the library API hands the inner packet on)."""
    sel = {None: None, "any": Selector(), "hosts": Selector(CN + "/32", HOME + "/32")}[selector]
    out, inb = _pair(name, selector=sel)
    probe = Probe(inb)
    align = out.transform.align
    for what, bad in _bad_inner_cases():
        plaintext = bad + build_trailer(len(bad), align, 4)
        probe.refuse(_authentic(out, plaintext), R.MALFORMED, what)
    # and the SA still works; a valid inner packet with options is accepted as it is
    good = _inner(options=b"\x94\x04\x00\x00")          # router alert (RFC 2113)
    pkt = _authentic(out, good + build_trailer(len(good), align, 4))
    assert inb.decapsulate(pkt) == good
    assert inb.counters.packets == 1


def _aligned(data: bytes, align: int, tail: bytes) -> bytes:
    """``data`` cut or zero-filled so that data + tail is a multiple of ``align`` (the CBC
    context is persistent: a plaintext that is not whole blocks would corrupt it)."""
    need = -(len(data) + len(tail)) % align
    return data + bytes(need) + tail


@pytest.mark.parametrize("name", sorted(SUITES))
def test_trailer_limits_after_authentication(name):
    out, inb = _pair(name)
    probe = Probe(inb)
    body = _inner()
    align = out.transform.align
    # pad length 255 in a plaintext too short to hold 255 bytes of padding
    probe.refuse(_authentic(out, _aligned(body, align, b"\xff\x04")), R.BAD_PADDING,
                 "pad length 255, short")
    # pad length 255 over data that is not 1, 2, 3 ...
    probe.refuse(_authentic(out, _aligned(body * 9, align, b"\xff\x04")), R.BAD_PADDING,
                 "pad length 255 over data")
    for nh in (0, 6, 17, 41, 50, 58, 60, 255):
        probe.refuse(_authentic(out, body + build_trailer(len(body), align, nh)),
                     R.BAD_NEXT_HEADER, f"next header {nh}")
    probe.refuse(_authentic(out, body + build_trailer(len(body), align, 59)), R.DUMMY_PACKET)
    # the trailer alone, no datagram in front of it
    probe.refuse(_authentic(out, build_trailer(0, align, 4)), R.MALFORMED, "empty payload")
    # 255 correct padding bytes are legal (RFC 4303 §2.4: 0-255)
    long_pad = body + bytes(range(1, 256)) + b"\xff\x04"
    if len(long_pad) % align == 0:
        assert inb.decapsulate(_authentic(out, long_pad)) == body
    assert inb.decapsulate(_authentic(out, body + build_trailer(len(body), align, 4))) == body


@pytest.mark.parametrize("udp", [False, True], ids=["raw", "udp"])
def test_outer_ihl_every_value(udp):
    out, inb = _pair("gcm128", udp=udp)
    probe = Probe(inb)
    packet = out.encapsulate(_inner())
    for ihl in range(0, 5):
        bad = bytearray(packet)
        bad[0] = 0x40 | ihl
        probe.refuse(bytes(bad), R.BAD_IP_HEADER_LENGTH, f"IHL {ihl}")
    for ihl in range(6, 16):
        # a header that really has options of that size, checksum right: options are skipped
        options = b"\x01" * (ihl * 4 - 20)
        pkt = bytearray(packet[:20] + options + packet[20:])
        pkt[0] = 0x40 | ihl
        pkt[2:4] = len(pkt).to_bytes(2, "big")
        assert inb.decapsulate(_fix(pkt), 1.0) == _inner(), f"IHL {ihl}"
        packet = out.encapsulate(_inner())
        # the same IHL claimed without the option bytes: the ESP header is read at the wrong place
        bad = bytearray(packet)
        bad[0] = 0x40 | ihl
        got_reason = None
        try:
            inb.decapsulate(_fix(bad), 1.0)
        except Dropped as exc:
            got_reason = exc.reason
        assert got_reason in (R.UNKNOWN_SPI, R.TRUNCATED, R.WRONG_UDP_PORT, R.BAD_UDP_LENGTH,
                              R.ICV_MISMATCH, R.WRONG_PROTOCOL, R.NAT_KEEPALIVE), (ihl, got_reason)
        probe.expected[got_reason] += 1
    assert inb.counters.drops == probe.expected


def test_fragments_every_flag_combination():
    out, inb = _pair("cbc-sha1")
    probe = Probe(inb)
    packet = out.encapsulate(_inner())
    for flags in (0x2000, 0x0001, 0x1FFF, 0x2001, 0x6000, 0x4001):
        bad = bytearray(packet)
        bad[6:8] = flags.to_bytes(2, "big")
        probe.refuse(_fix(bad), R.IP_FRAGMENT, f"flags {flags:#06x}")
    bad = bytearray(packet)
    bad[6:8] = (0x4000).to_bytes(2, "big")              # DF alone is not a fragment
    assert inb.decapsulate(_fix(bad), 1.0) == _inner()


def test_sequence_zero_and_esn_edges():
    out, inb = _pair("gcm128")
    probe = Probe(inb)
    out.sequence = -1                                   # the next packet carries sequence 0
    probe.refuse(_authentic(out, _inner() + build_trailer(len(_inner()), 4, 4)), R.TOO_OLD, "seq 0")
    # ESN: low half 0 at the very start is sequence 0 too (RFC 4303 §3.3.3: the first is 1)
    out, inb = _pair("cbc-sha1", esn=True)
    probe = Probe(inb)
    packet = bytearray(out.encapsulate(_inner()))
    packet[24:28] = bytes(4)
    probe.refuse(bytes(packet), R.TOO_OLD, "ESN seq 0")
    # ESN, window across the 2**32 boundary (RFC 4303 Appendix A2.2 case B): a late packet from
    # the end of subspace 0 is still inside the window and accepted once, then REPLAYED
    inb.replay.update(0xFFFFFF00)                   # as if 0xFFFFFF00 had been received
    out.sequence = 0xFFFFFFF0 - 1
    late = out.encapsulate(_inner())
    out.sequence = 2**32 + 100
    inb.decapsulate(out.encapsulate(_inner()), 1.0)
    assert inb.replay.top == 2**32 + 101
    assert inb.decapsulate(late, 1.0) == _inner()
    probe.expected = Counter(inb.counters.drops)
    probe.refuse(late, R.REPLAYED, "late packet from subspace 0, again")
    # left of the window the low half is taken as the NEXT subspace (A2.2): the ICV fails,
    # as the RFC intends, and nothing moves
    stale = bytearray(out.encapsulate(_inner()))
    stale[24:28] = (0xFFFFF000).to_bytes(4, "big")
    probe.refuse(bytes(stale), R.ICV_MISMATCH, "left of the window, guessed as the next subspace")


def test_udp_framing_edges():
    out, inb = _pair("gcm128", udp=True)
    probe = Probe(inb)
    packet = out.encapsulate(_inner())
    keepalive = bytearray(packet[:29])
    keepalive[2:4] = (29).to_bytes(2, "big")
    keepalive[24:26] = (9).to_bytes(2, "big")
    keepalive[28] = 0xFF
    probe.refuse(_fix(keepalive), R.NAT_KEEPALIVE, "keepalive")
    not_keepalive = bytearray(keepalive)
    not_keepalive[28] = 0xFE
    probe.refuse(_fix(not_keepalive), R.TRUNCATED, "one byte that is no keepalive")
    empty = bytearray(packet[:28])
    empty[2:4] = (28).to_bytes(2, "big")
    empty[24:26] = (8).to_bytes(2, "big")
    probe.refuse(_fix(empty), R.TRUNCATED, "UDP header only")
    for ulen in (0, 7, 8, len(packet) - 21, len(packet) - 19, 0xFFFF):
        bad = bytearray(packet)
        bad[24:26] = ulen.to_bytes(2, "big")
        probe.refuse(bytes(bad), R.BAD_UDP_LENGTH, f"UDP length {ulen}")
    ike = bytearray(packet)
    ike[28:32] = bytes(4)
    probe.refuse(bytes(ike), R.WRONG_PROTOCOL, "non-ESP marker (IKE)")
    for port in (500, 4501, 0):
        bad = bytearray(packet)
        bad[22:24] = port.to_bytes(2, "big")
        probe.refuse(bytes(bad), R.WRONG_UDP_PORT, f"port {port}")


def test_sad_reserved_and_unknown_spis_change_nothing():
    out, inb = _pair("gcm128")
    sad = Sad([inb])
    packet = out.encapsulate(_inner())
    before = _state(inb)
    for spi in [0, 1, 2, 255, 256, SPI + 1, 0xFFFFFFFF]:
        bad = packet[:20] + spi.to_bytes(4, "big") + packet[24:]
        assert sad.process_inbound(bad) is R.UNKNOWN_SPI
    assert sad.drops[R.UNKNOWN_SPI] == 7
    assert _state(inb) == before and not inb.counters.drops
    assert sad.process_inbound(packet) == _inner()


# --- properties ----------------------------------------------------------------------------------
_SAD_OUT, _SAD_IN = _pair("cbc-sha1", remote=None)
_SAD = Sad([_SAD_IN])
_INNERS = [_inner(b"x" * n) for n in (0, 1, 15, 16, 100)]
_SEED = [_SAD_OUT.encapsulate(i) for i in _INNERS]


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_SEED), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                        max_size=4),
       st.integers(0, 250), st.booleans())
def test_sad_never_raises_and_only_counts(seed, edits, cut, fix_checksum):
    bad = bytearray(seed)
    for pos, value in edits:
        if pos < len(bad):
            bad[pos] = value
    bad = bad[:max(0, len(bad) - cut)] if cut < len(bad) else bad[:cut % 40]
    if fix_checksum and len(bad) >= 20 and 20 <= (bad[0] & 0x0F) * 4 <= len(bad):
        bad = bytearray(_fix(bad))
    window = _SAD_IN.replay.snapshot()
    packets = _SAD_IN.counters.packets
    result = _SAD.process_inbound(bytes(bad))
    if isinstance(result, R):
        assert _SAD_IN.replay.snapshot() == window
        assert _SAD_IN.counters.packets == packets
    else:
        assert result in _INNERS           # only an authentic inner packet ever comes out
        assert _SAD_IN.counters.packets == packets + 1
