"""TUN devices: the Linux one (python-pytun) and an in-memory fake with the same protocol.

A role's "tun" side (docs/design.md, "What net and tun mean") is a layer-3 TUN device opened with
``IFF_TUN | IFF_NO_PI``: every ``read()`` returns one whole IPv4 packet the local IP stack routed
into the device, every ``write()`` hands one whole IPv4 packet to the local IP stack.  Both
implementations are non-blocking and expose ``fileno()`` so the event loop can select on them.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
from typing import Protocol

from mipsec.errors import ConfigError

log = logging.getLogger("mipsec.io.tun")

TUN_READ_SIZE = 65535          # one read returns at most one packet; IPv4 total length <= 65535
DEFAULT_MTU = 1400             # leaves room for ESP + outer IPv4 (+ IP-in-IP) inside a 1500 link


class TunDevice(Protocol):
    """What the event loop needs from a TUN device."""

    name: str

    def fileno(self) -> int: ...

    def read(self) -> bytes | None:
        """One packet, or None when nothing is queued (non-blocking)."""

    def write(self, packet: bytes) -> None: ...

    def close(self) -> None: ...


class LinuxTun:
    """A Linux TUN device (``/dev/net/tun``) through python-pytun.

    The device is created (non-persistent: it disappears when the file descriptor is closed,
    which is how a daemon's shutdown, or its death, removes it), given ``mtu`` and set up.
    Addresses and routes are the caller's business (``mipsec.io.netlink``).
    """

    def __init__(self, name: str, mtu: int = DEFAULT_MTU):
        import pytun  # imported here so the fake works where python-pytun is missing

        if len(name.encode()) > 15:
            raise ConfigError(f"TUN device name {name!r} is longer than 15 bytes (IFNAMSIZ)")
        try:
            self._dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        except pytun.Error as exc:
            raise ConfigError(f"cannot create TUN device {name!r}: {exc} (needs root or "
                              f"CAP_NET_ADMIN and /dev/net/tun)") from exc
        self.name = self._dev.name
        self._dev.mtu = mtu
        # An IPv4-only device: without this the kernel writes IPv6 router solicitations and MLD
        # reports into it, which the role would only count as drops.
        try:
            with open(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "w") as f:
                f.write("1\n")
        except OSError:
            pass
        self._dev.up()
        self._fd = self._dev.fileno()
        os.set_blocking(self._fd, False)
        self._closed = False
        self.write_errors = 0
        self.read_errors = 0
        self._logged_errnos: set[int | None] = set()

    @property
    def mtu(self) -> int:
        return self._dev.mtu

    def fileno(self) -> int:
        return self._fd

    def read(self) -> bytes | None:
        try:
            return os.read(self._fd, TUN_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            # A device going down under us (EIO, EBADFD): counted and logged once per error
            # code, like the socket receivers; the loop goes on and tries again next time.
            self.read_errors += 1
            if exc.errno not in self._logged_errnos:
                self._logged_errnos.add(exc.errno)
                log.warning("TUN %s: read failed: %s (counted as tun_read_errors)", self.name, exc)
            return None

    def write(self, packet: bytes) -> None:
        try:
            os.write(self._fd, packet)
        except OSError:
            # Queue full (EAGAIN), device going down (EIO), a packet the kernel refuses (EINVAL):
            # the packet is lost, as on a router; counted, never fatal.
            self.write_errors += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._dev.close()


class MultiQueueTun:
    """A multi-queue TUN device (``IFF_MULTI_QUEUE``): ``queues`` file descriptors on one
    device; the kernel spreads the packets routed into it over the queues by a flow hash.  A
    GW with worker processes gives each worker one queue (``fds``) and reads none itself.
    Closing the last queue removes the device."""

    def __init__(self, name: str, mtu: int = DEFAULT_MTU, queues: int = 2):
        import pytun

        if len(name.encode()) > 15:
            raise ConfigError(f"TUN device name {name!r} is longer than 15 bytes (IFNAMSIZ)")
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_MULTI_QUEUE
        self._devs = []
        try:
            for _ in range(queues):
                self._devs.append(pytun.TunTapDevice(name=name, flags=flags))
        except pytun.Error as exc:
            self.close()
            raise ConfigError(f"cannot create multi-queue TUN device {name!r}: {exc} (needs "
                              f"root or CAP_NET_ADMIN and /dev/net/tun)") from exc
        self.name = self._devs[0].name
        self._devs[0].mtu = mtu
        try:
            with open(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "w") as f:
                f.write("1\n")
        except OSError:
            pass
        self._devs[0].up()
        self.write_errors = 0
        self.read_errors = 0

    @property
    def mtu(self) -> int:
        return self._devs[0].mtu

    def fds(self) -> list[int]:
        return [d.fileno() for d in self._devs]

    def close(self) -> None:
        for dev in self._devs:
            dev.close()
        self._devs = []


class FdTun(LinuxTun):
    """One queue of a TUN device opened by another process (a GW worker's, inherited as
    ``fd``): reads and writes as ``LinuxTun``; closing closes the descriptor."""

    def __init__(self, fd: int, name: str):      # (no pytun object: the fd is given)
        self.name = name
        self._fd = fd
        os.set_blocking(fd, False)
        self._closed = False
        self.write_errors = 0
        self.read_errors = 0
        self._logged_errnos: set[int | None] = set()

    @property
    def mtu(self) -> int:
        return 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


class FakeTun:
    """An in-memory TUN device for tests.

    ``inject(packet)`` queues a packet as if the local stack had routed it into the device (the
    loop then reads it); ``written`` collects what the daemon wrote to the local stack.  A
    socketpair makes ``fileno()`` readable exactly while packets are queued.
    """

    def __init__(self, name: str = "faketun0", mtu: int = DEFAULT_MTU):
        self.name = name
        self.mtu = mtu
        self.written: list[bytes] = []
        self._queue: collections.deque[bytes] = collections.deque()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self.closed = False

    def inject(self, packet: bytes) -> None:
        self._queue.append(bytes(packet))
        self._w.send(b"\0")

    def fileno(self) -> int:
        return self._r.fileno()

    def read(self) -> bytes | None:
        if not self._queue:
            return None
        try:
            self._r.recv(1)
        except BlockingIOError:
            pass
        return self._queue.popleft()

    def write(self, packet: bytes) -> None:
        self.written.append(bytes(packet))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._r.close()
            self._w.close()
