"""The event loop's data path without the kernel: batched (the default) against one packet at a
time (``EventLoop(batch=False)``, the reference), for the HA's IP-in-IP downlink, the GW's ESP
downlink (TUN side), the GW's ESP uplink (net side) and the MN's uplink (TUN side, sent on its
interface).

Roles come registered from the simulator (same seed each time), the TUN and the net are
in-memory stubs that cost the same in both modes, so the difference is the loop's own work per
packet (drain, dispatch, action objects, counters) plus what the roles' fast paths save.
Runs are interleaved (each mode in turn, best of N), timed with the thread's CPU time (the
periods in which other jobs had the core are left out).

    python3 benchmarks/bench_loop.py [--packets 2000] [--runs 7]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mipsec.io.loop import EventLoop  # noqa: E402
from mipsec.node.actions import SendToNet  # noqa: E402
from mipsec.node.packet import a2b, build_udp_packet  # noqa: E402
from mipsec.sim.topology import build_topology  # noqa: E402

CN, HOME = "10.1.0.10", "10.1.0.100"


class Tun:
    def __init__(self, packets: list[bytes]):
        self.queue = list(reversed(packets))
        self.written = 0

    def read(self) -> bytes | None:
        return self.queue.pop() if self.queue else None

    def write(self, packet: bytes) -> None:
        self.written += 1

    def fileno(self) -> int:
        return 0


class Net:
    def __init__(self, packets: list[bytes] = ()):
        self.queue = list(packets)
        self.sent = 0

    def send(self, packet: bytes, interface: str | None = None) -> bool:
        self.sent += 1
        return True

    def send_batch(self, packets: list[bytes], interface: str | None = None) -> list[bool]:
        self.sent += len(packets)
        return [True] * len(packets)

    def receive(self) -> list[bytes]:
        out, self.queue = self.queue[:256], self.queue[256:]
        return out

    def fileno(self) -> int:
        return 0


def setup(n: int):
    topo = build_topology(1, internet_delay_s=0.002, seed=7)
    topo.move("a")
    topo.sim.run(until=1.0)
    ha, gw, mn = topo.ha.role, topo.gw.role, topo.mn.role
    down = [build_udp_packet(a2b(CN), a2b(HOME), 5000, 6000, bytes(36), identification=i) for i in range(n)]
    tunnelled = [ha.tun_fast_path(p, 1.0) for p in down]
    up = [build_udp_packet(a2b(HOME), a2b(CN), 6000, 5000, bytes(36), identification=i) for i in range(n)]
    esp = [a.packet for p in up for a in mn.receive_from_tun(p, 1.5) if isinstance(a, SendToNet)]
    app = [build_udp_packet(a2b(HOME), a2b(CN), 6000, 5000, bytes(36), identification=i)
           for i in range(n)]
    return ha, gw, mn, down, tunnelled, esp, app


def time_one(role, tun_packets, net_packets, batch: bool) -> float:
    tun, net = Tun(tun_packets), Net(net_packets)
    loop = EventLoop(role, tun=None, sender=net, receivers=[], clock=lambda: 2.0, batch=batch)
    loop.tun = tun
    n = len(tun_packets) + len(net_packets)
    gc.disable()
    t0 = time.thread_time()
    while tun.queue:
        loop._on_tun(tun)
    while net.queue:
        loop._on_net(net)
    dt = time.thread_time() - t0
    gc.enable()
    assert net.sent + tun.written == n, (net.sent, tun.written, n)
    return dt / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    best: dict[tuple[str, bool], float] = {}
    for _ in range(args.runs):
        for batch in (False, True):
            # fresh roles each run: the GW's uplink SA must see every sequence number once
            ha, gw, mn, down, tunnelled, esp, app = setup(args.packets)
            for name, role, tun_in, net_in in (("HA downlink (TUN -> IP-in-IP)", ha, down, []),
                                               ("GW downlink (TUN -> ESP)", gw, tunnelled, []),
                                               ("GW uplink (ESP -> TUN)", gw, [], esp),
                                               ("MN uplink (TUN -> ESP)", mn, app, [])):
                us = time_one(role, tun_in, net_in, batch)
                best[(name, batch)] = min(best.get((name, batch), us), us)
    print(f"{'path':<32}{'single us/pkt':>15}{'batched us/pkt':>16}{'ratio':>8}")
    for name in dict.fromkeys(k[0] for k in best):
        one, many = best[(name, False)], best[(name, True)]
        print(f"{name:<32}{one:>15.2f}{many:>16.2f}{many / one:>7.2f}x")
    print(f"(best of {args.runs} interleaved runs of {args.packets} packets; 64-byte inner "
          f"packets; in-memory TUN and net; thread CPU time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
