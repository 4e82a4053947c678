#!/usr/bin/env python3
"""Where the time of one ESP decapsulation goes, step by step, against the crypto floor.

Each step of the inbound order (the statements of ``sa.decapsulate`` for the common packet,
on local variables as the closure has them) is timed on its own over the 64-byte packets of
``bench_esp.py`` (thread CPU time, best of interleaved rounds, the empty loop subtracted), for
AES-GCM-16-128 and AES-CBC-128 with HMAC-SHA1-96 and HMAC-SHA2-256-128, raw ESP, the
wildcard-source inbound SA with the address selector of the benchmark.  Beside them: the floor
(the crypto calls on fixed buffers), the whole ``sa.decapsulate`` and ``sa.decapsulate_many``
(bursts of 32) in the same run, both over 3200 distinct packets as ``bench_esp.py`` times them
and over the same 32 packets again (in the cache, like the floor's buffers).  The
steps add up to roughly the hot whole; what is left between the floor and the whole is what
CPython spends on the checks the RFCs require.

    python3 benchmarks/profile_decap.py [--repeat N] [--only GCM]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import timeit

try:
    import mipsec  # noqa: F401
except ImportError:  # run from a source tree without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_esp import HASHES, INBOUND_SELECTOR, TRANSFORMS, inner_packet, make_sa

from mipsec.ipsec.sa import Direction

CASES = ("AES-GCM-16-128", "AES-CBC-128/HMAC-SHA1-96", "AES-CBC-128/HMAC-SHA256-128")
PACKETS = 32

# Setup shared by every step: the closure's constants as locals, and one packet's values up to
# the step (each step reads what the steps before it computed, as the closure does).
SETUP = """
import struct, hmac
from mipsec.ipsec.esp_datapath import _TAILS
pkts = PKTS
t = TRANSFORM
hdr = struct.Struct("!HHHHHHQ").unpack_from
unpack_ii = struct.Struct("!II").unpack_from
compare = hmac.compare_digest
aead = hasattr(t, "salt")
if aead:
    dec, salt = t.decrypt, t.salt
else:
    hmac_copy, cbc_dec, icv = t.hmac.keyed.copy, t.decrypt_update, t.icv_size
pkt = pkts[5]
n = len(pkt)
word0, total, ident, frag, word4, csum, addrs = hdr(pkt)
spi_got, seq = unpack_ii(pkt, 20)
local, spi, want, min_esp, deadline, byte_limit, octets = addrs & 0xFFFFFFFF, spi_got, 50, 40, \
    float("inf"), float("inf"), 0
top, bits, mask = seq - 1, 1024, (1 << 1024) - 1
bitmap = mask >> 3
if aead:
    plaintext = dec(salt + pkt[28:36], pkt[36:], pkt[20:28])
else:
    plaintext = cbc_dec(pkt[28:n - icv])[16:]
padlen = plaintext[-2]
end = len(plaintext) - 2 - padlen
inner = plaintext[:end]
lmask, lnet, rmask, rnet = 0xFFFFFFFF, 0x0A010064, 0xFFFFFF00, 0x0A010000
class C:
    __slots__ = ("packets", "octets", "t", "s", "top", "bitmap")
c = C(); c.packets = c.octets = 0; c.top = top; c.bitmap = bitmap
def f(p, now=0.0):
    return p
"""

COMMON = [
    ("call and return of a closure", "f(pkt, 0.0)"),
    ("outer header: len, unpack (7 fields)",
     "n = len(pkt); word0, total, ident, frag, word4, csum, addrs = hdr(pkt)"),
    ("outer header: version/IHL, length, checksum, fragment, protocol",
     "word0 >> 8 == 0x45; total != n; (word0 + total + ident + frag + word4 + csum + addrs)"
     " % 0xFFFF; frag & 0x3FFF; word4 & 0xFF != want"),
    ("ESP length, SPI + sequence unpack, SPI and destination",
     "n - 20 < min_esp; spi_got, seq = unpack_ii(pkt, 20); spi_got != spi; "
     "addrs & 0xFFFFFFFF != local"),
    ("lifetime (time and bytes)", "0.0 >= deadline or octets >= byte_limit"),
    ("replay pre-check", "seq <= top"),
]
GCM = [
    ("AEAD: nonce, ciphertext, AAD cut from the packet", "salt + pkt[28:36]; pkt[36:]; pkt[20:28]"),
    ("AEAD: decrypt (the floor's call)", "dec(NONCE, CT, AAD)"),
]
CBC = [
    ("HMAC: copy, update(slice), finalize, truncate",
     "m = hmac_copy(); m.update(pkt[20:n - icv]); d = m.finalize()[:icv]"),
    ("ICV slice and constant-time compare", "compare(d, pkt[n - icv:])"),
    ("CBC: slice, decrypt, drop block 0", "cbc_dec(pkt[28:n - icv])[16:]"),
]
TAIL = [
    ("trailer: pad length, end, compare with the expected tail",
     "padlen = plaintext[-2]; end = len(plaintext) - 2 - padlen; "
     "end < 0 or plaintext[end:] != _TAILS[padlen]"),
    ("inner header: version/IHL, total length; inner slice",
     "first = plaintext[0]; first == 0x45 and end >= 20 and "
     "(plaintext[2] << 8 | plaintext[3]) == end; inner = plaintext[:end]"),
    ("window update (1024-bit bitmap, attributes)",
     "tp = c.top; c.bitmap = ((c.bitmap << 1) | 1) & mask if 1 < bits else 1; c.top = tp"),
    ("last authenticated time and source", "c.t = 0.0; c.s = addrs >> 32"),
    ("inner selector: unpack, two prefix compares",
     "src, dst = unpack_ii(inner, 12); (dst & lmask) != lnet or (src & rmask) != rnet"),
    ("counters", "c.packets += 1; c.octets += len(inner)"),
]


def step_ns(stmt: str, setup: str, repeat: int, number: int) -> float:
    times = timeit.repeat(stmt, setup, timer=time.thread_time, repeat=repeat, number=number,
                          globals=GLOBALS)
    return min(times) / number * 1e9


GLOBALS: dict[str, object] = {}


def hot_ns(case, keys, packets, repeat: int) -> tuple[float, float]:
    """The same, over the same 32 packets again and again through one SA whose replay window
    is emptied before each pass (else they are replays): the packets and the SA stay in the
    cache, as the floor's buffers do."""
    burst = packets[:PACKETS]
    best_one = best_many = float("inf")
    passes = 100
    for _ in range(repeat):
        sa = make_sa(case, Direction.INBOUND, keys, INBOUND_SELECTOR)
        call, window = sa.decapsulate, sa.replay
        t0 = time.thread_time_ns()
        for _ in range(passes):
            window.top = window.bitmap = 0
            for p in burst:
                call(p, 0.0)
        best_one = min(best_one, (time.thread_time_ns() - t0) / (passes * PACKETS))
        sa = make_sa(case, Direction.INBOUND, keys, INBOUND_SELECTOR)
        many, window = sa.decapsulate_many, sa.replay
        t0 = time.thread_time_ns()
        for _ in range(passes):
            window.top = window.bitmap = 0
            many(burst, 0.0)
        best_many = min(best_many, (time.thread_time_ns() - t0) / (passes * PACKETS))
    return best_one, best_many


