"""IPv4 (RFC 791) and UDP (RFC 768) headers: construct specifications plus struct fast paths.

The construct definitions (``IPV4_HEADER``, ``UDP_HEADER``) are the specification and serve the
control plane and tests; the per-packet ESP path uses ``struct`` at the named offsets below.
``tests/vectors/test_wire_ipv4.py`` checks on random inputs that both read and write the same bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import construct as c

from mipsec.drops import DropReason
from mipsec.errors import ParseError

# --- named offsets (RFC 791 §3.1 figure 4, RFC 768) --------------------------------------------
OFF_VERSION_IHL = 0
OFF_TOS = 1
OFF_TOTAL_LENGTH = 2
OFF_IDENTIFICATION = 4
OFF_FLAGS_FRAGMENT = 6
OFF_TTL = 8
OFF_PROTOCOL = 9
OFF_CHECKSUM = 10
OFF_SOURCE = 12
OFF_DESTINATION = 16
IPV4_MIN_HEADER_BYTES = 20
UDP_HEADER_BYTES = 8
FLAG_DF = 0x4000          # RFC 791: don't fragment
FLAG_MF = 0x2000          # RFC 791: more fragments
FRAGMENT_MASK = 0x3FFF    # MF + fragment offset: non-zero means a fragment
VERSION_IHL_20 = 0x45     # version 4, IHL 5 (no options)

# --- struct fast paths ------------------------------------------------------------------------
IPV4_FIXED = struct.Struct("!BBHHHBBH4s4s")   # the 20 fixed bytes
IPV4_PREFIX = struct.Struct("!BBHHHBBH")      # up to and including the checksum
UDP = struct.Struct("!HHHH")                  # source port, destination port, length, checksum
unpack_ipv4_prefix = IPV4_PREFIX.unpack_from
pack_ipv4 = IPV4_FIXED.pack
unpack_udp = UDP.unpack_from
pack_udp = UDP.pack

# --- construct specifications -----------------------------------------------------------------
IPV4_HEADER = c.Struct(
    "version" / c.Const(4, c.BitsInteger(4)) * "RFC 791: version 4",
    "ihl" / c.BitsInteger(4),
    "tos" / c.BitsInteger(8),
    "total_length" / c.BitsInteger(16),
    "identification" / c.BitsInteger(16),
    "reserved" / c.BitsInteger(1),
    "dont_fragment" / c.Flag,
    "more_fragments" / c.Flag,
    "fragment_offset" / c.BitsInteger(13),
    "ttl" / c.BitsInteger(8),
    "protocol" / c.BitsInteger(8),
    "checksum" / c.BitsInteger(16),
    "source" / c.BitsInteger(32),
    "destination" / c.BitsInteger(32),
)
IPV4_HEADER = c.Bitwise(IPV4_HEADER)
IPV4_WITH_OPTIONS = c.Struct(
    "header" / IPV4_HEADER,
    "options" / c.Bytes(lambda ctx: ctx.header.ihl * 4 - IPV4_MIN_HEADER_BYTES),
)
UDP_HEADER = c.Struct(
    "source_port" / c.Int16ub,
    "destination_port" / c.Int16ub,
    "length" / c.Int16ub,
    "checksum" / c.Int16ub,
)


# --- RFC 1071 checksum ------------------------------------------------------------------------
def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): one's complement of the one's complement sum.

    The one's complement sum of 16-bit words equals the big-endian integer of the data modulo
    0xFFFF (because 2**16 == 1 mod 0xFFFF; RFC 1071 §2(A)-(C) for the properties used), with
    the sum of non-zero data represented as 0xFFFF rather than 0.  Returns the value to store;
    over a header that already carries a correct checksum it returns 0.
    """
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    value = int.from_bytes(data, "big")
    rest = value % 0xFFFF
    if rest:
        return 0xFFFF - rest
    return 0 if value else 0xFFFF


