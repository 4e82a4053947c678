"""The net side of a daemon: sending and receiving whole IPv4 packets.

Roles take and return complete IPv4 packets (docs/design.md, "What net and tun mean"), so:

* **sending** is one raw ``IPPROTO_RAW`` socket (``IP_HDRINCL`` is implied, Linux raw(7)): the
  role's packet goes out exactly as built, routed by its destination; a ``SendToNet`` that names
  an interface goes through a socket bound to it (``SO_BINDTODEVICE``), so the MN's RRQ leaves
  from the care-of interface it names;
* **receiving ESP** (protocol 50) and **IP-in-IP** (protocol 4) uses raw sockets of that protocol:
  Linux hands them the whole datagram, IPv4 header included (raw(7));
* **receiving UDP** (4500 for UDP-encapsulated ESP, RFC 3948; 434 for Mobile IP registration,
  RFC 5944 §3.1; the SIU port) uses ordinary UDP sockets, whose datagrams are rebuilt into
  IPv4 + UDP packets: the source comes from ``recvfrom``, the local (destination) address from
  ``IP_PKTINFO`` (ip(7)), TTL 64, checksums valid (``udp_checksum=False``: UDP checksum 0, "none"
  in IPv4, RFC 768: for ESP in UDP, whose checksum the kernel has verified and no one reads again,
  RFC 3948 §2.1; computing it in Python cost more than the rest of the rebuild).

Every receiver has ``fileno()`` and ``receive() -> list[bytes]`` (everything queued, non-blocking),
which is all the event loop needs; ``FakeNet`` implements the same for tests.  ``receive`` never
raises: an empty queue (EAGAIN) or a signal (EINTR) ends the batch, any other ``OSError`` (an
ICMP error queued on a UDP socket, ENOBUFS, ENOMEM ...) is transient for one read: it is counted
in ``errors``, logged once per errno and receiver, and the batch goes on with the next read.
"""

from __future__ import annotations

import collections
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from mipsec.constants import RECEIVE_BUFFER_BYTES
from mipsec.errors import ConfigError
from mipsec.io import mmsg
from mipsec.node import packet

RECV_SIZE = 65535
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)     # socket(7), Linux
MAX_BATCH = 256                # packets taken from one socket per wake-up (fairness between fds)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)   # ip(7); Python < 3.12 lacks the constant
REBUILT_TTL = 64               # TTL of a rebuilt IPv4 header (the real one is not available)

_PKTINFO = struct.Struct("=I4s4s")        # struct in_pktinfo: ifindex, spec_dst, addr

log = logging.getLogger(__name__)


