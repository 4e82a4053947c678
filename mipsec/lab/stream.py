"""A UDP stream source and sink for the lab: measures loss and interruptions per direction.

``python -m mipsec.lab.stream --bind ADDR --port P --peer ADDR --rate R --duration S --out F``
sends ``R`` datagrams per second to ``peer:P`` (each carries a sequence number and the sender's
``time.monotonic()``) and, on the same socket, records every datagram it receives (sequence number
and arrival time).  At the end (``--duration`` elapsed or SIGTERM) it writes a JSON report to
``--out``: ``sent`` count, ``received`` [[seq, arrival], ...].  Two of them, one in the CN and one
in the MN, give both directions; ``analyse()`` turns a sender's count and a receiver's arrivals
into loss and the longest gap.  CLOCK_MONOTONIC is shared by all namespaces of the machine, so
arrival times compare with the daemons' handover timelines.

``--steady`` never bursts more than a few datagrams to catch up after the sender was held up (a
busy machine): the missed send slots are skipped and counted (soak runs judge the path, not
queue overflow behind a stalled sender).
``--blast`` sends as fast as the socket accepts (throughput benchmark); ``--size`` sets the UDP
payload size (at least 16 bytes: sequence number + timestamp).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import time
from itertools import pairwise
from typing import Any

from mipsec.lab import stop_on_signals

HEADER = struct.Struct("!Qd")       # sequence number, sender's monotonic time
STEADY_MAX_BURST = 8                # --steady: at most this many datagrams at once


def run_stream(bind: str, port: int, peer: str | None, rate: float, duration: float, size: int,
               blast: bool = False, stop: list[bool] | None = None,
               steady: bool = False) -> dict[str, Any]:
    stop = stop if stop is not None else [False]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((bind, port))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    received: list[tuple[int, float]] = []
    received_bytes = 0
    sent = 0
    send_errors = 0
    skipped = 0            # --steady: send slots given up after a stall of the sender
    pad = b"\0" * max(0, size - HEADER.size)
    start = time.monotonic()
    end = start + duration
    interval = 1.0 / rate if rate > 0 else 0.0       # 0: no paced sending
    next_send = start
    while not stop[0]:
        now = time.monotonic()
        if now >= end:
            break
        if peer and (blast or (interval and now >= next_send)):
            burst = 64 if blast else max(1, int((now - next_send) / interval) + 1)
            if steady and burst > STEADY_MAX_BURST:
                # the sender itself was held up (a busy machine): a burst of the missed
                # datagrams would measure queue overflow, not the path; skip them
                skipped += burst - 1
                next_send += interval * (burst - 1)
                burst = 1
            for _ in range(min(burst, 1000)):
                try:
                    sock.sendto(HEADER.pack(sent, now) + pad, (peer, port))
                    sent += 1
                except BlockingIOError:
                    break
                except OSError:
                    send_errors += 1      # no route / unreachable while moving: counted, lost
                    sent += 1
            if interval:
                next_send += interval * burst
                if next_send < now - 1.0:      # fell far behind (suspended): do not burst
                    next_send = now
        wait = 0.0 if blast else max(0.0, min(end - now, (next_send - now) if peer and interval
                                              else 0.1))
        for _key, _ in sel.select(wait):
            while True:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue
                if len(data) >= HEADER.size:
                    seq, _sent_at = HEADER.unpack_from(data)
                    received.append((seq, time.monotonic()))
                    received_bytes += len(data)
    # drain what is still in flight for a moment
    drain_end = time.monotonic() + (0.3 if not blast else 0.5)
    while time.monotonic() < drain_end and not stop[0]:
        for _key, _ in sel.select(0.05):
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            if len(data) >= HEADER.size:
                received.append((HEADER.unpack_from(data)[0], time.monotonic()))
                received_bytes += len(data)
    sock.close()
    return {"sent": sent, "send_errors": send_errors, "skipped": skipped, "start": start,
            "end": time.monotonic(), "size": size, "received": received,
            "received_bytes": received_bytes}


def analyse(sent: int, received: list[tuple[int, float]], start: float | None = None,
            end: float | None = None) -> dict[str, Any]:
    """Loss and longest gap of a stream (optionally within [start, end] arrival times)."""
    got = sorted(received, key=lambda r: r[1])
    if start is not None:
        got = [r for r in got if r[1] >= start]
    if end is not None:
        got = [r for r in got if r[1] <= end]
    seqs = {s for s, _ in got}
    lo = min(seqs) if seqs else 0
    hi = max(seqs) if seqs else -1
    expected = (hi - lo + 1) if start is not None else sent
    gaps = [(b[1] - a[1], a[1], b[1]) for a, b in pairwise(got)]
    longest = max(gaps) if gaps else (0.0, 0.0, 0.0)
    return {"expected": expected, "received": len(seqs),
            "lost": max(0, expected - len(seqs)),
            "longest_gap_s": longest[0], "gap_from": longest[1], "gap_to": longest[2]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mipsec.lab.stream", description=__doc__.split("\n")[0])
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--peer", default=None, help="send to this address (omit: receive only)")
    p.add_argument("--rate", type=float, default=100.0, help="datagrams per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--size", type=int, default=64, help="UDP payload bytes (>= 16)")
    p.add_argument("--blast", action="store_true", help="send as fast as possible")
    p.add_argument("--steady", action="store_true",
                   help="never catch up with more than a few datagrams at once after the sender "
                        "was held up: skip the missed ones (counted as skipped, not sent)")
    p.add_argument("--out", required=True, help="JSON report file")
    a = p.parse_args(argv)
    stop = stop_on_signals()
    report = run_stream(a.bind, a.port, a.peer, a.rate, a.duration, max(a.size, HEADER.size),
                        a.blast, stop, a.steady)
    with open(a.out + ".tmp", "w") as f:
        f.write(json.dumps(report))          # one shot: C encoder, 4x json.dump for an hour's list
    os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
