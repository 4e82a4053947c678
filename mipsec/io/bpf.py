"""Classic BPF programs that split the GW's ESP by SPI between processes (Linux, ctypes-free).

A GW that runs its data path in several worker processes must give every packet of one SA to
one process only: the SA's sequence counter and replay window live there and nowhere else.  The
SPI names the SA, so the kernel can do the split before any process wakes up:

* raw ESP (protocol 50): every raw socket gets a copy of every packet, so each worker attaches
  ``esp_shard_filter(workers, index)`` (``SO_ATTACH_FILTER``) to its own raw socket and sees
  only the SPIs with ``spi % workers == index``;
* ESP in UDP (RFC 3948) on port 4500: one socket per process in an ``SO_REUSEPORT`` group and
  ``udp_shard_selector(workers)`` attached to the group (``SO_ATTACH_REUSEPORT_CBPF``): a
  datagram that starts with the non-ESP marker (IKE, RFC 3948 §2.2) or is shorter than an SPI
  (a NAT keepalive, §2.3) goes to the group's first socket (the control process, which runs
  IKE), ESP with SPI ``s`` to socket ``1 + s % workers``.  Sockets are numbered in the order
  they joined the group: the control process binds first, then workers 0, 1, ...

The SPIs a worker allocates (IKE's inbound SPIs for its MNs) must then satisfy
``spi % workers == index`` (``spi_for_worker``).  Programs are built from the opcodes of
``linux/filter.h`` (stable kernel ABI); ``attach`` passes ``struct sock_fprog`` to setsockopt.
"""

from __future__ import annotations

import ctypes
import socket
import struct

from mipsec.ipsec.shard import check_workers, spi_for_worker, worker_of

# linux/filter.h, linux/bpf_common.h: instruction classes, sizes, modes, operations, sources
BPF_LD, BPF_LDX, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x01, 0x04, 0x05, 0x06
BPF_W, BPF_B = 0x00, 0x10
BPF_ABS, BPF_IND, BPF_LEN, BPF_MSH = 0x20, 0x40, 0x80, 0xA0
BPF_ADD, BPF_MOD = 0x00, 0x90
BPF_JEQ, BPF_JGE = 0x10, 0x30
BPF_K, BPF_A = 0x00, 0x10
# asm-generic/socket.h
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_ATTACH_REUSEPORT_CBPF = 51

ACCEPT = 0xFFFFFFFF            # "keep the whole packet"
_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k

Program = list[tuple[int, int, int, int]]

__all__ = ["Program", "attach", "esp_shard_filter", "spi_for_worker", "udp_shard_selector",
           "worker_of"]


_check = check_workers


def esp_shard_filter(workers: int, index: int) -> Program:
    """A socket filter for a raw ESP socket (the packet starts at the IPv4 header): accept
    exactly the packets whose SPI modulo ``workers`` is ``index``.  A packet too short to hold
    an SPI fails the load and is dropped (the kernel runs no further instruction)."""
    _check(workers, index)
    return [
        (BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0),       # X = 4 * (IHL), RFC 791
        (BPF_LD | BPF_W | BPF_IND, 0, 0, 0),        # A = SPI at X (RFC 4303 §2.1)
        (BPF_ALU | BPF_MOD | BPF_K, 0, 0, workers),
        (BPF_JMP | BPF_JEQ | BPF_K, 0, 1, index),
        (BPF_RET | BPF_K, 0, 0, ACCEPT),
        (BPF_RET | BPF_K, 0, 0, 0),
    ]


def udp_shard_selector(workers: int) -> Program:
    """A reuseport selector for UDP 4500 (the program sees the UDP payload): socket 0 for IKE
    (non-ESP marker) and anything shorter than 4 bytes, ``1 + spi % workers`` for ESP."""
    _check(workers)
    return [
        (BPF_LD | BPF_W | BPF_LEN, 0, 0, 0),        # A = payload length
        (BPF_JMP | BPF_JGE | BPF_K, 0, 5, 4),       # shorter than an SPI: to the control
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, 0),        # A = SPI, or 0 = non-ESP marker
        (BPF_JMP | BPF_JEQ | BPF_K, 3, 0, 0),       # marker: to the control
        (BPF_ALU | BPF_MOD | BPF_K, 0, 0, workers),
        (BPF_ALU | BPF_ADD | BPF_K, 0, 0, 1),
        (BPF_RET | BPF_A, 0, 0, 0),                 # socket 1 + SPI % workers
        (BPF_RET | BPF_K, 0, 0, 0),                 # socket 0: the control process
    ]


def attach(sock: socket.socket, program: Program, *, reuseport: bool = False) -> None:
    """Attach ``program`` to ``sock`` (``SO_ATTACH_FILTER``), or, with ``reuseport``, to the
    ``SO_REUSEPORT`` group ``sock`` is bound in (``SO_ATTACH_REUSEPORT_CBPF``).  OSError when
    the kernel refuses it (EINVAL: the program does not verify)."""
    code = b"".join(_INSN.pack(*insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (native layout)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    option = SO_ATTACH_REUSEPORT_CBPF if reuseport else SO_ATTACH_FILTER
    sock.setsockopt(socket.SOL_SOCKET, option, fprog)
    del buffer                  # the kernel copied the program during setsockopt
