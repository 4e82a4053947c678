"""``sa.decapsulate_many`` against one ``sa.decapsulate`` call per packet: random mixes of good,
replayed, reordered, tampered, truncated, wrong-SPI, unauthenticated-header and authenticated
but ill-formed (bad padding, dummy, wrong next header, TFC padding, inner options, malformed
inner) packets, cut into random bursts, must give the same inner packets, the same drops per
packet, the same counters and the same replay window, for every transform family, raw ESP and
ESP in UDP, with and without ESN, selectors and lifetimes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason
from mipsec.errors import Dropped, UsageError
from mipsec.ipsec.sa import Direction, Lifetime, SecurityAssociation, UdpEncap
from mipsec.ipsec.selector import ANY, Selector
from mipsec.wire.ipv4 import checksum

GW, COA, OTHER = "172.16.0.1", "172.16.1.10", "172.16.9.9"
HOME, CN, STRANGER = "10.1.0.100", "10.1.0.10", "192.168.7.7"
SPI, OTHER_SPI = 0x3003, 0x4004
TRANSFORMS = {
    "gcm": ("ENCR_AES_GCM_16", bytes(range(20)), None, b""),
    "cbc-sha256": ("ENCR_AES_CBC", bytes(range(16)), "AUTH_HMAC_SHA2_256_128",
                   bytes(range(50, 82))),
    "cbc-sha1": ("ENCR_AES_CBC", bytes(range(32)), "AUTH_HMAC_SHA1_96", bytes(range(60, 80))),
    "chacha": ("ENCR_CHACHA20_POLY1305", bytes(range(36)), None, b""),
    "null-sha1": ("ENCR_NULL", b"", "AUTH_HMAC_SHA1_96", bytes(range(60, 80))),
}
SELECTORS = {"none": None, "addresses": Selector(HOME, "10.1.0.0/24"), "any": ANY,
             "udp-only": Selector(HOME, CN, "udp")}
LIFETIMES = {"none": None, "bytes": Lifetime(soft_bytes=600, hard_bytes=1500),
             "seconds": Lifetime(soft_seconds=2.0, hard_seconds=4.0)}


def ip4(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


def inner_packet(source: str, size: int, proto: int = 17, ihl: int = 5) -> bytes:
    options = b"\x01" * (4 * (ihl - 5))
    body = bytes((size + i) & 0xFF for i in range(size - 4 * ihl))
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, size, 7, 0x4000, 64, proto, 0,
                         ip4(source), ip4(HOME)) + options
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + body


class Peer:
    """The sending side: the outbound SA, and hand-made ESP packets under the same keys."""

    def __init__(self, transform: str, udp: bool, esn: bool):
        encryption, key, integrity, ikey = TRANSFORMS[transform]
        self.udp, self.esn = udp, esn
        self.common = dict(spi=SPI, encryption=encryption, encryption_key=key,
                           integrity=integrity, integrity_key=ikey, esn=esn,
                           udp_encap=UdpEncap() if udp else None)
        # a fixed CBC random-block source: the same example gives the same packets every run
        self.out = SecurityAssociation(direction=Direction.OUTBOUND, local=COA, remote=GW,
                                       random=lambda n: bytes(i * 7 & 0xFF for i in range(n)),
                                       **self.common)
        self.t = self.out.transform

    def inbound(self, remote: str | None, selector, lifetime, window: int):
        return SecurityAssociation(direction=Direction.INBOUND, local=GW, remote=remote,
                                   selector=selector, lifetime=lifetime, replay_window=window,
                                   **self.common)

    def craft(self, seq: int, inner: bytes, *, tfc: int = 0, pad_byte: int | None = None,
              next_header: int = 4) -> bytes:
        """An authenticated packet with the trailer as given (RFC 4303 §2.4 when defaults)."""
        align = self.t.align
        padlen = -(len(inner) + tfc + 2) % align or align
        padding = bytes(range(1, padlen + 1)) if pad_byte is None else bytes([pad_byte]) * padlen
        plaintext = inner + bytes(tfc) + padding + bytes((padlen, next_header))
        seq_hi = struct.pack("!I", seq >> 32) if self.esn else b""
        esp = self.t.seal(struct.pack("!II", SPI, seq & 0xFFFFFFFF), seq, seq_hi, plaintext)
        if self.udp:
            esp = struct.pack("!HHHH", 4500, 4500, 8 + len(esp), 0) + esp
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(esp), seq & 0xFFFF, 0x4000, 64,
                             17 if self.udp else 50, 0, ip4(COA), ip4(GW))
        return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + esp


def with_checksum(packet: bytearray) -> bytes:
    ihl = (packet[0] & 0x0F) * 4
    if 20 <= ihl <= len(packet):
        packet[10:12] = b"\x00\x00"
        packet[10:12] = struct.pack("!H", checksum(bytes(packet[:ihl])))
    return bytes(packet)


def mutate(packet: bytes, kind: str, where: int, value: int, esp_at: int) -> bytes:
    damaged = bytearray(packet)
    if kind == "flip":                               # anywhere: header, ESP, ICV
        damaged[where % len(damaged)] ^= 1 << (value % 8)
    elif kind == "truncate":
        del damaged[where % len(damaged):]
    elif kind == "header":                           # a header field, checksum made right
        damaged[where % 20] = value
        return with_checksum(damaged)
    elif kind == "spi":
        damaged[esp_at:esp_at + 4] = struct.pack("!I", OTHER_SPI)
    elif kind == "source":
        damaged[12:16] = ip4(OTHER)
        return with_checksum(damaged)
    return bytes(damaged)


def pool(peer: Peer) -> list[bytes]:
    """Sequence numbers 1 .. 40 from the SA, then hand-made ones 41 .. 50."""
    packets = []
    for i in range(40):
        source = STRANGER if i % 7 == 3 else CN           # some fail the inner selector
        proto = 6 if i % 5 == 4 else 17
        packets.append(peer.out.encapsulate(inner_packet(source, 40 + (i * 13) % 90, proto)))
    odd = [dict(pad_byte=0xAA), dict(next_header=59), dict(next_header=6), dict(tfc=12),
           dict(inner=inner_packet(CN, 60, ihl=6)), dict(inner=b"\x60" + bytes(39)),
           dict(inner=inner_packet(CN, 24)), dict(inner=inner_packet(CN, 21)),
           dict(tfc=3, pad_byte=0xAA), dict()]
    for seq, spec in enumerate(odd, start=41):
        inner = spec.pop("inner", inner_packet(CN, 64))
        packets.append(peer.craft(seq, inner, **spec))
    return packets


MUTATIONS = st.tuples(st.sampled_from(["none"] * 6 + ["flip", "truncate", "header", "spi",
                                                      "source"]),
                      st.integers(0, 200), st.integers(0, 255))


# half of the steps go to the next sequence number (runs in order), the others anywhere near
STEPS = st.one_of(st.just(1), st.integers(-45, 45))


def run_single(sa: SecurityAssociation, bursts, nows):
    results = []
    for burst, now in zip(bursts, nows, strict=True):
        for packet in burst:
            try:
                results.append(sa.decapsulate(packet, now))
            except Dropped as exc:
                results.append(exc.reason)
    return results


def run_many(sa: SecurityAssociation, bursts, nows):
    results = []
    for burst, now in zip(bursts, nows, strict=True):
        inners, drops = sa.decapsulate_many(burst, now)
        assert len(inners) + len(drops) == len(burst)
        indices = [i for i, _ in drops]
        assert indices == sorted(set(indices))
        by_index = dict(drops)
        taken = iter(inners)
        results.extend(by_index[i] if i in by_index else next(taken) for i in range(len(burst)))
    return results


def state(sa: SecurityAssociation):
    return (sa.counters.as_dict(), sa.replay.snapshot(), sa.needs_rekey, sa.expired)


@settings(max_examples=examples(300), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(transform=st.sampled_from(sorted(TRANSFORMS)), udp=st.booleans(),
       esn=st.sampled_from([False, False, True]), remote=st.sampled_from([None, COA]),
       selector=st.sampled_from(sorted(SELECTORS)), lifetime=st.sampled_from(sorted(LIFETIMES)),
       window=st.sampled_from([32, 1024]),
       script=st.lists(st.tuples(STEPS, MUTATIONS), max_size=90),
       cuts=st.lists(st.integers(1, 40), max_size=12), data=st.data())
def test_burst_decapsulation_is_one_call_per_packet(transform, udp, esn, remote, selector,
                                                    lifetime, window, script, cuts, data):
    peer = Peer(transform, udp, esn)
    packets = pool(peer)
    esp_at = 28 if udp else 20
    stream, i = [], -1
    for step, (kind, where, value) in script:
        i = (i + step) % len(packets)
        stream.append(mutate(packets[i], kind, where, value, esp_at))
    bursts, at = [], 0
    for size in cuts:
        bursts.append(stream[at:at + size])
        at += size
    bursts.append(stream[at:])
    nows = sorted(data.draw(st.lists(st.floats(0.0, 6.0), min_size=len(bursts),
                                     max_size=len(bursts))))
    args = (remote, SELECTORS[selector], LIFETIMES[lifetime], window)
    one, many = peer.inbound(*args), peer.inbound(*args)
    assert run_many(many, bursts, nows) == run_single(one, bursts, nows)
    assert state(many) == state(one)


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("udp", [False, True])
def test_in_order_burst_takes_every_packet(transform, udp):
    """The common case: a long in-order run (the window's bit run folded in at once)."""
    peer = Peer(transform, udp, esn=False)
    inners = [inner_packet(CN, 40 + i % 50) for i in range(300)]
    outers = [peer.out.encapsulate(p) for p in inners]
    one, many = (peer.inbound(None, SELECTORS["addresses"], None, 64) for _ in range(2))
    got: list[bytes] = []
    for at in range(0, 300, 32):
        burst_inners, drops = many.decapsulate_many(outers[at:at + 32], 1.0)
        assert drops == []
        got.extend(burst_inners)
    assert got == inners == [one.decapsulate(p, 1.0) for p in outers]
    assert state(many) == state(one)
    # the same burst again: every packet is a replay now
    inners_again, drops = many.decapsulate_many(outers[:8] + outers[-32:], 2.0)
    assert inners_again == []
    assert [r for _, r in drops] == [DropReason.TOO_OLD] * 8 + [DropReason.REPLAYED] * 32


def test_outbound_sa_refuses_a_burst():
    peer = Peer("gcm", udp=False, esn=False)
    with pytest.raises(UsageError):
        peer.out.decapsulate_many([b""])
