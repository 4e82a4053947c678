"""Every byte flipped and every truncation, for every transform, raw and UDP-encapsulated.

Each bad packet must give the reason the fixed inbound order predicts (docs/design.md,
style.md item 8), count it under that reason only, and change nothing else: not the replay
window, not the packet counters, not the last authenticated source.  Afterwards the genuine
packet is still accepted, which proves the window did not move.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from mipsec.drops import DropReason as R
from mipsec.errors import Dropped
from mipsec.ipsec.sa import Direction, SecurityAssociation, UdpEncap
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4, checksum

LOCAL, PEER = "172.16.0.1", "172.16.1.10"
TRANSFORMS = [
    ("ENCR_AES_CBC", 16, "AUTH_HMAC_SHA1_96", 20),
    ("ENCR_AES_CBC", 24, "AUTH_HMAC_SHA2_256_128", 32),
    ("ENCR_AES_CBC", 32, "AUTH_HMAC_SHA2_384_192", 48),
    ("ENCR_AES_CBC", 32, "AUTH_HMAC_SHA2_512_256", 64),
    ("ENCR_AES_GCM_16", 20, None, 0),
    ("ENCR_AES_GCM_16", 36, None, 0),
    ("ENCR_CHACHA20_POLY1305", 36, None, 0),
    ("ENCR_NULL", 0, "AUTH_HMAC_SHA1_96", 20),
    ("ENCR_NULL", 0, "AUTH_HMAC_SHA2_512_256", 64),
]
IDS = [f"{e}-{k}-{i}" for e, k, i, _ in TRANSFORMS]
INNER = build_ipv4(Ipv4Header("10.1.0.100", "10.1.0.10", 17, ttl=63),
                   bytes.fromhex("04d2162e0015") + b"\x00\x00" + b"tamper me")


def _sas(transform, udp, esn):
    enc, ek, integ, ik = transform
    keys = dict(encryption=enc, encryption_key=os.urandom(ek), integrity=integ,
                integrity_key=os.urandom(ik), esn=esn,
                udp_encap=UdpEncap() if udp else None)
    out = SecurityAssociation(spi=0x00C0FFEE, direction=Direction.OUTBOUND, local=PEER,
                              remote=LOCAL, **keys)
    inb = SecurityAssociation(spi=0x00C0FFEE, direction=Direction.INBOUND, local=LOCAL,
                              remote=PEER, **keys)
    return out, inb


def _fix_ip(packet: bytearray) -> bytes:
    """Recompute the outer header checksum, as an on-path attacker would."""
    packet[10:12] = b"\x00\x00"
    packet[10:12] = checksum(bytes(packet[:20])).to_bytes(2, "big")
    return bytes(packet)


class Probe:
    """Feeds bad packets to one inbound SA and checks that only the drop counter moves."""

    def __init__(self, inb: SecurityAssociation):
        self.sa = inb
        self.expected: Counter = Counter()

    def refuse(self, packet: bytes, reason: R, what: str) -> None:
        sa = self.sa
        window = sa.replay.snapshot()
        state = (sa.counters.packets, sa.counters.octets, sa.counters.last_authenticated_time,
                 sa.counters.last_authenticated_source)
        try:
            sa.decapsulate(packet, now=1.0)
        except Dropped as drop:
            got = drop.reason
        else:
            raise AssertionError(f"{what}: accepted")
        assert got is reason, f"{what}: {got} instead of {reason}"
        self.expected[reason] += 1
        assert sa.counters.drops == self.expected, what
        assert sa.replay.snapshot() == window, f"{what}: window moved"
        assert (sa.counters.packets, sa.counters.octets, sa.counters.last_authenticated_time,
                sa.counters.last_authenticated_source) == state, f"{what}: counters moved"


def _flip_reason(i: int, packet: bytes, udp: bool, fixed_checksum: bool) -> R | None:
    """What flipping the lowest bit of byte i must give (None: the field is not protected and
    not checked, so the packet is still accepted)."""
    esp = 28 if udp else 20
    if i == 0:
        return R.BAD_IP_HEADER_LENGTH                  # IHL 5 -> 4
    if i in (2, 3):
        return R.BAD_IP_TOTAL_LENGTH
    if i < 20 and not fixed_checksum:
        return R.BAD_IP_CHECKSUM
    if i in (10, 11):
        return R.BAD_IP_CHECKSUM                       # the checksum field itself
    if i in (1, 4, 5, 8):
        return None                                    # TOS, identification, TTL
    if i in (6, 7):
        return R.IP_FRAGMENT
    if i == 9:
        return R.WRONG_PROTOCOL
    if 12 <= i < 16:
        return R.OUTER_SOURCE_MISMATCH
    if 16 <= i < 20:
        return R.OUTER_DESTINATION_MISMATCH
    if udp and i < 28:
        if i in (20, 21, 26, 27):
            return None                                # source port, checksum (RFC 3948)
        if i in (22, 23):
            return R.WRONG_UDP_PORT
        return R.BAD_UDP_LENGTH
    if esp <= i < esp + 4:
        return R.UNKNOWN_SPI
    if i == esp + 7 and packet[i] == 1:
        return R.TOO_OLD                               # sequence number 1 -> 0
    return R.ICV_MISMATCH                              # sequence number, IV, data, ICV


def _truncation_reason(length: int, full: bytes, inb: SecurityAssociation, udp: bool) -> R:
    """Truncated with the outer (and UDP) length fields fixed up to match."""
    esp_len = length - (28 if udp else 20)
    t = inb.transform
    minimum = 8 + t.iv_size + max(2, t.block_size) + t.icv_size
    if udp and length < 28:
        return R.TRUNCATED
    if esp_len < minimum:
        return R.TRUNCATED
    if t.block_size == 16 and (esp_len - 8 - 16 - t.icv_size) % 16:
        return R.BAD_CIPHERTEXT_LENGTH
    return R.ICV_MISMATCH


@pytest.mark.parametrize("udp", [False, True], ids=["raw", "udp"])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
def test_every_byte_flipped(transform, udp):
    out, inb = _sas(transform, udp, esn=False)
    packet = out.encapsulate(INNER)
    probe = Probe(inb)
    for fixed in (False, True):
        for i in range(len(packet)):
            bad = bytearray(packet)
            bad[i] ^= 0x01
            if fixed and i < 20 and i not in (10, 11):
                bad = bytearray(_fix_ip(bad))
            reason = _flip_reason(i, packet, udp, fixed)
            if reason is None:
                continue                                # accepted: checked separately below
            probe.refuse(bytes(bad), reason, f"flip byte {i} (checksum fixed: {fixed})")
    # the unprotected fields really are accepted (tunnel mode protects the inner packet only)
    bad = bytearray(packet)
    bad[8] ^= 0x01                                      # TTL
    assert inb.decapsulate(_fix_ip(bad), now=2.0) == INNER
    probe.refuse(packet, R.REPLAYED, "the genuine packet after an accepted copy")


@pytest.mark.parametrize("udp", [False, True], ids=["raw", "udp"])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=IDS)
def test_every_truncation(transform, udp):
    out, inb = _sas(transform, udp, esn=False)
    packet = out.encapsulate(INNER)
    probe = Probe(inb)
    for length in range(len(packet)):
        cut = packet[:length]
        probe.refuse(cut, R.TRUNCATED if length < 20 else R.BAD_IP_TOTAL_LENGTH,
                     f"raw cut at {length}")
        if length < 20:
            continue
        bad = bytearray(cut)
        bad[2:4] = length.to_bytes(2, "big")
        if udp and length >= 28:
            bad[24:26] = (length - 20).to_bytes(2, "big")
        probe.refuse(_fix_ip(bad), _truncation_reason(length, packet, inb, udp),
                     f"consistent cut at {length}")
    assert inb.decapsulate(packet, now=3.0) == INNER   # the window never moved


@pytest.mark.parametrize("transform", TRANSFORMS[::4], ids=IDS[::4])
def test_esn_flips_and_replays(transform):
    out, inb = _sas(transform, udp=False, esn=True)
    out.sequence = 2**32 + 9
    inb.replay.update(2**32 + 5)
    packet = out.encapsulate(INNER)
    probe = Probe(inb)
    for i in range(20, len(packet)):
        bad = bytearray(packet)
        bad[i] ^= 0x01
        reason = R.UNKNOWN_SPI if i < 24 else R.ICV_MISMATCH
        probe.refuse(bytes(bad), reason, f"ESN flip byte {i}")
    assert inb.decapsulate(packet) == INNER
    probe.refuse(packet, R.REPLAYED, "ESN replay")
    old = bytearray(packet)
    old[24:28] = (2).to_bytes(4, "big")   # far below the window in this subspace: next one
    probe.refuse(bytes(old), R.ICV_MISMATCH, "ESN guess into the next subspace")


def test_outer_header_oddities():
    out, inb = _sas(TRANSFORMS[4], udp=False, esn=False)
    packet = out.encapsulate(INNER)
    probe = Probe(inb)
    probe.refuse(b"\x65" + packet[1:], R.BAD_IP_VERSION, "IPv6 version nibble")
    probe.refuse(b"\x4f" + packet[1:40], R.BAD_IP_HEADER_LENGTH, "IHL past the packet")
    with_options = build_ipv4(Ipv4Header(PEER, LOCAL, 50, options=b"\x01\x01\x01\x00"),
                              packet[20:])
    assert inb.decapsulate(with_options) == INNER      # options are skipped, not refused
    probe.refuse(b"", R.TRUNCATED, "empty")
