#!/usr/bin/env python3
"""Scale of the roles in the in-memory network: many MNs over one, then several GW/HA pairs.

    python3 benchmarks/bench_scale.py              # 100,000 MNs over 10 pairs; one pair of 10,000
    python3 benchmarks/bench_scale.py --mobiles 2000 --pairs 2 --moving 100 --no-memory   # smoke

One pair: ``--mobiles / --pairs`` MNs through one GW and one HA.

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

Several pairs (``--pairs P``, the deployment of docs/scaling.md: HAs sharded by home prefix, each
with its GW): ``--mobiles`` MNs spread evenly over P independent GW/HA pairs in ONE simulator
(one event queue, one virtual clock; each pair its own home and visited segments, so the pairs
may reuse one addressing plan), every MN registering at the same virtual instant.  Printed beside
the one-pair run of the same per-pair size, same process: build and registration wall time per
MN, and memory per MN (the process's resident-set growth over the P-pair build + registration,
which includes the allocator's overhead; and tracemalloc with ``--memory-per-pair`` MNs per pair
against one pair of that size, each measured in a separate untimed run).
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
from mipsec.node.mobile_node import RegState  # noqa: E402
from mipsec.node.packet import a2b, build_udp_packet  # noqa: E402
from mipsec.sim.core import Simulator  # noqa: E402
from mipsec.sim.scenario import wait_registered  # noqa: E402
from mipsec.sim.topology import build_topology  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_pairs(pairs: int, per_pair: int) -> tuple[Simulator, list]:
    sim = Simulator(1)
    topos = [build_topology(per_pair, internet_delay_s=0.010, seed=1 + p, record=False,
                            with_apps=False, sim=sim) for p in range(pairs)]
    return sim, topos


def register_all(sim: Simulator, topos: list, timeout_s: float = 60.0,
                 step_s: float = 0.0005) -> bool:
    for topo in topos:
        for i in range(len(topo.mobiles)):
            topo.move("a", i)
    pending = [m.role for topo in topos for m in topo.mobiles]
    deadline = sim.now + timeout_s
    while True:
        pending = [r for r in pending if r.state is not RegState.REGISTERED]
        if not pending:
            return True
        if sim.now >= deadline:
            return False
        sim.run(until=min(deadline, sim.now + step_s))


def run_pairs(pairs: int, per_pair: int) -> dict:
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    sim, topos = build_pairs(pairs, per_pair)
    t1 = time.perf_counter()
    ok = register_all(sim, topos)
    t2 = time.perf_counter()
    rss = rss_bytes() - rss0
    n = pairs * per_pair
    complete = ok and all(len(t.ha.role.bindings) == per_pair for t in topos)
    drops = sum(sum(t.gw.role.drops.values()) + sum(t.ha.role.drops.values()) for t in topos)
    out = {"pairs": pairs, "n": n, "build_s": t1 - t0, "register_s": t2 - t1,
           "virtual_s": sim.now, "complete": complete, "drops": drops, "rss_per_mn": rss / n,
           "events": sim.events_run}
    del sim, topos
    gc.collect()
    return out


def memory_per_mn_pairs(pairs: int, per_pair: int) -> float:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    sim, topos = build_pairs(pairs, per_pair)
    assert register_all(sim, topos)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del sim, topos
    return used / (pairs * per_pair)


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
    ap.add_argument("--mobiles", type=int, default=100_000,
                    help="MNs in the several-pair run (divided evenly over --pairs)")
    ap.add_argument("--pairs", type=int, default=10, help="GW/HA pairs (1: no several-pair run)")
    ap.add_argument("--moving", type=int, default=1_000)
    ap.add_argument("--memory-per-pair", type=int, default=1_000,
                    help="MNs per pair in the tracemalloc comparison of P pairs with one")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc runs")
    args = ap.parse_args()
    if args.pairs < 1 or args.mobiles < args.pairs:
        ap.error("--pairs at least 1 and at most --mobiles")
    per_pair = args.mobiles // args.pairs
    if args.moving > per_pair:
        ap.error(f"--moving at most the MNs of one pair ({per_pair})")

    esp_us = esp_round_trip_us()
    # the largest run first, in a fresh process: its resident-set growth is its own
    pool = run_pairs(args.pairs, per_pair) if args.pairs > 1 else None
    refs = [run(10, 10) for _ in range(3)]
    big = run(per_pair, args.moving)
    one = run_pairs(1, per_pair)            # the one-pair reference, built like the pool
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
    print(f"{per_pair} MNs: registration {big['register_s']:.2f} s wall "
          f"({reg_us:.0f} us/MN = {reg_us / esp_us:.0f} ESP round trips; "
          f"x{reg_us / (ref['register_s'] / ref['n'] * 1e6):.2f} the 10-MN run per MN)")
    print(f"{args.moving} simultaneous handovers: {big['handover_s']:.2f} s wall "
          f"({ho_us:.0f} us/handover = {ho_us / esp_us:.0f} ESP round trips; "
          f"x{ho_us / (ref['handover_s'] / ref['moving'] * 1e6):.2f} the 10-MN run), all complete: "
          f"{big['complete']}")
    if not args.no_memory:
        small_mem = memory_per_mn(10)
        big_mem = memory_per_mn(per_pair)
        print(f"memory per MN (MN + GW + HA state, tracemalloc): {big_mem / 1024:.1f} KiB with "
              f"{per_pair} MNs, {small_mem / 1024:.1f} KiB with 10 (x{big_mem / small_mem:.2f})")
    ok = big["complete"] and one["complete"]
    if pool is not None:
        ok = ok and pool["complete"]
        print("\nseveral GW/HA pairs in one simulator (all MNs register at one instant), "
              "beside one pair of the same size per pair:")
        print(f"{'run':>18} {'build/MN':>10} {'register/MN':>12} {'virtual':>8} "
              f"{'complete':>9} {'drops':>6}")
        for r in (one, pool):
            print(f"{r['pairs']:>3} x {r['n'] // r['pairs']:>6} MNs {r['build_s'] / r['n'] * 1e6:>8.0f}us "
                  f"{r['register_s'] / r['n'] * 1e6:>10.0f}us {r['virtual_s'] * 1e3:>6.1f}ms "
                  f"{str(r['complete']):>9} {r['drops']:>6}")
        per = pool["register_s"] / pool["n"] * 1e6
        ref = one["register_s"] / one["n"] * 1e6
        print(f"{pool['n']} MNs over {pool['pairs']} pairs: registration {pool['register_s']:.1f} s "
              f"wall, {per:.0f} us/MN (x{per / ref:.2f} the one-pair run per MN), "
              f"{pool['rss_per_mn'] / 1024:.1f} KiB resident per MN (the process's growth over "
              f"the build and registration of all pairs, allocator included)")
        if not args.no_memory:
            m = min(args.memory_per_pair, per_pair)
            one_mem = memory_per_mn_pairs(1, m)
            pool_mem = memory_per_mn_pairs(args.pairs, m)
            print(f"memory per MN (tracemalloc): {pool_mem / 1024:.1f} KiB with {args.pairs} pairs "
                  f"x {m} MNs, {one_mem / 1024:.1f} KiB with 1 pair x {m} "
                  f"(x{pool_mem / one_mem:.2f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
