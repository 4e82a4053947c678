"""Traffic and packet tools for the live-lab attacks, run inside a lab namespace
(``python labtool.py COMMAND ...`` through ``Lab.popen`` / ``Lab.exec``):

    send DST PORT COUNT TOKEN [INTERVAL_S]   COUNT UDP datagrams "TOKEN <i>" from an ordinary
                                             socket (the namespace's routes pick the source)
    listen PORT SECONDS                      prints "ready", then "SRC TOKEN" per datagram
    raw DST COUNT HEX...                     each hex IPv4 packet COUNT times through a raw
                                             socket (IP_HDRINCL: the source is the packet's)
    flood DST PORT COUNT SIZE                COUNT datagrams of SIZE bytes as fast as the socket
                                             takes them; prints how many were sent
"""

from __future__ import annotations

import socket
import sys
import time


def send(dst: str, port: int, count: int, token: str, interval: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(count):
        try:
            sock.sendto(f"{token} {i}".encode(), (dst, port))
        except OSError as exc:              # no route while the MN moves: counted as lost
            print(f"send error {exc}", file=sys.stderr)
        time.sleep(interval)
    sock.close()


def listen(port: int, seconds: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(4096)
        except TimeoutError:
            break
        print(f"{addr[0]} {data.decode(errors='replace')}", flush=True)


def raw(dst: str, count: int, packets: list[bytes]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for _ in range(count):
        for packet in packets:
            sock.sendto(packet, (dst, 0))
        time.sleep(0.02)
    sock.close()


def flood(dst: str, port: int, count: int, size: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"\x01" + b"\0" * (size - 1)          # type 1 (a Registration Request), truncated
    sent = 0
    for i in range(count):
        try:
            sock.sendto(payload, (dst, port))
            sent += 1
        except OSError:
            time.sleep(0.001)
        if i % 50 == 49:
            time.sleep(0.02)            # let the MN's TUN queue drain: the count is the test
    print(sent, flush=True)


def main(argv: list[str]) -> int:
    kind, args = argv[0], argv[1:]
    if kind == "send":
        send(args[0], int(args[1]), int(args[2]), args[3], float(args[4]) if len(args) > 4 else 0.02)
    elif kind == "listen":
        listen(int(args[0]), float(args[1]))
    elif kind == "raw":
        raw(args[0], int(args[1]), [bytes.fromhex(h) for h in args[2:]])
    elif kind == "flood":
        flood(args[0], int(args[1]), int(args[2]), int(args[3]))
    else:
        raise SystemExit(f"unknown command {kind!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