def whole_ns(case, keys, packets, repeat: int) -> tuple[float, float]:
    """(sa.decapsulate, sa.decapsulate_many in bursts of 32) per packet over 3200 distinct
    packets (as bench_esp.py times them), a fresh SA per round."""
    best_one = best_many = float("inf")
    for _ in range(repeat):
        sa = make_sa(case, Direction.INBOUND, keys, INBOUND_SELECTOR)
        call = sa.decapsulate
        t0 = time.thread_time_ns()
        for p in packets:
            call(p, 0.0)
        best_one = min(best_one, (time.thread_time_ns() - t0) / len(packets))
        sa = make_sa(case, Direction.INBOUND, keys, INBOUND_SELECTOR)
        many = sa.decapsulate_many
        t0 = time.thread_time_ns()
        for at in range(0, len(packets), PACKETS):
            many(packets[at:at + PACKETS], 0.0)
        best_many = min(best_many, (time.thread_time_ns() - t0) / len(packets))
    return best_one, best_many


def profile(label: str, repeat: int, number: int) -> None:
    case = next(c for c in TRANSFORMS if c.label == label)
    keys = (bytes(range(1, case.key_bytes + 1)),
            bytes(range(101, 101 + HASHES[case.integrity][1])) if case.integrity else b"")
    out = make_sa(case, Direction.OUTBOUND, keys)
    inner = inner_packet(64)
    packets = [out.encapsulate(inner) for _ in range(3200)]
    GLOBALS.update(PKTS=packets, TRANSFORM=out.transform)
    steps = COMMON + (GCM if label.startswith("AES-GCM") else CBC) + TAIL
    setup = SETUP + "\nNONCE, CT, AAD = (t.salt + pkt[28:36], pkt[36:], pkt[20:28]) " \
                    "if aead else (0, 0, 0)\n"
    if not label.startswith("AES-GCM"):
        floor = "m = hmac_copy(); m.update(MAC_IN); compare(m.finalize()[:icv], TAG); cbc_dec(CIV)"
        setup += "MAC_IN, TAG, CIV = pkt[20:n - icv], pkt[n - icv:], pkt[28:n - icv]\nd = TAG\n"
    else:
        floor = "dec(NONCE, CT, AAD)"
    names = ["pass", floor] + [stmt for _, stmt in steps]
    best = {name: float("inf") for name in names}
    for _ in range(repeat):                 # interleaved: every step once per round
        for stmt in names:
            best[stmt] = min(best[stmt], step_ns(stmt, setup, 1, number))
    empty = best["pass"]
    one, many = whole_ns(case, keys, packets, repeat)
    hot_one, hot_many = hot_ns(case, keys, packets, repeat)
    floor_ns = best[floor] - empty
    print(f"\n{label}, 64-byte inner packets, ns per packet (thread CPU time, best of {repeat})")
    total = 0.0
    for name, stmt in steps:
        ns = best[stmt] - empty
        total += ns
        print(f"  {ns:7.0f}  {name}")
    print(f"  {total:7.0f}  sum of the steps")
    for what, one_ns, many_ns in (("the same 32 packets (hot)", hot_one, hot_many),
                                  ("3200 distinct packets", one, many)):
        print(f"  {one_ns:7.0f}  sa.decapsulate, {what} (ratio to the floor "
              f"{floor_ns / one_ns:.2f})")
        print(f"  {many_ns:7.0f}  sa.decapsulate_many, bursts of {PACKETS}, {what} "
              f"(ratio {floor_ns / many_ns:.2f})")
    print(f"  {floor_ns:7.0f}  the floor: the crypto calls alone on fixed buffers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="interleaved rounds (best kept)")
    parser.add_argument("--number", type=int, default=20000, help="executions per timing")
    parser.add_argument("--only", metavar="TEXT", help="only cases whose label contains TEXT")
    args = parser.parse_args(argv)
    for label in CASES:
        if not args.only or args.only.lower() in label.lower():
            profile(label, args.repeat, args.number)
    return 0


if __name__ == "__main__":
    sys.exit(main())
