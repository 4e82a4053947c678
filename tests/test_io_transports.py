"""Net-side transports on loopback: rebuilt UDP packets are valid IPv4+UDP with the right
addresses; raw sockets carry whole packets (root: required in CI, skipped elsewhere)."""

from __future__ import annotations

import os
import select
import socket

from scapy.layers.inet import IP, UDP

from mipsec.io.transports import (IPPROTO_ESP, RawReceiver, RawSender, UdpReceiver,
                                  build_udp_packet)

import needs


def _need_root():
    needs.need(os.geteuid() != 0 and "raw sockets need root", "raw-socket tests need root in CI")


def test_build_udp_packet_checks_out_with_scapy():
    pkt = build_udp_packet("10.1.0.2", 434, "172.16.1.10", 434, b"\x03" + b"x" * 23, ident=7)
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
