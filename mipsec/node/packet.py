"""Small per-packet helpers the roles share: peek at an IPv4 header, build and parse UDP packets.

``struct`` at the named offsets of ``mipsec.wire.ipv4`` (style.md item 5); every malformed input
raises ``ParseError`` with a specific ``DropReason`` (roles catch it and count).
"""

from __future__ import annotations

import struct

from mipsec.constants import IPPROTO_ESP as IPPROTO_ESP
from mipsec.constants import IPPROTO_IPIP as IPPROTO_IPIP
from mipsec.constants import IPPROTO_UDP as IPPROTO_UDP
from mipsec.constants import NAT_T_PORT as NAT_T_PORT
from mipsec.drops import DropReason
from mipsec.errors import ParseError
from mipsec.wire.ipv4 import (
    IPV4_MIN_HEADER_BYTES,
    UDP_HEADER_BYTES,
    VERSION_IHL_20,
    addr_to_bytes,
    bytes_to_addr,
    check_ipv4,
    checksum,
    pack_ipv4,
    udp_checksum_packed,
)

_UDP = struct.Struct("!HHHH")
_ZERO = b"\0\0\0\0"


# the short names the roles use for wire.ipv4's converters
a2b = addr_to_bytes
b2a = bytes_to_addr


def peek_ipv4(packet: bytes, *, verify_checksum: bool = False) -> tuple[int, bytes, bytes, int]:
    """(protocol, source, destination, header length) of a whole IPv4 packet.

    Raises ParseError: TRUNCATED, BAD_IP_VERSION, BAD_IP_HEADER_LENGTH, BAD_IP_TOTAL_LENGTH,
    BAD_IP_CHECKSUM (only when asked), IP_FRAGMENT (RFC 791: we never reassemble).
    """
    ihl, proto = check_ipv4(packet, verify_checksum=verify_checksum)
    return proto, packet[12:16], packet[16:20], ihl


def build_ipv4_packet(src: bytes, dst: bytes, protocol: int, payload: bytes, *,
                      ttl: int = 64, identification: int = 0) -> bytes:
    """An IPv4 packet without options (RFC 791 §3.1), header checksum filled in."""
    header = pack_ipv4(VERSION_IHL_20, 0, IPV4_MIN_HEADER_BYTES + len(payload),
                       identification & 0xFFFF, 0, ttl, protocol, 0, src, dst)
    csum = checksum(header)
    return header[:10] + csum.to_bytes(2, "big") + header[12:] + payload


def build_udp_packet(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, *,
                     with_checksum: bool = True, ttl: int = 64, identification: int = 0) -> bytes:
    """IPv4 + UDP; the UDP checksum (RFC 768) is optional over IPv4 and skipped for bulk data."""
    length = UDP_HEADER_BYTES + len(payload)
    datagram = _UDP.pack(sport, dport, length, 0) + payload
    if with_checksum:
        csum = udp_checksum_packed(src, dst, datagram)
        datagram = datagram[:6] + csum.to_bytes(2, "big") + datagram[8:]
    return build_ipv4_packet(src, dst, IPPROTO_UDP, datagram, ttl=ttl,
                             identification=identification)


def parse_udp_packet(packet: bytes, *, verify_checksum: bool = True
                     ) -> tuple[bytes, bytes, int, int, bytes]:
    """(source, destination, source port, destination port, payload) of an IPv4/UDP packet.

    Raises ParseError (the reasons of ``peek_ipv4``, WRONG_PROTOCOL, TRUNCATED, BAD_UDP_LENGTH,
    MALFORMED for a bad UDP checksum).
    """
    proto, src, dst, ihl = peek_ipv4(packet, verify_checksum=verify_checksum)
    if proto != IPPROTO_UDP:
        raise ParseError(f"protocol {proto}, not UDP", DropReason.WRONG_PROTOCOL)
    if len(packet) < ihl + UDP_HEADER_BYTES:
        raise ParseError("no UDP header", DropReason.TRUNCATED)
    sport, dport, length, csum = _UDP.unpack_from(packet, ihl)
    if length != len(packet) - ihl:
        raise ParseError(f"UDP length {length}", DropReason.BAD_UDP_LENGTH)
    if verify_checksum and csum:
        datagram = packet[ihl:ihl + 6] + b"\0\0" + packet[ihl + 8:]
        if udp_checksum_packed(src, dst, datagram) != csum:
            raise ParseError("UDP checksum", DropReason.MALFORMED)
    return src, dst, sport, dport, packet[ihl + UDP_HEADER_BYTES:]


def udp_ports(packet: bytes, ihl: int) -> tuple[int, int] | None:
    """(source port, destination port) if the packet holds a UDP header, else None."""
    if len(packet) < ihl + UDP_HEADER_BYTES:
        return None
    return _UDP.unpack_from(packet, ihl)[:2]


def in_prefix(address: bytes, network: int, mask: int) -> bool:
    return int.from_bytes(address, "big") & mask == network


def parse_prefix(prefix: str) -> tuple[int, int]:
    """'10.1.0.0/24' -> (network int, mask int)."""
    addr, _, plen = prefix.partition("/")
    bits = int(plen) if plen else 32
    mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    return int.from_bytes(a2b(addr), "big") & mask, mask
