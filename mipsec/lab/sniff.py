"""Capture every frame of one lab link (both directions) into a pcap file, without tcpdump.

``python -m mipsec.lab.sniff --interface IF --out FILE [--duration S]``, run inside a lab
namespace (``Lab.sniff``): an AF_PACKET socket on ``IF`` records each Ethernet frame the
namespace sends or receives there into a LINKTYPE_ETHERNET pcap (scapy, tshark and Wireshark
read it), until ``--duration`` has passed or SIGTERM.  It prints ``ready`` on stdout once the
socket is bound, so a caller knows nothing after that line is missed.  The security tests use it
to show what crosses a link (no plaintext on a visited network, one public address behind the
NAT).
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import struct
import sys
import time

from mipsec.lab import stop_on_signals

ETH_P_ALL = 0x0003
LINKTYPE_ETHERNET = 1
PCAP_GLOBAL = struct.Struct("=IHHiIII")
PCAP_RECORD = struct.Struct("=IIII")
SNAPLEN = 65535


def capture(interface: str, out: str, duration: float, stop: list[bool]) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((interface, 0))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    frames = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(PCAP_GLOBAL.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        f.flush()
        print("ready", flush=True)
        end = time.monotonic() + duration
        while not stop[0] and time.monotonic() < end:
            for _key, _ in sel.select(min(0.1, max(0.0, end - time.monotonic()))):
                while True:
                    try:
                        frame = sock.recv(SNAPLEN)
                    except (BlockingIOError, InterruptedError):
                        break
                    now = time.time()
                    f.write(PCAP_RECORD.pack(int(now), int((now % 1) * 1e6), len(frame),
                                             len(frame)))
                    f.write(frame)
                    frames += 1
            f.flush()
    sock.close()
    return frames


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mipsec.lab.sniff",
                                description=__doc__.split("\n")[0])
    p.add_argument("--interface", required=True)
    p.add_argument("--out", required=True, help="new pcap file (LINKTYPE_ETHERNET, mode 0600)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    a = p.parse_args(argv)
    stop = stop_on_signals()
    frames = capture(a.interface, a.out, a.duration, stop)
    print(f"{frames} frames", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
