"""A packet sender and a UDP listener for the live-lab attacks, run inside a lab namespace:

    python attacker.py udp  SRC DST PORT TOKEN             plain UDP, any source address
    python attacker.py ipip OUTER_SRC OUTER_DST INNER_SRC INNER_DST PORT TOKEN
    python attacker.py listen PORT SECONDS                 prints one line per datagram received

Packets leave through a raw socket (IP_HDRINCL), so the source is whatever the attacker says.
"""

from __future__ import annotations

import socket
import sys
import time

from mipsec.mip import ipip
from mipsec.node.packet import a2b, build_udp_packet


def send(packet: bytes, dst: str, count: int = 5) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for _ in range(count):
        sock.sendto(packet, (dst, 0))
        time.sleep(0.02)
    sock.close()


def main(argv: list[str]) -> int:
    kind = argv[0]
    if kind == "udp":
        src, dst, port, token = argv[1:5]
        send(build_udp_packet(a2b(src), a2b(dst), 40000, int(port), token.encode()), dst)
    elif kind == "ipip":
        osrc, odst, isrc, idst, port, token = argv[1:7]
        inner = build_udp_packet(a2b(isrc), a2b(idst), 40000, int(port), token.encode())
        send(ipip.encapsulate(inner, osrc, odst), odst)
    elif kind == "listen":
        port, seconds = int(argv[1]), float(argv[2])
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))
        print("listening", flush=True)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, addr = sock.recvfrom(2048)
            except TimeoutError:
                break
            print(f"{addr[0]} {data.decode(errors='replace')}", flush=True)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
