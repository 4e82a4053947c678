"""Batched datagram I/O: ``sendmmsg(2)`` / ``recvmmsg(2)`` through ctypes on Linux, with a
portable fallback (one ``sendto`` / ``recv`` per packet) that behaves the same.

``MultiSender(sock)``: ``send_batch([(packet, (addr, port)), ...]) -> list[bool]`` sends in one
system call per up to ``MAX_BATCH`` packets; a packet the kernel refuses (no route, ENOBUFS ...)
is reported False, and the batch goes on with the next one, exactly like one ``sendto`` per
packet (sendmmsg stops at the first failure: the rest is sent again from there).

``MultiReceiver(sock, size)``: ``receive(n) -> list[bytes]`` returns up to ``n`` queued
datagrams in one system call (none queued: an empty list; an error other than EAGAIN / EINTR
raises ``OSError`` like ``recv``).  ``available()`` says whether the ctypes path works here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import socket
import struct
import sys
from typing import Any

MAX_BATCH = 64
MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0x20)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_MMSG_SIZE = ctypes.sizeof(_Mmsghdr)
_libc: Any = None


def _load() -> Any:
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            _libc = False
            return _libc
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
            libc.recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint,
                                      ctypes.c_int, ctypes.c_void_p]
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc


def available() -> bool:
    return bool(_load())


def _sockaddr_in(addr: str, port: int) -> ctypes.Array:
    # struct sockaddr_in: family (host order), port (network order), address, 8 bytes of zero
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(addr)
    return ctypes.create_string_buffer(raw + b"\0" * 8, 16)


class MultiSender:
    """Batched sends on one datagram or raw socket (see the module doc)."""

    def __init__(self, sock: socket.socket, use_mmsg: bool | None = None):
        self.sock = sock
        # libc (ctypes.CDLL: its functions are untyped) or False: one send / recv at a time
        self._libc: Any = _load() if use_mmsg is None or use_mmsg else False
        if use_mmsg and not self._libc:
            raise OSError("sendmmsg is not available here")
        self._names: dict[tuple[str, int], ctypes.Array] = {}
        if self._libc:
            self._iov = (_Iovec * MAX_BATCH)()
            self._msgs = (_Mmsghdr * MAX_BATCH)()
            for i in range(MAX_BATCH):
                hdr = self._msgs[i].msg_hdr
                hdr.msg_iov = ctypes.pointer(self._iov[i])
                hdr.msg_iovlen = 1
                hdr.msg_namelen = 16

    def send_batch(self, items: list[tuple[bytes, tuple[str, int]]]) -> list[bool]:
        if not self._libc:
            return [self._send_one(p, d) for p, d in items]
        out: list[bool] = []
        for start in range(0, len(items), MAX_BATCH):
            out += self._send_chunk(items[start:start + MAX_BATCH])
        return out

    def _send_one(self, packet: bytes, dst: tuple[str, int]) -> bool:
        try:
            self.sock.sendto(packet, dst)
        except OSError:
            return False
        return True

    def _send_chunk(self, chunk: list[tuple[bytes, tuple[str, int]]]) -> list[bool]:
        iov, msgs, names = self._iov, self._msgs, self._names
        keep = []                                 # the buffers must live until the call returns
        for i, (packet, dst) in enumerate(chunk):
            buf = ctypes.c_char_p(packet)
            keep.append(buf)
            iov[i].iov_base = ctypes.cast(buf, ctypes.c_void_p)
            iov[i].iov_len = len(packet)
            name = names.get(dst)
            if name is None:
                if len(names) > 4096:
                    names.clear()
                name = names[dst] = _sockaddr_in(*dst)
            msgs[i].msg_hdr.msg_name = ctypes.addressof(name)
        results: list[bool] = []
        fd = self.sock.fileno()
        base = ctypes.addressof(msgs)
        done = 0
        n = len(chunk)
        while done < n:
            sent = self._libc.sendmmsg(fd, base + done * _MMSG_SIZE, n - done, 0)
            if sent < 0:
                err = ctypes.get_errno()
                if err == _errno.EINTR:
                    continue
                results.append(False)            # this packet failed: go on with the next
                done += 1
                continue
            results += [True] * sent
            done += sent
        del keep
        return results


class MultiReceiver:
    """Batched non-blocking receives on one socket (see the module doc)."""

    def __init__(self, sock: socket.socket, size: int = 65535, batch: int = MAX_BATCH,
                 use_mmsg: bool | None = None):
        self.sock = sock
        self.size = size
        self.batch = batch
        # libc (ctypes.CDLL: its functions are untyped) or False: one send / recv at a time
        self._libc: Any = _load() if use_mmsg is None or use_mmsg else False
        if use_mmsg and not self._libc:
            raise OSError("recvmmsg is not available here")
        if self._libc:
            self._bufs = [ctypes.create_string_buffer(size) for _ in range(batch)]
            self._addrs = [ctypes.addressof(b) for b in self._bufs]
            self._iov = (_Iovec * batch)()
            self._msgs = (_Mmsghdr * batch)()
            for i in range(batch):
                self._iov[i].iov_base = ctypes.addressof(self._bufs[i])
                self._iov[i].iov_len = size
                self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iov[i])
                self._msgs[i].msg_hdr.msg_iovlen = 1
            self._base = ctypes.addressof(self._msgs)

    def receive(self, n: int | None = None) -> list[bytes]:
        n = self.batch if n is None else min(n, self.batch)
        if not self._libc:
            out = []
            for _ in range(n):
                try:
                    out.append(self.sock.recv(self.size))
                except (BlockingIOError, InterruptedError):
                    break
            return out
        got = self._libc.recvmmsg(self.sock.fileno(), self._base, n, MSG_DONTWAIT, None)
        if got < 0:
            err = ctypes.get_errno()
            if err in (_errno.EAGAIN, _errno.EWOULDBLOCK, _errno.EINTR):
                return []
            raise OSError(err, os.strerror(err))
        msgs, addrs, string_at = self._msgs, self._addrs, ctypes.string_at
        return [string_at(addrs[i], msgs[i].msg_len) for i in range(got)]
