#!/usr/bin/env python3
"""SPD and SAD lookup cost against table size (target: <= 2x from 10 to 10,000 policies
and from 10 to 100,000 SAs).

SPD (``mipsec.ipsec.spd``): a gateway-shaped SPD, one ``10.1.0.0/24 -> <home address>/32
PROTECT`` policy per mobile node, a few BYPASS policies with ports in front and a final DISCARD.
Measured for 10 and 10,000 policies:

* ``hit``: ``Spd.lookup`` of a flow already decided (the decision cache);
* ``miss``: ``Spd.lookup`` of flows never seen since the last change (distinct source ports, so
  each one goes through the prefix index and is then cached);
* ``no match``: a miss that only the final DISCARD catches;
* ``linear``: the RFC 4301 definition, ``Spd.linear_lookup`` (the reference the index replaces).

A second SPD ("mixed") spreads the policies over 8 x 8 different prefix-length pairs, the case
the index handles worst (its cost grows with the number of distinct pairs, at most 33 x 33).

SAD (``mipsec.ipsec.sad``): ``Sad.lookup(outer_packet)`` (outer header parse + SPI -> SA) with 10
and 100,000 real inbound SAs, for a raw ESP packet and for ESP in UDP.

    python3 benchmarks/bench_lookup.py [--quick] [--json FILE|-]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import random
import struct
import sys

try:
    import mipsec  # noqa: F401
except ImportError:  # run from a source tree without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import interleaved, write_json

from mipsec.ipsec.sa import Direction, SecurityAssociation, UdpEncap
from mipsec.ipsec.sad import Sad
from mipsec.ipsec.selector import Selector
from mipsec.ipsec.spd import Action, Policy, Spd

HOME_NET = int(ipaddress.IPv4Address("10.1.0.0"))
HOMES = int(ipaddress.IPv4Address("10.128.0.0"))   # home addresses of the mobile nodes
CN = int(ipaddress.IPv4Address("10.1.0.10"))


def home(i: int) -> str:
    return str(ipaddress.IPv4Address(HOMES + i))


def gateway_spd(n: int) -> Spd:
    spd = Spd()
    spd.add(Policy("ike", Selector.parse("* -> *:500, udp"), Action.BYPASS))
    spd.add(Policy("nat-t", Selector.parse("* -> *:4500, udp"), Action.BYPASS))
    spd.add(Policy("mip", Selector.parse("10.1.0.2 -> *:434, udp"), Action.BYPASS))
    for i in range(n - 4):
        spd.add(Policy(f"mn{i}", Selector("10.1.0.0/24", home(i)), Action.PROTECT))
    spd.add(Policy("default", Selector(), Action.DISCARD))
    return spd


def mixed_spd(n: int, seed: int = 1) -> Spd:
    rng = random.Random(seed)
    lengths = (8, 12, 16, 20, 24, 28, 30, 32)
    spd = Spd()
    for i in range(n - 1):
        llen, rlen = rng.choice(lengths), rng.choice(lengths)
        local = ipaddress.IPv4Network((rng.getrandbits(32) & ~((1 << (32 - llen)) - 1), llen))
        remote = ipaddress.IPv4Network((rng.getrandbits(32) & ~((1 << (32 - rlen)) - 1), rlen))
        spd.add(Policy(f"p{i}", Selector(str(local), str(remote), rng.choice([None, 6, 17])),
                       Action.BYPASS))
    spd.add(Policy("default", Selector(), Action.DISCARD))
    return spd


def spd_batches(spd: Spd, dst: int, label: str) -> dict:
    lookup, linear = spd.lookup, spd.linear_lookup
    expected = spd.linear_lookup(CN, dst, 17, 40000, 7000)
    assert spd.lookup(CN, dst, 17, 40000, 7000) is expected

    def hit(n):
        for _ in range(n):
            lookup(CN, dst, 17, 40000, 7000)

    class Miss:
        def prepare(self, n):   # fresh flows: clear the decision cache by a no-op change
            spd.add(Policy("__probe", Selector("255.255.255.255", "255.255.255.255"),
                           Action.DISCARD))
            spd.remove("__probe")

        def __call__(self, n):
            for sport in range(n):
                lookup(CN, dst, 17, sport, 7000)

    def lin(n):
        for _ in range(n):
            linear(CN, dst, 17, 40000, 7000)

    return {f"{label} hit": hit, f"{label} miss": Miss(), f"{label} linear": lin}


def inbound_sa(spi: int, udp: bool) -> SecurityAssociation:
    return SecurityAssociation(spi=spi, direction=Direction.INBOUND,
                               encryption="ENCR_AES_GCM_16", encryption_key=bytes(20),
                               local="172.16.1.10", remote=None,
                               udp_encap=UdpEncap() if udp else None)


def esp_packet(spi: int, udp: bool) -> bytes:
    esp = struct.pack("!II", spi, 1) + bytes(8 + 64 + 16)
    if udp:
        esp = struct.pack("!HHHH", 4500, 4500, 8 + len(esp), 0) + esp
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(esp), 0, 0, 64, 17 if udp else 50,
                       0, bytes([172, 16, 0, 1]), bytes([172, 16, 1, 10])) + esp


def sad_batches(sad: Sad, spi: int, label: str) -> dict:
    lookup = sad.lookup
    out = {}
    for udp in (False, True):
        packet = esp_packet(spi, udp)
        assert sad.lookup(packet) is sad.get(spi)

        def batch(n, packet=packet):
            for _ in range(n):
                lookup(packet)
        out[f"{label} {'udp' if udp else 'raw'}"] = batch
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    repeat, target_ns = (3, 1_000_000) if args.quick else (11, 4_000_000)
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"# mipsec lookup benchmark: Python {platform.python_version()}, best of {repeat}, "
          f"interleaved; ratio = large table / small table (target <= 2.0)", file=out)
    results: dict[str, float] = {}

    small, large = gateway_spd(10), gateway_spd(10_000)
    batches = {}
    batches.update(spd_batches(small, HOMES + 3, "spd 10 match"))
    batches.update(spd_batches(large, HOMES + 5_000, "spd 10000 match"))
    batches.update(spd_batches(small, HOMES + 9_999_999, "spd 10 no-match"))
    batches.update(spd_batches(large, HOMES + 9_999_999, "spd 10000 no-match"))
    mixed_small, mixed_large = mixed_spd(10), mixed_spd(10_000)
    batches.update(spd_batches(mixed_small, HOMES + 1, "mixed 10"))
    batches.update(spd_batches(mixed_large, HOMES + 1, "mixed 10000"))
    results.update(interleaved(batches, repeat=repeat, target_ns=target_ns))
    print(f"# SPD index groups: gateway 10 -> {len(small._groups)}, 10000 -> "
          f"{len(large._groups)}; mixed 10 -> {len(mixed_small._groups)}, 10000 -> "
          f"{len(mixed_large._groups)}", file=out)

    sads = {}
    for count in (10, 100_000):
        sads[count] = Sad([inbound_sa(0x1000 + i, udp=(i % 2 == 1)) for i in range(count)])
    batches = {}
    batches.update(sad_batches(sads[10], 0x1000 + 4, "sad 10"))
    batches.update(sad_batches(sads[100_000], 0x1000 + 77_776, "sad 100000"))
    results.update(interleaved(batches, repeat=repeat, target_ns=target_ns))

    print(f"{'what':<34}{'small ns':>10}{'large ns':>10}{'ratio':>8}", file=out)
    pairs = [
        ("SPD lookup, cached (hit)", "spd 10 match hit", "spd 10000 match hit"),
        ("SPD lookup, uncached (miss)", "spd 10 match miss", "spd 10000 match miss"),
        ("SPD lookup, miss, no match", "spd 10 no-match miss", "spd 10000 no-match miss"),
        ("SPD linear scan (reference)", "spd 10 match linear", "spd 10000 match linear"),
        ("SPD mixed prefixes, hit", "mixed 10 hit", "mixed 10000 hit"),
        ("SPD mixed prefixes, miss", "mixed 10 miss", "mixed 10000 miss"),
        ("SPD mixed, linear (reference)", "mixed 10 linear", "mixed 10000 linear"),
        ("SAD lookup, raw ESP", "sad 10 raw", "sad 100000 raw"),
        ("SAD lookup, ESP in UDP", "sad 10 udp", "sad 100000 udp"),
    ]
    rows = []
    for what, a, b in pairs:
        ratio = results[b] / results[a]
        rows.append({"what": what, "small_ns": results[a], "large_ns": results[b],
                     "ratio": ratio})
        print(f"{what:<34}{results[a]:>10.0f}{results[b]:>10.0f}{ratio:>8.2f}", file=out)
    if args.json:
        data = {"python": platform.python_version(), "repeat": repeat, "rows": rows}
        write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
