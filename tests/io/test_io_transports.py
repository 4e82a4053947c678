"""Net-side transports on loopback: rebuilt UDP packets are valid IPv4+UDP with the right
addresses; raw sockets carry whole packets (root: required in CI, skipped elsewhere)."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket

import pytest
from scapy.layers.inet import IP, UDP

import needs
from mipsec.constants import IPPROTO_ESP
from mipsec.io.transports import RawReceiver, RawSender, UdpReceiver
from mipsec.node.packet import a2b, build_udp_packet


def _need_root():
    needs.need(os.geteuid() != 0 and "raw sockets need root", "raw-socket tests need root in CI")


def test_build_udp_packet_checks_out_with_scapy():
    pkt = build_udp_packet(a2b("10.1.0.2"), a2b("172.16.1.10"), 434, 434, b"\x03" + b"x" * 23,
                           identification=7)
    parsed = IP(pkt)
    assert parsed.src == "10.1.0.2" and parsed.dst == "172.16.1.10" and parsed.id == 7
    assert parsed[UDP].sport == 434 and parsed[UDP].dport == 434
    # Recompute both checksums with Scapy and compare.
    again = IP(bytes(IP(pkt)))
    del again.chksum
    del again[UDP].chksum
    again = IP(bytes(again))
    assert again.chksum == parsed.chksum and again[UDP].chksum == parsed[UDP].chksum


def test_udp_receiver_rebuilds_ipv4_udp_with_local_address():
    rx = UdpReceiver(0, "127.0.0.1")
    port = rx.port
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    try:
        tx.sendto(b"hello mip", ("127.0.0.1", port))
        assert select.select([rx], [], [], 2.0)[0]
        [pkt] = rx.receive()
        parsed = IP(pkt)
        assert parsed.src == "127.0.0.1" and parsed.dst == "127.0.0.1"
        assert parsed[UDP].sport == tx.getsockname()[1] and parsed[UDP].dport == port
        assert bytes(parsed[UDP].payload) == b"hello mip"
        assert rx.receive() == []
    finally:
        rx.close()
        tx.close()


def test_udp_receiver_can_leave_the_udp_checksum_out():
    rxs = [UdpReceiver(0, "127.0.0.1"), UdpReceiver(0, "127.0.0.1", udp_checksum=False)]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    try:
        got = []
        for rx in rxs:
            tx.sendto(b"\x00\x00\x10\x01esp", ("127.0.0.1", rx.port))
            assert select.select([rx], [], [], 2.0)[0]
            [pkt] = rx.receive()
            got.append(pkt)
        with_sum, without = (IP(p) for p in got)
        assert with_sum[UDP].chksum != 0 and without[UDP].chksum == 0
        assert got[0][:22] == got[1][:22] and got[0][28:] == got[1][28:]    # but the ports
        assert IP(bytes(without)).chksum == without.chksum                   # header still valid
    finally:
        for rx in rxs:
            rx.close()
        tx.close()


def test_raw_esp_round_trip_on_loopback():
    _need_root()
    rx = RawReceiver(IPPROTO_ESP)
    tx = RawSender()
    try:
        esp = IP(src="127.0.0.1", dst="127.0.0.1", proto=50) / (b"\x00\x00\x01\x00" + b"\x00" * 12)
        assert tx.send(bytes(esp))
        assert select.select([rx], [], [], 2.0)[0]
        got = rx.receive()
        assert any(IP(p).proto == 50 and bytes(IP(p).payload)[:4] == b"\x00\x00\x01\x00"
                   for p in got)
        assert not tx.send(b"short")
        assert tx.errors == 1
    finally:
        rx.close()
        tx.close()


class _ScriptedSocket:
    """A fake socket whose reads follow a script: bytes to return, exceptions to raise; then
    EAGAIN.  ``recv`` for the raw receiver, ``recvmsg`` (no IP_PKTINFO) for the UDP one."""

    def __init__(self, script):
        self.script = list(script)

    def _next(self):
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "empty")
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def recv(self, size):
        return self._next()

    def recvmsg(self, size, ancsize):
        return self._next(), [], 0, ("172.16.1.10", 4500)

    def setblocking(self, flag):
        pass

    def getsockname(self):
        return ("172.16.0.1", 4500)

    def fileno(self):
        return -1

    def close(self):
        pass


def _transient():
    return [OSError(errno.ENOBUFS, "No buffer space available"),
            OSError(errno.ECONNREFUSED, "Connection refused"), InterruptedError(errno.EINTR, "")]


@pytest.mark.parametrize("kind", ["raw", "udp"])
def test_a_transient_oserror_is_counted_logged_once_and_the_batch_goes_on(kind, caplog):
    """Both receivers alike: EAGAIN ends the batch, EINTR too (the loop comes back), any other
    OSError is counted, logged once per errno, and the reads go on; receive() never raises."""
    enobufs, refused, eintr = _transient()
    sock = _ScriptedSocket([enobufs, b"one", refused, enobufs, b"two", eintr, b"three"])
    rx = RawReceiver(IPPROTO_ESP, "esp", sock=sock) if kind == "raw" else \
        UdpReceiver(4500, "172.16.0.1", name="esp-udp", sock=sock)
    caplog.set_level(logging.WARNING, logger="mipsec.io.transports")

    def payloads():
        got = rx.receive()
        return got if kind == "raw" else [bytes(IP(p)[UDP].payload) for p in got]
    assert payloads() == [b"one", b"two"] and rx.errors == 3
    assert payloads() == [b"three"]                   # EINTR ended the first batch
    sock.script = [b"four", enobufs, enobufs]
    assert payloads() == [b"four"] and rx.errors == 5
    assert payloads() == [] and rx.errors == 5
    logged = [r.getMessage() for r in caplog.records if r.name == "mipsec.io.transports"]
    assert len(logged) == 2 and all(m.startswith(f"{rx.name}: receive failed") for m in logged)
    assert "No buffer space" in logged[0] and "refused" in logged[1]


def test_receivers_ask_for_a_large_receive_buffer():
    # a daemon not scheduled for a while must find its packets queued, not dropped
    import os
    import socket as socketmod

    from mipsec.constants import RECEIVE_BUFFER_BYTES
    from mipsec.io.transports import UdpReceiver, enlarge_receive_buffer
    with socketmod.socket(socketmod.AF_INET, socketmod.SOCK_DGRAM) as plain:
        default = plain.getsockopt(socketmod.SOL_SOCKET, socketmod.SO_RCVBUF)
    receiver = UdpReceiver(0, "127.0.0.1")
    try:
        granted = receiver._sock.getsockopt(socketmod.SOL_SOCKET, socketmod.SO_RCVBUF)
    finally:
        receiver.close()
    with open("/proc/sys/net/core/rmem_max") as f:
        cap = int(f.read())
    # the kernel doubles what it grants (socket(7)); without CAP_NET_ADMIN, rmem_max caps it
    wanted = RECEIVE_BUFFER_BYTES if os.geteuid() == 0 else min(RECEIVE_BUFFER_BYTES, cap)
    assert granted >= wanted and granted >= default
    with socketmod.socket(socketmod.AF_INET, socketmod.SOCK_DGRAM) as s:
        assert enlarge_receive_buffer(s, 1 << 20) >= min(1 << 20, cap if os.geteuid() else 1 << 20)
