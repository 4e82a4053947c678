"""How the GW's data path scales when its MNs are split between processes (sharding by SA).

The GW role alone, without the kernel: ``--mobiles`` MNs, each with its manually keyed SA pair,
bound to a care-of address; the uplink (ESP -> inner packet, ``net_fast_path``) and the
downlink (the HA's IP-in-IP -> ESP, ``tun_fast_path``) of every MN in turn.  With one process
the GW role has all MNs; with ``N`` processes each has the MNs whose inbound SPI modulo ``N``
is its index (``mipsec.io.bpf.worker_of``), as the kernel would hand them their packets.  Every
SA is in exactly one process.  Packets are built before the clock starts; the processes start
together (a barrier) and the figure is all packets over the time from the start to the last
process's end (wall clock), beside the CPU time per packet of each process.  Configurations
are interleaved (1, N, 1, N ...), best of ``--runs``.

    python3 benchmarks/bench_workers.py [--mobiles 8] [--packets 2000] [--workers 2] [--runs 5]

On a machine shared with other jobs the wall-clock figure favours N processes (the scheduler
gives N runnable processes N shares); the CPU time per packet does not depend on that.

``--live`` (root) measures the real GW daemon instead: one lab per configuration (``mipsec lab
up --manual-keys --gw-workers N`` for N = 0, 1, 2, all up at once, each with ``--mobiles``
MNs), loaded in turn (interleaved, ``--runs``) with pre-built packets replayed by a small C
sender (benchmarks/rawload.c, compiled at run time): ESP from every MN's care-of address (sent
from the router's namespace) and the HA's IP-in-IP towards them (from the HA's namespace), each
at ``--rate`` packets/s for ``--seconds``.  The MN daemons are stopped (SIGSTOP) meanwhile so
their decryption does not compete for the CPUs.  Figures: packets the GW forwarded per second
(its TUN writes and ESP sends, from ``mipsec status``), its CPU time per packet (all its
processes, /proc), and each configuration's ratio to one process, formed within each run.

    sudo python3 benchmarks/bench_workers.py --live [--mobiles 4] [--rate 30000] [--seconds 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import multiprocessing as mp
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mipsec.io.bpf import worker_of  # noqa: E402
from mipsec.ipsec.sa import Direction  # noqa: E402
from mipsec.mip import ipip  # noqa: E402
from mipsec.node.config import make_lab_configs  # noqa: E402
from mipsec.node.gateway import BindingState, VpnGateway  # noqa: E402
from mipsec.node.mobile_node import make_sa  # noqa: E402
from mipsec.node.packet import a2b
from mipsec.node.packet import build_udp_packet as build_udp  # noqa: E402


def build_udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes,
                     ident: int = 0) -> bytes:
    """IPv4 + UDP between dotted addresses, both checksums valid."""
    return build_udp(a2b(src), a2b(dst), sport, dport, payload, identification=ident)

CN = "10.1.0.10"
SEED = 7


def coa_of(i: int) -> str:
    return f"172.16.{1 + i // 200}.{10 + i % 200}"


def build(mobiles: int, workers: int, index: int, packets: int):
    """(gw, uplink ESP packets, downlink IP-in-IP packets) for the shard ``index``."""
    cfgs = make_lab_configs(mobiles, random.Random(SEED))
    gcfg = cfgs.gateway
    mine = [m for m in gcfg.mobiles if worker_of(m.esp_in.spi, workers) == index]
    gw = VpnGateway(dataclasses.replace(gcfg, mobiles=tuple(mine)))
    ha = gcfg.mobiles[0].home_agent
    up: list[bytes] = []
    down: list[bytes] = []
    feeds = []
    for m in mine:
        i = next(k for k, g in enumerate(gcfg.mobiles) if g is m)
        coa = coa_of(i)
        mobile = gw.mobiles[m.home_address]
        mobile.outbound.rebind(remote=coa)       # as the HA's first SIU would
        mobile.care_of, mobile.state = coa, BindingState.BOUND
        sender = make_sa(m.esp_in, Direction.OUTBOUND, local=coa, remote=gw.outside)
        inner_up = ipip.encapsulate(build_udp_packet(m.home_address, 6000, CN, 5000, bytes(36)),
                                    coa, ha)
        inner_down = ipip.encapsulate(build_udp_packet(CN, 5000, m.home_address, 6000,
                                                       bytes(36)), ha, coa)
        feeds.append((sender, inner_up, inner_down))
    per_mobile = packets // mobiles
    for _ in range(per_mobile):
        for sender, inner_up, inner_down in feeds:
            up.append(sender.encapsulate(inner_up, 1.0))
            down.append(inner_down)
    return gw, up, down


def run_shard(mobiles, workers, index, packets, barrier, results):
    gw, up, down = build(mobiles, workers, index, packets)
    net, tun = gw.net_fast_path, gw.tun_fast_path
    gc.collect()
    gc.freeze()                 # as the daemons do once set up (EventLoop.run)
    barrier.wait()
    t0, c0 = time.perf_counter(), time.thread_time()
    ok = 0
    for p_up, p_down in zip(up, down, strict=True):
        ok += net(p_up, 2.0).__class__ is bytes
        ok += tun(p_down, 2.0).__class__ is bytes
    t1, c1 = time.perf_counter(), time.thread_time()
    results.put((index, t0, t1, c1 - c0, len(up) + len(down), ok))


def measure(mobiles: int, workers: int, packets: int) -> tuple[float, float]:
    """(packets/s over all processes, CPU us per packet) for one configuration."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [ctx.Process(target=run_shard, args=(mobiles, workers, k, packets, barrier, results))
             for k in range(workers)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    total = sum(r[4] for r in rows)
    if sum(r[5] for r in rows) != total:
        raise SystemExit("a packet was dropped: the benchmark's set-up is wrong")
    wall = max(r[2] for r in rows) - min(r[1] for r in rows)
    return total / wall, sum(r[3] for r in rows) / total * 1e6


def main() -> int:
    if "--live" in sys.argv:
        from bench_workers_live import main as live_main
        return live_main([a for a in sys.argv[1:] if a != "--live"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mobiles", type=int, default=8)
    ap.add_argument("--packets", type=int, default=2000, help="uplink packets (and as many "
                    "downlink) over all MNs, per run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if args.mobiles < args.workers:
        raise SystemExit("--mobiles must be at least --workers (each worker needs an MN)")
    best: dict[int, tuple[float, float]] = {}
    for _ in range(args.runs):
        for n in (1, args.workers):
            pps, cpu = measure(args.mobiles, n, args.packets)
            old = best.get(n)
            best[n] = (max(pps, old[0]) if old else pps, min(cpu, old[1]) if old else cpu)
    print(f"# GW role alone, {args.mobiles} MNs, {args.packets} uplink + {args.packets} downlink "
          f"packets per run, 64-byte inner, AES-GCM-128; best of {args.runs} interleaved runs; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'processes':>9}{'kpkt/s (wall)':>15}{'CPU us/pkt':>12}{'scaling':>9}")
    for n in (1, args.workers):
        print(f"{n:>9}{best[n][0] / 1e3:>15.1f}{best[n][1]:>12.2f}"
              f"{best[n][0] / best[1][0]:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
