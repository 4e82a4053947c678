"""The Security Information Update (SIU) message: HA -> GW, UDP port 4343 (docs/protocol.md).

The patent that describes the handover defines no wire format; this is ours.  All integers are
big-endian.  The layout (52 fixed bytes, the embedded Registration Reply, a 32-byte
HMAC-SHA-256 authenticator over everything before it) is drawn and explained in
docs/protocol.md; ``SIU_HEADER`` below is its construct specification.

This module only frames and unframes.  Authentication and replay protection are in
``mipsec.mip.siu``: never act on a ``Siu`` returned by ``parse_siu`` alone.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from construct import Bytes, Const, Int8ub, Int16ub, Int32ub, Int64ub, Struct

from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.wire.ipv4 import bytes_to_addr

SIU_VERSION = 2                     # 2: the Gateway Epoch field (docs/protocol.md §2.3)
SIU_FIXED_BYTES = 52                # header before the embedded Registration Reply
SIU_AUTHENTICATOR_BYTES = 32        # full HMAC-SHA-256 output (docs/protocol.md, "Security")
SIU_MIN_BYTES = SIU_FIXED_BYTES + SIU_AUTHENTICATOR_BYTES


class SiuType(enum.IntEnum):
    UPDATE = 1        # the MN registered a (new) care-of address
    DEREGISTER = 2    # the binding ended: retire the SA's outer binding (new CoA = 0.0.0.0)
    ACK = 3           # GW -> HA: the SIU with this sequence number was applied (echoed)
    REJECT = 4        # forward a rejecting RRP (e.g. code 133) once to new_care_of; move nothing


class SiuFlags(enum.IntFlag):
    FORWARD_RRP = 0x80   # F: the GW must send the embedded Registration Reply to the MN over the SA
    STALE_EPOCH = 0x40   # E (ACK only): the SIU was refused for its Gateway Epoch, nothing applied
    ALL = 0xC0


SIU_HEADER = Struct(
    "version" / Const(SIU_VERSION, Int8ub),
    "type" / Int8ub,
    "flags" / Int8ub,
    "key_id" / Int8ub,
    "sender" / Bytes(4),             # HA identifier: the HA's IPv4 address
    "sequence" / Int64ub,
    "timestamp" / Int64ub,           # NTP format (RFC 5905 §6), informational
    "home_address" / Bytes(4),
    "old_care_of" / Bytes(4),
    "new_care_of" / Bytes(4),
    "gateway_spi" / Int32ub,
    "lifetime" / Int16ub,
    "rrp_length" / Int16ub,
    "gateway_epoch" / Int64ub,       # the GW's epoch: echoed by the HA, announced in ACKs
    "rrp" / Bytes(lambda this: this.rrp_length),
)


@dataclass(frozen=True, slots=True)
class Siu:
    """One SIU.  Addresses are dotted quads; ``authenticator`` is empty before signing."""
    type: SiuType
    sender: str
    sequence: int
    timestamp: int
    home_address: str
    old_care_of: str
    new_care_of: str
    gateway_spi: int
    lifetime: int
    rrp: bytes = b""
    flags: SiuFlags = SiuFlags(0)
    key_id: int = 0
    version: int = SIU_VERSION
    authenticator: bytes = b""
    gateway_epoch: int = 0            # 0: the HA does not know the GW's current epoch


def _pack_addr(address: str, name: str) -> bytes:
    try:
        return ipaddress.IPv4Address(address).packed
    except ValueError as exc:
        raise UsageError(f"{name}: not an IPv4 address: {address!r}") from exc


def build_siu_body(siu: Siu) -> bytes:
    """Everything the authenticator covers (the message without its last 32 bytes)."""
    for value, bits, name in ((siu.sequence, 64, "sequence"), (siu.timestamp, 64, "timestamp"),
                              (siu.gateway_spi, 32, "gateway_spi"), (siu.lifetime, 16, "lifetime"),
                              (siu.key_id, 8, "key_id"), (len(siu.rrp), 16, "rrp length"),
                              (siu.gateway_epoch, 64, "gateway_epoch")):
        if not 0 <= value < (1 << bits):
            raise UsageError(f"SIU {name} {value} does not fit {bits} bits")
    body: bytes = SIU_HEADER.build(dict(
        type=int(siu.type), flags=int(siu.flags), key_id=siu.key_id,
        sender=_pack_addr(siu.sender, "sender"), sequence=siu.sequence, timestamp=siu.timestamp,
        home_address=_pack_addr(siu.home_address, "home_address"),
        old_care_of=_pack_addr(siu.old_care_of, "old_care_of"),
        new_care_of=_pack_addr(siu.new_care_of, "new_care_of"),
        gateway_spi=siu.gateway_spi, lifetime=siu.lifetime, rrp_length=len(siu.rrp),
        gateway_epoch=siu.gateway_epoch, rrp=siu.rrp))
    return body


def build_siu(siu: Siu) -> bytes:
    """The whole message, with ``siu.authenticator`` appended (it must be 32 bytes)."""
    if len(siu.authenticator) != SIU_AUTHENTICATOR_BYTES:
        raise UsageError(f"SIU authenticator must be {SIU_AUTHENTICATOR_BYTES} bytes")
    return build_siu_body(siu) + siu.authenticator


def siu_sender(data: bytes) -> str | None:
    """The sender field, read before anything else so the verifier can pick the key."""
    return bytes_to_addr(data[4:8]) if len(data) >= 8 else None


def parse_siu(data: bytes) -> Siu:
    """Unframe an SIU.  Raises ParseError(TRUNCATED / MALFORMED).  Does NOT authenticate."""
    if len(data) < SIU_MIN_BYTES:
        raise ParseError(f"SIU of {len(data)} bytes", DropReason.TRUNCATED)
    if data[0] != SIU_VERSION:
        raise ParseError(f"SIU version {data[0]}", DropReason.MALFORMED)
    rrp_length = int.from_bytes(data[42:44], "big")
    expected = SIU_FIXED_BYTES + rrp_length + SIU_AUTHENTICATOR_BYTES
    if len(data) < expected:
        raise ParseError(f"SIU says {expected} bytes, got {len(data)}", DropReason.TRUNCATED)
    if len(data) > expected:
        raise ParseError(f"SIU says {expected} bytes, got {len(data)}", DropReason.MALFORMED)
    try:
        siu_type = SiuType(data[1])
    except ValueError:
        raise ParseError(f"SIU type {data[1]}", DropReason.MALFORMED) from None
    if data[2] & ~SiuFlags.ALL & 0xFF:
        raise ParseError(f"SIU reserved flags {data[2]:#04x} set", DropReason.MALFORMED)
    hdr = SIU_HEADER.parse(data)
    return Siu(
        type=siu_type, sender=bytes_to_addr(hdr.sender), sequence=hdr.sequence,
        timestamp=hdr.timestamp, home_address=bytes_to_addr(hdr.home_address),
        old_care_of=bytes_to_addr(hdr.old_care_of), new_care_of=bytes_to_addr(hdr.new_care_of),
        gateway_spi=hdr.gateway_spi, lifetime=hdr.lifetime,
        rrp=bytes(hdr.rrp), flags=SiuFlags(hdr.flags), key_id=hdr.key_id, version=hdr.version,
        authenticator=bytes(data[-SIU_AUTHENTICATOR_BYTES:]), gateway_epoch=hdr.gateway_epoch)
