"""A tiny delaying layer-2 forwarder: the lab's one-way Internet delay (no netem here).

``python -m mipsec.lab.delay --a dl0 --b dl1 --delay-ms 20`` (run inside the router namespace by
the lab) opens an ``AF_PACKET`` socket on each interface and copies every Ethernet frame received
on one to the other ``delay_ms`` later, in order, both ways: a wire with latency.  Frames the
forwarder itself sent (``PACKET_OUTGOING``) are not copied back.  ARP crosses it like anything else.

Limitation (documented in docs/operations.md): frames whose L4 checksum the sending kernel left to
"hardware" (``CHECKSUM_PARTIAL``, veth offload) are copied as they are; mipsec's ESP / IP-in-IP
packets are built in full by the daemons and are unaffected.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import selectors
import socket
import sys
import time

from mipsec.lab import stop_on_signals

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4            # sll_pkttype of a frame this host sent (packet(7))
FRAME_SIZE = 65536


def open_port(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def forward(a: str, b: str, delay_s: float, stop: list[bool]) -> None:
    ports = {a: open_port(a), b: open_port(b)}
    other = {a: ports[b], b: ports[a]}
    sel = selectors.DefaultSelector()
    for name, sock in ports.items():
        sel.register(sock, selectors.EVENT_READ, name)
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    order = itertools.count()
    while not stop[0]:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _due, _n, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
            except OSError:
                pass
        timeout = max(0.0, queue[0][0] - now) if queue else 0.5
        for key, _ in sel.select(timeout):
            sock = ports[key.data]
            while True:
                try:
                    frame, addr = sock.recvfrom(FRAME_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                heapq.heappush(queue, (time.monotonic() + delay_s, next(order),
                                       other[key.data], frame))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipsec.lab.delay",
                                     description="Copy frames between two interfaces with a delay.")
    parser.add_argument("--a", required=True, help="first interface")
    parser.add_argument("--b", required=True, help="second interface")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay in ms")
    args = parser.parse_args(argv)
    stop = stop_on_signals()
    forward(args.a, args.b, args.delay_ms / 1000.0, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
