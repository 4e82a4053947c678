"""Gratuitous ARP (RFC 5944 §4.6): make the home link's neighbour caches follow the MN.

When an MN leaves home, its HA proxies ARP for the home address and broadcasts a gratuitous ARP
that maps the home address to the HA's own link-layer address, so correspondents on the home link
send to the HA (which tunnels to the care-of address).  When the MN returns, the MN broadcasts one
with its own link-layer address.  RFC 5944 §4.6: an ARP request whose sender and target protocol
addresses are both the home address; we send it ``GRATUITOUS_ARP_REPEAT`` times (the RFC advises
repeating because ARP is unreliable).
"""

from __future__ import annotations

import errno
import socket
import struct

ETH_P_ARP = 0x0806
ARP_REQUEST = 1                # RFC 826 opcode
GRATUITOUS_ARP_REPEAT = 2
BROADCAST = b"\xff" * 6


def mac_of(ifname: str) -> bytes:
    with open(f"/sys/class/net/{ifname}/address") as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


def build_gratuitous_arp(mac: bytes, address: str) -> bytes:
    """Ethernet frame carrying a gratuitous ARP request for ``address`` at ``mac``."""
    ip = socket.inet_aton(address)
    eth = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    # RFC 826: htype Ethernet(1), ptype IPv4, hlen 6, plen 4, op, sha, spa, tha, tpa
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, ARP_REQUEST) + mac + ip + b"\0" * 6 + ip
    return eth + arp


class Announcer:
    """A packet socket on one interface, opened once: binding an AF_PACKET socket costs tens of
    milliseconds (the kernel waits for an RCU grace period), too slow for the handover path."""

    def __init__(self, ifname: str):
        self.ifname = ifname
        self.mac = mac_of(ifname)
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self._sock.bind((ifname, ETH_P_ARP))
        self._sock.setblocking(False)

    def announce(self, address: str, repeat: int = GRATUITOUS_ARP_REPEAT) -> None:
        frame = build_gratuitous_arp(self.mac, address)
        for _ in range(repeat):
            try:
                self._sock.send(frame)
            except BlockingIOError:
                break
            except OSError as exc:
                # Bound while the link was down, the socket holds a pending ENETDOWN that the
                # first send reports even though the link is up now: send again once.
                if exc.errno != errno.ENETDOWN:
                    raise
                self._sock.send(frame)

    def close(self) -> None:
        self._sock.close()


