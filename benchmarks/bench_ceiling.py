#!/usr/bin/env python3
"""How close to the crypto floor can ANY per-packet pure-Python ESP get?  (a ceiling probe)

A deliberately minimal, fully inlined tunnel-mode ESP for AES-GCM-16-128 and AES-CBC-128 +
HMAC-SHA1-96: raw ESP only, fixed addresses, no lifetimes, no UDP, one closure per direction,
yet with everything the issue counts as full processing (sequence number, padding, outer header
with checksum, counters; inbound: outer checks, replay check and update, ICV, padding, inner
selector).  Its packets are checked against mipsec's SecurityAssociation (both ways) before it
is timed, interleaved with that SA and with the floor of bench_esp.py.

It is not a second implementation to use: it shows how much of the gap between the SA and the
floor is interpreter cost that no per-packet Python design removes.

    python3 benchmarks/bench_ceiling.py [SIZE ...]      (default 64)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import sys

try:
    import mipsec  # noqa: F401
except ImportError:  # run from a source tree without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import interleaved
from bench_esp import (
    COA,
    GW_OUTSIDE,
    HASHES,
    INBOUND_SELECTOR,
    TRANSFORMS,
    DecapBatch,
    Direction,
    floor_batches,
    inner_packet,
    ip,
    make_sa,
)
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mipsec.ipsec.replay import ReplayWindow

SPI = 0x1001   # bench_esp.make_sa's SPI, so the SA and the probe interoperate
_II = struct.Struct("!II")
_Q = struct.Struct("!Q")
_OUTER = struct.Struct("!BBHHHBBH4s4s")
_PREFIX = struct.Struct("!BBHHHBBH")
_WORDS = struct.Struct("!10H")
_PADDING = bytes(range(1, 256))
SRC, DST = ip(GW_OUTSIDE), ip(COA)
CSUM_BASE = sum(_WORDS.unpack(_OUTER.pack(0x45, 0, 0, 0, 0, 64, 50, 0, SRC, DST)))


class State:
    __slots__ = ("seq", "ident", "packets", "octets", "pool", "at")

    def __init__(self) -> None:
        self.seq = self.ident = self.packets = self.octets = self.at = 0
        self.pool = os.urandom(4096)


def outer_closure(seal, align_mask: int):
    """encapsulate(inner) with ``seal(seq, plaintext) -> ESP bytes`` for the transform."""
    trailers = [_PADDING[:n] + bytes((n, 4)) for n in range(align_mask + 1)]
    pack_outer = _OUTER.pack
    st = State()

    def encapsulate(inner: bytes, now: float = 0.0) -> bytes:
        n = len(inner)
        seq = st.seq = st.seq + 1
        esp = seal(st, seq, inner + trailers[-(n + 2) & align_mask])
        total = 20 + len(esp)
        ident = st.ident = (st.ident + 1) & 0xFFFF
        tos, df = inner[1], (inner[6] & 0x40) << 8
        s = CSUM_BASE + tos + total + ident + df
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        st.packets += 1
        st.octets += n
        return pack_outer(0x45, tos, total, ident, df, 64, 50, ~s & 0xFFFF, SRC, DST) + esp
    return encapsulate


def inner_closure(open_, min_esp: int, block_mask: int, icv: int):
    """decapsulate(outer) -> inner or a short reason string, with ``open_(pkt) -> pt | None``."""
    window = ReplayWindow(1024)
    check, update = window.check, window.update
    matches = INBOUND_SELECTOR.matches_inbound
    unpack_prefix, unpack_words, unpack_ii = (_PREFIX.unpack_from, _WORDS.unpack_from,
                                              _II.unpack_from)
    st = State()

    def decapsulate(pkt: bytes, now: float = 0.0):
        n = len(pkt)
        if n < 20 + min_esp:
            return "truncated"
        vihl, _tos, total, _ident, frag, _ttl, proto, _csum = unpack_prefix(pkt)
        if vihl != 0x45 or total != n or frag & 0x3FFF or proto != 50:
            return "header"
        s = sum(unpack_words(pkt))
        s = (s & 0xFFFF) + (s >> 16)
        if (s & 0xFFFF) + (s >> 16) != 0xFFFF:
            return "checksum"
        if (n - 44 - icv) & block_mask:
            return "ciphertext-length"
        spi, seq = unpack_ii(pkt, 20)
        if spi != SPI or pkt[16:20] != DST:
            return "spi/destination"
        reason = check(seq)
        if reason is not None:
            return reason
        plaintext = open_(pkt)
        if plaintext is None:
            return "icv"
        padlen = plaintext[-2]
        end = len(plaintext) - 2 - padlen
        if end < 20 or plaintext[end:-2] != _PADDING[:padlen] or plaintext[-1] != 4:
            return "padding/next-header"
        inner = plaintext[:end]
        update(seq)
        if not matches(inner):
            return "selector"
        st.packets += 1
        st.octets += end
        return inner
    return decapsulate


def gcm_probe(key: bytes):
    aead = AESGCM(key[:-4])
    salt, encrypt, decrypt = key[-4:], aead.encrypt, aead.decrypt
    pack_ii, pack_q = _II.pack, _Q.pack

    def seal(st, seq, plaintext):
        header, iv = pack_ii(SPI, seq), pack_q(seq)
        return header + iv + encrypt(salt + iv, plaintext, header)

    def open_(pkt):
        try:
            return decrypt(salt + pkt[28:36], pkt[36:], pkt[20:28])
        except InvalidTag:
            return None
    return (lambda: outer_closure(seal, 3)), (lambda: inner_closure(open_, 8 + 8 + 4 + 16, 0, 16))


def cbc_probe(key: bytes, integrity_key: bytes):
    encrypt = Cipher(algorithms.AES(key), modes.CBC(os.urandom(16))).encryptor().update
    decrypt = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).decryptor().update
    block = integrity_key.ljust(64, b"\x00")
    inner_state = hashlib.sha1(bytes(b ^ 0x36 for b in block))
    outer_state = hashlib.sha1(bytes(b ^ 0x5C for b in block))
    icopy, ocopy, compare, pack_ii = inner_state.copy, outer_state.copy, hmac.compare_digest, \
        _II.pack

    def seal(st, seq, plaintext):
        at = st.at
        if at == 4096:                       # IVs from a random pool, 16 bytes at a time
            st.pool, at = os.urandom(4096), 0
        st.at = at + 16
        data = pack_ii(SPI, seq) + encrypt(st.pool[at:at + 16] + plaintext)
        h = icopy()
        h.update(data)
        o = ocopy()
        o.update(h.digest())
        return data + o.digest()[:12]

    def open_(pkt):
        h = icopy()
        h.update(pkt[20:-12])
        o = ocopy()
        o.update(h.digest())
        if not compare(o.digest()[:12], pkt[-12:]):
            return None
        return decrypt(pkt[28:-12])[16:]
    return (lambda: outer_closure(seal, 15)), (lambda: inner_closure(open_, 8 + 16 + 16 + 12,
                                                                       15, 12))


class ProbeDecap:
    """Like bench_esp.DecapBatch, for the probe: fresh window and fresh packets per run."""

    def __init__(self, make_out, make_in, packet):
        self.encapsulate, self.make_in, self.packet = make_out(), make_in, packet
        self.packets: list[bytes] = []

    def prepare(self, n: int) -> None:
        while len(self.packets) < n:
            self.packets.append(self.encapsulate(self.packet))
        self.decapsulate = self.make_in()

    def __call__(self, n: int) -> None:
        decapsulate = self.decapsulate
        for packet in self.packets[:n]:
            decapsulate(packet, 0.0)


def loop(function, *args):
    def batch(n):
        for _ in range(n):
            function(*args)
    return batch


def main(sizes: list[int]) -> None:
    print("# ceiling probe: ratio = floor time / time (as in bench_esp.py)")
    for size in sizes:
        packet = inner_packet(size)
        for label in ("AES-GCM-16-128", "AES-CBC-128/HMAC-SHA1-96"):
            case = next(c for c in TRANSFORMS if c.label == label)
            keys = (bytes(range(1, case.key_bytes + 1)),
                    bytes(range(101, 101 + HASHES[case.integrity][1])) if case.integrity else b"")
            make_out, make_in = gcm_probe(keys[0]) if case.integrity is None else \
                cbc_probe(*keys)
            # the probe speaks real ESP: the SA opens its packets and it opens the SA's
            sa_out = make_sa(case, Direction.OUTBOUND, keys)
            sa_in = make_sa(case, Direction.INBOUND, keys, INBOUND_SELECTOR)
            probe_out, probe_in = make_out(), make_in()
            assert sa_in.decapsulate(probe_out(packet)) == packet
            assert probe_in(sa_out.encapsulate(packet)) == packet
            floor_encap, floor_decap = floor_batches(case, keys, size)
            batches = {"SA encap": loop(sa_out.encapsulate, packet, 0.0),
                       "probe encap": loop(make_out(), packet, 0.0),
                       "SA decap": DecapBatch(case, keys, packet, through_sad=False),
                       "probe decap": ProbeDecap(make_out, make_in, packet)}
            batches.update({f"floor encap {k}": v for k, v in floor_encap.items()})
            batches.update({f"floor decap {k}": v for k, v in floor_decap.items()})
            best = interleaved(batches, repeat=11, target_ns=3_000_000)
            for direction in ("encap", "decap"):
                floor = min(v for k, v in best.items() if k.startswith(f"floor {direction}"))
                sa, probe = best[f"SA {direction}"], best[f"probe {direction}"]
                print(f"{label:<26}{size:>5} {direction}: floor {floor / 1e3:.2f} us, "
                      f"SA {sa / 1e3:.2f} us (ratio {floor / sa:.2f}), "
                      f"minimal probe {probe / 1e3:.2f} us (ratio {floor / probe:.2f})")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [64])