class RawSender:
    """Sends complete IPv4 packets (header included) through raw sockets; ``send_batch`` sends
    many (by routing, or on one interface) in one system call per 64 (sendmmsg; one sendto each
    where unavailable), with the same result per packet as ``send``."""

    def __init__(self, use_mmsg: bool | None = None) -> None:
        self._default = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self._use_mmsg = use_mmsg
        self._multi = mmsg.MultiSender(self._default, use_mmsg)
        self._by_interface: dict[str, socket.socket] = {}
        self._multi_by_interface: dict[str, mmsg.MultiSender] = {}
        self._dst: dict[bytes, tuple[str, int]] = {}    # outer destination -> sendto address
        self.sent = 0
        self.errors = 0

    def _socket_for(self, interface: str | None) -> socket.socket:
        if interface is None:
            return self._default
        sock = self._by_interface.get(interface)
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            except OSError:
                sock.close()
                return self._default     # not an interface name (an address, or gone): route
            self._by_interface[interface] = sock
        return sock

    def _address(self, raw_dst: bytes) -> tuple[str, int]:
        dst = self._dst.get(raw_dst)
        if dst is None:
            if len(self._dst) > 4096:
                self._dst.clear()
            dst = self._dst[raw_dst] = (socket.inet_ntoa(raw_dst), 0)
        return dst

    def send_batch(self, packets: list[bytes], interface: str | None = None) -> list[bool]:
        """Send packets in order, by routing or on ``interface`` as ``send`` does; per packet
        True, or False (counted in ``errors``) if it was too short or the kernel refused it."""
        multi = self._multi
        if interface is not None:
            sock = self._socket_for(interface)
            if sock is not self._default:
                bound = self._multi_by_interface.get(interface)
                if bound is None or bound.sock is not sock:
                    bound = self._multi_by_interface[interface] = mmsg.MultiSender(
                        sock, self._use_mmsg)
                multi = bound
        address = self._address
        items = []
        index = []
        results = [False] * len(packets)
        for i, pkt in enumerate(packets):
            if len(pkt) < 20:
                continue
            items.append((pkt, address(pkt[16:20])))
            index.append(i)
        for i, ok in zip(index, multi.send_batch(items), strict=True):
            results[i] = ok
        sent = sum(1 for ok in results if ok)
        self.sent += sent
        self.errors += len(packets) - sent
        return results

    def send(self, packet: bytes, interface: str | None = None) -> bool:
        """Send one packet; False (counted in ``errors``) if the kernel refused it."""
        if len(packet) < 20:
            self.errors += 1
            return False
        dst = self._address(packet[16:20])
        try:
            sock = self._default if interface is None else self._socket_for(interface)
            sock.sendto(packet, dst)
        except OSError:
            # No route, link down during a handover, queue full: the packet is lost, as on a wire.
            self.errors += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._default.close()
        for sock in self._by_interface.values():
            sock.close()
        self._by_interface.clear()
        self._multi_by_interface.clear()