def checksum_reference(data: bytes) -> int:
    """RFC 1071 §4.1 word-by-word with end-around carry: the slow reference for tests."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --- addresses ---------------------------------------------------------------------------------
def addr_to_bytes(address: str) -> bytes:
    """'10.1.0.1' -> b'\\x0a\\x01\\x00\\x01'; raises ValueError on anything else."""
    parts = address.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise ValueError(f"not a dotted-quad IPv4 address: {address!r}")
    values = [int(p) for p in parts]
    if any(v > 255 for v in values):
        raise ValueError(f"not a dotted-quad IPv4 address: {address!r}")
    return bytes(values)


def bytes_to_addr(raw: bytes) -> str:
    if len(raw) != 4:
        raise ValueError(f"an IPv4 address has 4 bytes, not {len(raw)}")
    return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"


def addr_to_int(address: str) -> int:
    return int.from_bytes(addr_to_bytes(address), "big")


def int_to_addr(value: int) -> str:
    return bytes_to_addr(value.to_bytes(4, "big"))


# --- pure build / parse -----------------------------------------------------------------------
@dataclass(frozen=True)
class Ipv4Header:
    source: str
    destination: str
    protocol: int
    total_length: int = 0          # 0 = computed by build_ipv4 from the payload
    tos: int = 0
    identification: int = 0
    dont_fragment: bool = False
    more_fragments: bool = False
    fragment_offset: int = 0
    ttl: int = 64
    options: bytes = b""
    checksum: int = 0              # as parsed; build_ipv4 computes it


@dataclass(frozen=True)
class UdpHeader:
    source_port: int
    destination_port: int
    length: int = 0                # 0 = computed by build_udp
    checksum: int = 0


def build_ipv4(header: Ipv4Header, payload: bytes = b"") -> bytes:
    """The header (with its checksum, RFC 791 §3.1) followed by ``payload``."""
    if len(header.options) % 4:
        raise ValueError("IPv4 options must be padded to a multiple of 4 bytes")
    ihl = (IPV4_MIN_HEADER_BYTES + len(header.options)) // 4
    total = header.total_length or ihl * 4 + len(payload)
    fields = dict(
        ihl=ihl, tos=header.tos, total_length=total, identification=header.identification,
        reserved=0, dont_fragment=header.dont_fragment, more_fragments=header.more_fragments,
        fragment_offset=header.fragment_offset, ttl=header.ttl, protocol=header.protocol,
        checksum=0, source=addr_to_int(header.source),
        destination=addr_to_int(header.destination),
    )
    raw: bytes = IPV4_HEADER.build(fields) + header.options
    value = checksum(raw)
    return raw[:OFF_CHECKSUM] + value.to_bytes(2, "big") + raw[OFF_CHECKSUM + 2:] + payload


def check_ipv4(packet: bytes, *, verify_checksum: bool = True, what: str = "IPv4 packet"
               ) -> tuple[int, int]:
    """(header length, protocol) of a whole, unfragmented IPv4 packet: the checks every receiver
    of a raw packet makes before looking inside (RFC 791 §3.1; we never reassemble).

    Raises ParseError: TRUNCATED, BAD_IP_VERSION, BAD_IP_HEADER_LENGTH, BAD_IP_TOTAL_LENGTH,
    BAD_IP_CHECKSUM (only when asked), IP_FRAGMENT.  ``what`` names the packet in the message.
    """
    n = len(packet)
    if n < IPV4_MIN_HEADER_BYTES:
        raise ParseError(f"{what} of {n} bytes", DropReason.TRUNCATED)
    vihl, _tos, total, _ident, frag, _ttl, proto, _csum = unpack_ipv4_prefix(packet)
    if vihl >> 4 != 4:
        raise ParseError(f"{what}: not IPv4", DropReason.BAD_IP_VERSION)
    ihl = (vihl & 0x0F) << 2
    if ihl < IPV4_MIN_HEADER_BYTES or ihl > n:
        raise ParseError(f"{what}: IHL {ihl}", DropReason.BAD_IP_HEADER_LENGTH)
    if total != n:
        raise ParseError(f"{what}: total length {total} != {n}", DropReason.BAD_IP_TOTAL_LENGTH)
    if verify_checksum and checksum(packet[:ihl]) != 0:
        raise ParseError(f"{what}: header checksum", DropReason.BAD_IP_CHECKSUM)
    if frag & FRAGMENT_MASK:
        raise ParseError(f"{what}: a fragment", DropReason.IP_FRAGMENT)
    return ihl, proto


def parse_ipv4(packet: bytes, *, verify_checksum: bool = True) -> tuple[Ipv4Header, bytes]:
    """(header, payload); raises ParseError with the DropReason for every malformed input."""
    if len(packet) < IPV4_MIN_HEADER_BYTES:
        raise ParseError("shorter than an IPv4 header", DropReason.TRUNCATED)
    if packet[0] >> 4 != 4:
        raise ParseError("not IPv4", DropReason.BAD_IP_VERSION)
    ihl = (packet[0] & 0x0F) * 4
    if ihl < IPV4_MIN_HEADER_BYTES or ihl > len(packet):
        raise ParseError(f"IHL {ihl} bytes", DropReason.BAD_IP_HEADER_LENGTH)
    parsed = IPV4_WITH_OPTIONS.parse(packet[:ihl])
    h = parsed.header
    if h.total_length != len(packet):
        raise ParseError(f"total length {h.total_length} != {len(packet)}",
                         DropReason.BAD_IP_TOTAL_LENGTH)
    if verify_checksum and checksum(packet[:ihl]) != 0:
        raise ParseError("header checksum", DropReason.BAD_IP_CHECKSUM)
    header = Ipv4Header(
        source=int_to_addr(h.source), destination=int_to_addr(h.destination),
        protocol=h.protocol, total_length=h.total_length, tos=h.tos,
        identification=h.identification, dont_fragment=h.dont_fragment,
        more_fragments=h.more_fragments, fragment_offset=h.fragment_offset, ttl=h.ttl,
        options=bytes(parsed.options), checksum=h.checksum,
    )
    return header, packet[ihl:]


def build_udp(header: UdpHeader, payload: bytes = b"") -> bytes:
    length = header.length or UDP_HEADER_BYTES + len(payload)
    head: bytes = UDP_HEADER.build(dict(source_port=header.source_port,
                                        destination_port=header.destination_port,
                                        length=length, checksum=header.checksum))
    return head + payload


def parse_udp(datagram: bytes) -> tuple[UdpHeader, bytes]:
    """(header, payload) of a UDP datagram (the IPv4 payload); checks the length field."""
    if len(datagram) < UDP_HEADER_BYTES:
        raise ParseError("shorter than a UDP header", DropReason.TRUNCATED)
    h = UDP_HEADER.parse(datagram)
    if h.length != len(datagram):
        raise ParseError(f"UDP length {h.length} != {len(datagram)}", DropReason.BAD_UDP_LENGTH)
    return (UdpHeader(h.source_port, h.destination_port, h.length, h.checksum),
            datagram[UDP_HEADER_BYTES:])


def udp_checksum(source: str, destination: str, datagram: bytes) -> int:
    """RFC 768 checksum over the pseudo header and the datagram (whose checksum field is 0)."""
    return udp_checksum_packed(addr_to_bytes(source), addr_to_bytes(destination), datagram)


def udp_checksum_packed(source: bytes, destination: bytes, datagram: bytes) -> int:
    """``udp_checksum`` with the addresses as 4 bytes each (the per-packet form)."""
    value = checksum(source + destination + struct.pack("!BBH", 0, 17, len(datagram)) + datagram)
    return value or 0xFFFF  # RFC 768: a computed 0 is sent as all ones
