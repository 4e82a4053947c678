"""ESP header and trailer (RFC 4303 §2): construct specifications plus struct fast paths.

The header is SPI (§2.1) and sequence number (§2.2); the trailer, inside the encrypted part,
is padding (§2.4), pad length (§2.5) and next header (§2.6).  ``mipsec.ipsec.sa`` reads and
writes these with ``struct`` at the offsets below; ``tests/vectors/test_wire_ipv4.py`` checks that the
construct definitions and the struct paths agree on random inputs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import construct as c

from mipsec.constants import IPPROTO_ESP, IPPROTO_UDP, NAT_T_PORT
from mipsec.drops import DropReason
from mipsec.errors import ParseError

# --- named offsets ---------------------------------------------------------------------------
OFF_SPI = 0                 # RFC 4303 §2.1
OFF_SEQUENCE = 4            # RFC 4303 §2.2
ESP_HEADER_BYTES = 8
TRAILER_BYTES = 2           # pad length + next header (§2.5, §2.6)
DEFAULT_PADDING = bytes(range(1, 256))  # §2.4: 1, 2, 3, ... unless the algorithm says otherwise

# --- struct fast paths -----------------------------------------------------------------------
ESP_HEADER_STRUCT = struct.Struct("!II")
pack_esp_header = ESP_HEADER_STRUCT.pack
unpack_esp_header = ESP_HEADER_STRUCT.unpack_from

# --- construct specifications ----------------------------------------------------------------
ESP_HEADER = c.Struct(
    "spi" / c.Int32ub,               # §2.1
    "sequence" / c.Int32ub,          # §2.2 (low 32 bits when ESN is used)
)
# The trailer is read from its end (the pad length sits after the padding), so the construct
# form describes the last two bytes; the padding in front of them is the rule of §2.4
# (``build_trailer`` / ``parse_trailer``).
ESP_TRAILER_TAIL = c.Struct(
    "pad_length" / c.Int8ub,         # §2.5
    "next_header" / c.Int8ub,        # §2.6
)


@dataclass(frozen=True)
class EspHeader:
    spi: int
    sequence: int


def build_esp_header(header: EspHeader) -> bytes:
    built: bytes = ESP_HEADER.build(dict(spi=header.spi, sequence=header.sequence))
    return built


def parse_esp_header(data: bytes) -> EspHeader:
    if len(data) < ESP_HEADER_BYTES:
        raise ParseError("shorter than an ESP header", DropReason.TRUNCATED)
    h = ESP_HEADER.parse(data[:ESP_HEADER_BYTES])
    return EspHeader(h.spi, h.sequence)


def esp_spi_of(packet: bytes) -> int | None:
    """The SPI of the ESP packet an IPv4 packet carries, raw (RFC 4303 §2.1) or in a UDP datagram
    to port 4500 (RFC 3948 §2.1); None for anything else, among it IKE on port 4500 (its non-ESP
    marker reads as SPI 0, §2.2), a NAT keepalive (§2.3) and a packet too short for an SPI.  The
    project's one port-4500 classifier of ESP; no check beyond the SPI's place (the SA does it)."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) << 2
    if packet[9] == IPPROTO_ESP and len(packet) >= ihl + 4:
        return int.from_bytes(packet[ihl:ihl + 4], "big")
    if (packet[9] == IPPROTO_UDP and len(packet) >= ihl + 12
            and int.from_bytes(packet[ihl + 2:ihl + 4], "big") == NAT_T_PORT):
        return int.from_bytes(packet[ihl + 8:ihl + 12], "big") or None
    return None


def build_trailer(payload_length: int, align: int, next_header: int) -> bytes:
    """Padding 1, 2, 3 ... + pad length + next header so that payload + trailer is a multiple
    of ``align`` (RFC 4303 §2.4: at least 4, the cipher block size for CBC)."""
    pad = -(payload_length + TRAILER_BYTES) % align
    tail: bytes = ESP_TRAILER_TAIL.build(dict(pad_length=pad, next_header=next_header))
    return DEFAULT_PADDING[:pad] + tail


def parse_trailer(plaintext: bytes) -> tuple[bytes, int]:
    """(payload, next header) of a decrypted ESP payload; checks the padding bytes (§2.4)."""
    if len(plaintext) < TRAILER_BYTES:
        raise ParseError("shorter than the ESP trailer", DropReason.TRUNCATED)
    tail = ESP_TRAILER_TAIL.parse(plaintext[-TRAILER_BYTES:])
    end = len(plaintext) - TRAILER_BYTES - tail.pad_length
    if end < 0 or plaintext[end:-TRAILER_BYTES] != DEFAULT_PADDING[:tail.pad_length]:
        raise ParseError("ESP padding is not 1, 2, 3 ...", DropReason.BAD_PADDING)
    return plaintext[:end], tail.next_header