def enlarge_receive_buffer(sock: socket.socket, size: int = RECEIVE_BUFFER_BYTES) -> int:
    """Ask for a ``size`` receive buffer (SO_RCVBUFFORCE: past net.core.rmem_max, with
    CAP_NET_ADMIN; else SO_RCVBUF, which the kernel caps there); the size granted."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError as exc:
            log.debug("receive buffer of %d bytes refused: %s", size, exc)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


class _Receiver:
    """What both receivers share: one non-blocking batch of reads that never raises."""

    name: str
    _sock: Any

    def __init__(self) -> None:
        self.errors = 0                      # failed reads (transient OSErrors)
        self._logged: set[int | None] = set()   # errnos already logged

    def fileno(self) -> int:
        return self._sock.fileno()

    def _batch(self, read_one: Callable[[], bytes]) -> list[bytes]:
        out: list[bytes] = []
        for _ in range(MAX_BATCH):
            try:
                out.append(read_one())
            except (BlockingIOError, InterruptedError):
                break                        # queue empty, or a signal: the loop comes back
            except OSError as exc:
                self._receive_failed(exc)
        return out

    def _receive_failed(self, exc: OSError) -> None:
        """Count a failed receive; log it once per errno."""
        self.errors += 1
        if exc.errno not in self._logged:
            self._logged.add(exc.errno)
            log.warning("%s: receive failed: %s (counted; logged once per error)", self.name, exc)

    def close(self) -> None:
        self._sock.close()


class RawReceiver(_Receiver):
    """Receives whole IPv4 packets of one IP protocol (ESP 50, IP-in-IP 4) addressed to us.
    ``sock``: an already open socket (a fake in tests)."""

    def __init__(self, protocol: int, name: str | None = None, *, sock: Any = None,
                 use_mmsg: bool | None = None):
        super().__init__()
        if sock is None:
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, protocol)
            except PermissionError as exc:
                raise ConfigError(f"raw socket for IP protocol {protocol} needs root or "
                                  f"CAP_NET_RAW: {exc}") from exc
            enlarge_receive_buffer(sock)
        self._sock = sock
        self._sock.setblocking(False)
        self.name = name or f"raw-{protocol}"
        self.protocol = protocol
        self._multi = (mmsg.MultiReceiver(self._sock, RECV_SIZE, use_mmsg=use_mmsg)
                       if isinstance(self._sock, socket.socket) and use_mmsg is not False
                       and mmsg.available() else None)

    def receive(self) -> list[bytes]:
        if self._multi is None:
            return self._batch(lambda: self._sock.recv(RECV_SIZE))
        # recvmmsg: up to 64 per system call, until the queue is empty (or MAX_BATCH)
        out: list[bytes] = []
        for _ in range(MAX_BATCH // mmsg.MAX_BATCH):
            try:
                got = self._multi.receive(MAX_BATCH - len(out))
            except OSError as exc:
                self._receive_failed(exc)
                continue
            out += got
            if len(got) < mmsg.MAX_BATCH:
                break
        return out

class UdpReceiver(_Receiver):
    """A UDP socket whose datagrams come out rebuilt as IPv4 + UDP packets (see module doc).
    ``sock``: an already bound socket with IP_PKTINFO on (a fake in tests)."""

    def __init__(self, port: int, address: str = "0.0.0.0", name: str | None = None, *,
                 sock: Any = None, interface: str | None = None,
                 role_entry: str = "receive_from_net", udp_checksum: bool = True):
        super().__init__()
        self.udp_checksum = udp_checksum
        # the role method the loop hands this socket's datagrams to (the GW's SIU socket:
        # "receive_siu"); ``interface``: only datagrams that arrived on it (SO_BINDTODEVICE)
        self.role_entry = role_entry
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            try:
                if interface is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
                sock.bind((address, port))
            except OSError as exc:
                sock.close()
                raise ConfigError(f"cannot bind UDP {address}:{port}: {exc}") from exc
            enlarge_receive_buffer(sock)
        self._sock = sock
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]    # the real one when asked for port 0
        self.address = address
        self.name = name or f"udp-{port}"
        self._ident = 0

    def receive(self) -> list[bytes]:
        return self._batch(self._read_one)

    def _read_one(self) -> bytes:
        data, anc, _flags, src = self._sock.recvmsg(RECV_SIZE, socket.CMSG_SPACE(12))
        local = self.address
        for level, kind, value in anc:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
                _ifindex, _spec_dst, header_dst = _PKTINFO.unpack_from(value)
                local = socket.inet_ntoa(header_dst)
        self._ident = (self._ident + 1) & 0xFFFF
        return packet.build_udp_packet(socket.inet_aton(src[0]), socket.inet_aton(local), src[1],
                                       self.port, data, ttl=REBUILT_TTL,
                                       identification=self._ident,
                                       with_checksum=self.udp_checksum)


class FakeNet:
    """In-memory net side for tests: ``inject()`` packets to be received, ``sent`` collects.
    ``role_entry="receive_siu"``: a GW's inside SIU socket."""

    def __init__(self, name: str = "fakenet", role_entry: str = "receive_from_net"):
        self.name = name
        self.role_entry = role_entry
        self.sent: list[tuple[bytes, str | None]] = []
        self._queue: collections.deque[bytes] = collections.deque()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)

    def inject(self, packet: bytes) -> None:
        self._queue.append(bytes(packet))
        self._w.send(b"\0")

    def fileno(self) -> int:
        return self._r.fileno()

    def receive(self) -> list[bytes]:
        out = []
        while self._queue:
            out.append(self._queue.popleft())
        try:
            self._r.recv(4096)
        except BlockingIOError:
            pass
        return out

    def send(self, packet: bytes, interface: str | None = None) -> bool:
        self.sent.append((bytes(packet), interface))
        return True

    def send_batch(self, packets: list[bytes], interface: str | None = None) -> list[bool]:
        for pkt in packets:
            self.sent.append((bytes(pkt), interface))
        return [True] * len(packets)

    def close(self) -> None:
        self._r.close()
        self._w.close()
