"""A tiny delaying layer-2 forwarder: the lab's one-way Internet delay (no netem here).

``python -m mipsec.lab.delay --a dl0 --b dl1 --delay-ms 20`` (run inside the router namespace by
the lab) opens an ``AF_PACKET`` socket on each interface and copies every Ethernet frame received
on one to the other ``delay_ms`` later, in order, both ways: a wire with latency.  Frames the
forwarder itself sent (``PACKET_OUTGOING``) are not copied back.  ARP crosses it like anything else.

Checksum offload: a kernel sending on a veth leaves a TCP/UDP checksum to "hardware"
(``CHECKSUM_PARTIAL``: the field holds only the pseudo-header sum).  ``AF_PACKET`` hands such a
frame over as it is, flagged ``TP_STATUS_CSUMNOTREADY`` in its ``PACKET_AUXDATA``, and a frame
sent on through a packet socket is never finished by anyone: the receiver would drop it (bad
checksum), which broke third-party peers (strongSwan's IKE) through a delayed lab.  The forwarder
completes the checksum of such IPv4 UDP/TCP frames before queueing them; other frames are copied
as they are (mipsec's ESP / IP-in-IP packets are built in full by the daemons).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import selectors
import socket
import struct
import sys
import time

from mipsec.lab import stop_on_signals
from mipsec.wire.ipv4 import checksum

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4            # sll_pkttype of a frame this host sent (packet(7))
FRAME_SIZE = 65536
SOL_PACKET = 263               # <linux/socket.h>
PACKET_AUXDATA = 8             # <linux/if_packet.h>: struct tpacket_auxdata per frame
PACKET_STATISTICS = 6          # <linux/if_packet.h>: struct tpacket_stats (packets, drops)
_STATS = struct.Struct("=II")
STATS_INTERVAL_S = 0.5
TP_STATUS_CSUMNOTREADY = 1 << 3   # the L4 checksum is partial (left to the hardware)
ETH_HEADER = 14
ETHERTYPE_IPV4 = 0x0800
L4_CHECKSUM_OFFSET = {17: 6, 6: 16}   # UDP (RFC 768), TCP (RFC 9293): offset of the checksum
_AUXDATA = struct.Struct("=IIIHHHH")  # tp_status, tp_len, tp_snaplen, tp_mac, tp_net, vlan x2


def complete_checksum(frame: bytes) -> bytes:
    """``frame`` with its IPv4 UDP/TCP checksum computed in full (the field's partial value is
    replaced); any other frame, a fragment or a truncated one, unchanged."""
    if len(frame) < ETH_HEADER + 20 or frame[12:14] != b"\x08\x00":
        return frame
    ihl = (frame[ETH_HEADER] & 0x0F) * 4
    proto = frame[ETH_HEADER + 9]
    offset = L4_CHECKSUM_OFFSET.get(proto)
    total = int.from_bytes(frame[ETH_HEADER + 2:ETH_HEADER + 4], "big")
    frag = int.from_bytes(frame[ETH_HEADER + 6:ETH_HEADER + 8], "big") & 0x3FFF
    start = ETH_HEADER + ihl
    end = ETH_HEADER + total
    if offset is None or frag or ihl < 20 or end > len(frame) or end < start + offset + 2:
        return frame
    segment = frame[start:start + offset] + b"\0\0" + frame[start + offset + 2:end]
    pseudo = frame[ETH_HEADER + 12:ETH_HEADER + 20] + struct.pack("!BBH", 0, proto, end - start)
    value = checksum(pseudo + segment)
    if proto == 17 and value == 0:
        value = 0xFFFF                # RFC 768: a computed 0 is sent as all ones
    return (frame[:start + offset] + value.to_bytes(2, "big") + frame[start + offset + 2:])


def open_port(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    sock.setblocking(False)
    return sock


AUX_SPACE = socket.CMSG_SPACE(_AUXDATA.size)


def socket_drops(sock: socket.socket) -> int:
    """Frames the kernel dropped because this socket's receive queue was full, since the last
    call (PACKET_STATISTICS, packet(7): reading it resets it)."""
    _packets, drops = _STATS.unpack(sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size))
    return drops


def write_stats(path: str, stats: dict[str, int]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(stats, f)
    os.replace(path + ".tmp", path)


def forward(a: str, b: str, delay_s: float, stop: list[bool], stats_path: str | None = None
            ) -> None:
    """Copy frames both ways ``delay_s`` later until ``stop[0]``; with ``stats_path``, write
    what was forwarded and lost there every STATS_INTERVAL_S (JSON: frames copied, frames
    the kernel dropped on each port's full receive queue, send errors) - a forwarder that the
    machine starves loses frames like a congested wire, and the soak run wants to know."""
    ports = {a: open_port(a), b: open_port(b)}
    other = {a: ports[b], b: ports[a]}
    sel = selectors.DefaultSelector()
    for name, sock in ports.items():
        sel.register(sock, selectors.EVENT_READ, name)
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    order = itertools.count()
    stats = {"forwarded": 0, "send_errors": 0, **{f"socket_drops_{n}": 0 for n in ports}}
    next_stats = time.monotonic()
    while not stop[0]:
        now = time.monotonic()
        if stats_path is not None and now >= next_stats:
            for name, sock in ports.items():
                stats[f"socket_drops_{name}"] += socket_drops(sock)
            write_stats(stats_path, stats)
            next_stats = now + STATS_INTERVAL_S
        while queue and queue[0][0] <= now:
            _due, _n, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
                stats["forwarded"] += 1
            except OSError:
                stats["send_errors"] += 1
        timeout = max(0.0, queue[0][0] - now) if queue else STATS_INTERVAL_S
        for key, _ in sel.select(timeout):
            sock = ports[key.data]
            while True:
                try:
                    frame, anc, _flags, addr = sock.recvmsg(FRAME_SIZE, AUX_SPACE)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                for level, kind, data in anc:
                    if (level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= 4
                            and _AUXDATA.unpack_from(data.ljust(_AUXDATA.size, b"\0"))[0]
                            & TP_STATUS_CSUMNOTREADY):
                        frame = complete_checksum(frame)
                heapq.heappush(queue, (time.monotonic() + delay_s, next(order),
                                       other[key.data], frame))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipsec.lab.delay",
                                     description="Copy frames between two interfaces with a delay.")
    parser.add_argument("--a", required=True, help="first interface")
    parser.add_argument("--b", required=True, help="second interface")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay in ms")
    parser.add_argument("--stats", metavar="FILE", help="write frames forwarded and lost here")
    args = parser.parse_args(argv)
    stop = stop_on_signals()
    forward(args.a, args.b, args.delay_ms / 1000.0, stop, args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
