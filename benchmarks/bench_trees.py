"""Two source trees of mipsec in one process, their fast paths timed in turn: is a change (a
restructuring) slower?  Timing two trees in separate processes on a shared machine mixes the
change with the moment; here both run in the same process, round after round, the order of the
two swapped every round, timed with the thread's CPU time.

    python3 benchmarks/bench_trees.py esp  OLD_TREE NEW_TREE [--rounds 30] [--n 2000] [--size 64]
    python3 benchmarks/bench_trees.py loop OLD_TREE NEW_TREE [--rounds 16] [--packets 2000]

A tree is a checkout or ``git archive REV | tar -x -C DIR``.  Each tree's ``mipsec`` is imported
in turn (the module cache emptied between the two) and everything timed is built while its tree
is loaded, so nothing later imports from the other tree.

* ``esp``: ``SecurityAssociation.encapsulate`` / ``decapsulate`` of one inner packet, for
  AES-GCM, AES-CBC with HMAC-SHA1 and HMAC-SHA2-256, ChaCha20-Poly1305;
* ``loop``: ``bench_loop.py``'s paths (HA downlink, GW downlink and uplink, MN uplink, batched and
  one packet at a time) through each tree's event loop; each tree needs a ``bench_loop.py`` in its
  ``benchmarks/`` that runs against it (copy the newest one there).

Prints, per row, the median over rounds of new / old and its quartiles, and the geometric mean
of the medians (benchmarks/README.md, "Restructuring, before and after").
"""

from __future__ import annotations

import argparse
import gc
import importlib
import runpy
import statistics
import struct
import sys
import time
from typing import Any

TRANSFORMS = (("ENCR_AES_GCM_16", 20, None, 0), ("ENCR_AES_CBC", 16, "AUTH_HMAC_SHA1_96", 20),
              ("ENCR_CHACHA20_POLY1305", 36, None, 0),
              ("ENCR_AES_CBC", 16, "AUTH_HMAC_SHA2_256_128", 32))
LOOP_PATHS = ("HA downlink (TUN -> IP-in-IP)", "GW downlink (TUN -> ESP)",
              "GW uplink (ESP -> TUN)", "MN uplink (TUN -> ESP)")


def _purge() -> None:
    for name in [m for m in sys.modules if m == "mipsec" or m.startswith("mipsec.")]:
        del sys.modules[name]


def _inner_packet(size: int) -> bytes:
    """IPv4 + UDP 10.1.0.10 -> 10.1.0.100, ``size`` bytes in all (checksum computed here, so no
    tree's helper is needed)."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0, 64, 17, 0,
                         bytes((10, 1, 0, 10)), bytes((10, 1, 0, 100)))
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]
    return header + struct.pack("!HHHH", 1234, 5678, size - 20, 0) + bytes(size - 28)


def _esp_pairs(tree: str) -> list[tuple[str, Any, Any]]:
    _purge()
    sys.path.insert(0, tree)
    try:
        sa = importlib.import_module("mipsec.ipsec.sa")
    finally:
        sys.path.remove(tree)
    assert sa.__file__.startswith(tree), sa.__file__
    pairs = []
    for enc, enc_len, integ, integ_len in TRANSFORMS:
        keys = dict(encryption=enc, encryption_key=bytes(range(1, enc_len + 1)), integrity=integ,
                    integrity_key=bytes(range(2, integ_len + 2)))
        out = sa.SecurityAssociation(spi=0x1001, direction=sa.Direction.OUTBOUND,
                                     local="172.16.1.10", remote="172.16.0.1", **keys)
        inb = sa.SecurityAssociation(spi=0x1001, direction=sa.Direction.INBOUND,
                                     local="172.16.0.1", remote=None, **keys)
        pairs.append((f"{enc} {integ or ''}".strip(), out, inb))
    return pairs


def _time_esp(out: Any, inb: Any, inner: bytes, n: int) -> tuple[float, float]:
    encapsulate, decapsulate = out.encapsulate, inb.decapsulate
    t0 = time.thread_time_ns()
    packets = [encapsulate(inner, 0.0) for _ in range(n)]
    t1 = time.thread_time_ns()
    for packet in packets:
        decapsulate(packet, 0.0)
    t2 = time.thread_time_ns()
    return (t1 - t0) / n, (t2 - t1) / n


def esp(args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    inner = _inner_packet(args.size)
    trees = {"old": _esp_pairs(args.old), "new": _esp_pairs(args.new)}
    ratios: dict[tuple[str, str], list[float]] = {}
    gc.disable()
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for k in range(len(TRANSFORMS)):
            got = {label: _time_esp(trees[label][k][1], trees[label][k][2], inner, args.n)
                   for label in order}
            for j, direction in enumerate(("encap", "decap")):
                ratios.setdefault((trees["new"][k][0], direction), []).append(
                    got["new"][j] / got["old"][j])
    gc.enable()
    print(f"new / old: {args.rounds} rounds of {args.n} packets of {args.size} bytes")
    return ratios


def loop(args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    prepared = {}
    for label, tree in (("old", args.old), ("new", args.new)):
        _purge()
        ns = runpy.run_path(f"{tree}/benchmarks/bench_loop.py", run_name="bench_trees")
        assert sys.modules["mipsec"].__file__.startswith(tree), sys.modules["mipsec"].__file__
        runs = []
        for _ in range(args.rounds):           # fresh roles each run (each sequence number once)
            for batch in (False, True):
                ha, gw, mn, down, tunnelled, esp_in, app = ns["setup"](args.packets)
                runs.append((batch, [(LOOP_PATHS[0], ha, down, []),
                                     (LOOP_PATHS[1], gw, tunnelled, []),
                                     (LOOP_PATHS[2], gw, [], esp_in),
                                     (LOOP_PATHS[3], mn, app, [])]))
        prepared[label] = (ns["time_one"], runs)
        sys.path[:] = [p for p in sys.path if not p.startswith(tree)]
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for k, mode in enumerate(("single", "batched")):
            got = {}
            for label in order:
                time_one, runs = prepared[label]
                batch, items = runs[2 * r + k]
                got[label] = {name: time_one(role, tun_in, net_in, batch)
                              for name, role, tun_in, net_in in items}
            for name in LOOP_PATHS:
                ratios.setdefault((name, mode), []).append(got["new"][name] / got["old"][name])
    print(f"new / old: {args.rounds} rounds of {args.packets} packets")
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("esp", "loop"))
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--n", type=int, default=2000, help="esp: packets per timing")
    ap.add_argument("--size", type=int, default=64, help="esp: inner packet bytes")
    ap.add_argument("--packets", type=int, default=2000, help="loop: packets per path")
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = 30 if args.what == "esp" else 16
    ratios = (esp if args.what == "esp" else loop)(args)
    medians = []
    for (name, kind), values in ratios.items():
        median = statistics.median(values)
        medians.append(median)
        q1, _q2, q3 = statistics.quantiles(values, n=4)
        print(f"  {name:<40} {kind:<8} {median:.3f}  (quartiles {q1:.3f}-{q3:.3f})")
    print(f"  geometric mean of the medians: {statistics.geometric_mean(medians):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
