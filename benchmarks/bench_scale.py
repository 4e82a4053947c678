#!/usr/bin/env python3
"""Scale of the roles in the in-memory network: many MNs through one GW and one HA.

    python3 benchmarks/bench_scale.py                      # 10,000 MNs, 1,000 hand over at once
    python3 benchmarks/bench_scale.py --mobiles 1000 --moving 100 --no-memory

Phases: build the topology and roles; register every MN (each RRQ goes MN -> ESP -> GW -> HA ->
SIU -> GW -> ESP -> MN); then ``--moving`` MNs change their care-of address at the same virtual
instant and the run continues until every one is registered again.  All must complete.

Printed beside each figure, references measured in the same run:
* the same phases with 10 MNs, all 10 handing over (best of 3 before and 3 after the big run;
  per-MN wall time and memory:
  does the cost per MN grow with N?);
* one bare ESP encapsulate + decapsulate of a 64-byte packet through mipsec's SA (a handover
  moves ~9 packets through ~10 role steps, so "ESP round trips per registration" shows how much
  of the cost is protocol work rather than the simulator).
Memory per MN is measured with tracemalloc in a separate run of the build + registration
phases (tracemalloc slows Python down; its run is not timed).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mipsec.ipsec.sa import Direction, SecurityAssociation  # noqa: E402
from mipsec.node.packet import a2b, build_udp_packet  # noqa: E402
from mipsec.sim.scenario import wait_registered  # noqa: E402
from mipsec.sim.topology import build_topology  # noqa: E402


def run(n: int, moving: int) -> dict:
    gc.collect()
    t0 = time.perf_counter()
    topo = build_topology(n, internet_delay_s=0.010, seed=1, record=False, with_apps=False)
    t1 = time.perf_counter()
    for i in range(n):
        topo.move("a", i)
    ok_reg = wait_registered(topo, 60.0)
    t2 = time.perf_counter()
    v0 = topo.sim.now
    for i in range(moving):
        topo.move("b", i)
    ok_ho = wait_registered(topo, 60.0)
    t3 = time.perf_counter()
    gw, ha = topo.gw.role, topo.ha.role
    moved_ok = all(gw.mobiles[topo.mobiles[i].role.home_address].care_of == topo.care_of["b"][i]
                   for i in range(moving))
    return {"n": n, "moving": moving, "build_s": t1 - t0, "register_s": t2 - t1,
            "handover_s": t3 - t2, "handover_virtual_s": topo.sim.now - v0,
            "complete": ok_reg and ok_ho and moved_ok and len(ha.bindings) == n,
            "drops": sum(gw.drops.values()) + sum(ha.drops.values()),
            "events": topo.sim.events_run}


def memory_per_mn(n: int) -> float:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    topo = build_topology(n, internet_delay_s=0.010, seed=1, record=False, with_apps=False)
    for i in range(n):
        topo.move("a", i)
    assert wait_registered(topo, 60.0)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del topo
    return used / n


def esp_round_trip_us(repeat: int = 5, count: int = 2000) -> float:
    key = bytes(range(20))
    best = float("inf")
    inner = build_udp_packet(a2b("10.1.0.100"), a2b("10.1.0.10"), 9000, 9000, bytes(36),
                             with_checksum=False)
    for _ in range(repeat):
        out = SecurityAssociation(spi=0x1001, direction=Direction.OUTBOUND,
                                  encryption="ENCR_AES_GCM_16", encryption_key=key,
                                  local="172.16.1.10", remote="172.16.0.1")
        inb = SecurityAssociation(spi=0x1001, direction=Direction.INBOUND,
                                  encryption="ENCR_AES_GCM_16", encryption_key=key,
                                  local="172.16.0.1", remote=None)
        t = time.perf_counter()
        for _ in range(count):
            inb.decapsulate(out.encapsulate(inner))
        best = min(best, (time.perf_counter() - t) / count)
    return best * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mobiles", type=int, default=10_000)
    ap.add_argument("--moving", type=int, default=1_000)
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc runs")
    args = ap.parse_args()

    esp_us = esp_round_trip_us()
    refs = [run(10, 10) for _ in range(3)]
    big = run(args.mobiles, args.moving)
    refs += [run(10, 10) for _ in range(3)]      # before and after: the machine is shared
    ref = min(refs, key=lambda r: r["register_s"] + r["handover_s"])
    print(f"reference: one ESP encapsulate+decapsulate (AES-GCM-128, 64 B): {esp_us:.1f} us")
    print(f"{'run':>14} {'build/MN':>10} {'register/MN':>12} {'handover/MN':>12} "
          f"{'virtual':>8} {'complete':>9} {'drops':>6}")
    for r in (ref, big):
        print(f"{r['n']:>6} / {r['moving']:>5} {r['build_s'] / r['n'] * 1e6:>8.0f}us "
              f"{r['register_s'] / r['n'] * 1e6:>10.0f}us {r['handover_s'] / r['moving'] * 1e6:>10.0f}us "
              f"{r['handover_virtual_s'] * 1e3:>6.1f}ms {str(r['complete']):>9} {r['drops']:>6}")
    reg_us = big["register_s"] / big["n"] * 1e6
    ho_us = big["handover_s"] / big["moving"] * 1e6
    print(f"{args.mobiles} MNs: registration {big['register_s']:.2f} s wall "
          f"({reg_us:.0f} us/MN = {reg_us / esp_us:.0f} ESP round trips; "
          f"x{reg_us / (ref['register_s'] / ref['n'] * 1e6):.2f} the 10-MN run per MN)")
    print(f"{args.moving} simultaneous handovers: {big['handover_s']:.2f} s wall "
          f"({ho_us:.0f} us/handover = {ho_us / esp_us:.0f} ESP round trips; "
          f"x{ho_us / (ref['handover_s'] / ref['moving'] * 1e6):.2f} the 10-MN run), all complete: "
          f"{big['complete']}")
    if not args.no_memory:
        small_mem = memory_per_mn(10)
        big_mem = memory_per_mn(args.mobiles)
        print(f"memory per MN (MN + GW + HA state, tracemalloc): {big_mem / 1024:.1f} KiB with "
              f"{args.mobiles} MNs, {small_mem / 1024:.1f} KiB with 10 (x{big_mem / small_mem:.2f})")
    return 0 if big["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
