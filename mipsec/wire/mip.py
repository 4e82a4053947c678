"""Mobile IPv4 registration messages (RFC 5944 §3.3, §3.4) and their extensions (§1.9-§1.11, §3.5).

Pure codecs: ``parse_registration_request`` / ``parse_registration_reply`` take the UDP payload
(port 434) and return frozen dataclasses or raise ``ParseError(reason=...)``; ``build_*`` do the
reverse.  The fixed part of each message is specified with construct (``RRQ_HEADER``,
``RRP_HEADER``); extensions are walked by hand because their format depends on the type
(RFC 5944 §1.9 short TLV, §1.10 long format, §1.11 short format with sub-type).

Extension rules (RFC 5944 §1.9): an extension of an unknown type 0-127 makes the whole message
unacceptable (``DropReason.MIP_BAD_EXTENSION``); an unknown type 128-255 is skipped.  Skipped
extensions are kept in ``extensions`` (they are covered by a later authenticator) but have no
meaning for us.

Authentication (``mipsec.mip.security``) needs the exact bytes that precede an authentication
extension's authenticator, so ``Extension.offset`` records where each extension starts in the
message it was parsed from.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from construct import Bytes, Const, Int8ub, Int16ub, Int64ub, StreamError, Struct

from mipsec.constants import MIP_PORT as MIP_PORT
from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.wire.ipv4 import bytes_to_addr

# --- specification constants ------------------------------------------------------------------


MSG_REGISTRATION_REQUEST = 1        # RFC 5944 §3.3
MSG_REGISTRATION_REPLY = 3          # RFC 5944 §3.4

RRQ_FIXED_BYTES = 24                # RFC 5944 §3.3: type .. identification
RRP_FIXED_BYTES = 20                # RFC 5944 §3.4: type .. identification

# Extension types (IANA "Mobile IPv4 numbers"; RFC 5944 §3.5, RFC 2794, RFC 3012, RFC 3115)
EXT_MN_HA_AUTH = 32                 # RFC 5944 §3.5.2 Mobile-Home Authentication Extension
EXT_MN_FA_AUTH = 33                 # RFC 5944 §3.5.3 Mobile-Foreign Authentication Extension
EXT_FA_HA_AUTH = 34                 # RFC 5944 §3.5.4 Foreign-Home Authentication Extension
EXT_GENERIC_AUTH = 36               # RFC 3012 §5: Generic Mobile IP Authentication (long format)
EXT_CVSE = 38                       # RFC 3115 §3.1: Critical Vendor/Org Specific (long format)
EXT_NAI = 131                       # RFC 2794 §2: Mobile Node NAI Extension
EXT_NVSE = 134                      # RFC 3115 §3.2: Normal Vendor/Org Specific (short format)

# RFC 5944 §1.9: types 0-127 must be understood, types 128-255 may be skipped if unknown.
EXT_SKIPPABLE_MIN = 128
# RFC 5944 §1.10: the long extension format (Type, Sub-Type, 16-bit Length).  The format is a
# property of the type; these are the long-format types registered by the RFCs cited above.
LONG_FORMAT_EXTENSION_TYPES = frozenset({EXT_GENERIC_AUTH, EXT_CVSE})
AUTH_EXTENSION_TYPES = frozenset({EXT_MN_HA_AUTH, EXT_MN_FA_AUTH, EXT_FA_HA_AUTH})
# The types this implementation understands; any other type below 128 is refused (§1.9).
KNOWN_EXTENSION_TYPES = AUTH_EXTENSION_TYPES | {EXT_NAI}

AUTH_SPI_BYTES = 4                  # RFC 5944 §3.5.1: SPI field of the authentication extensions
HMAC_MD5_BYTES = 16                 # RFC 5944 §3.5.1: default HMAC-MD5 gives 128 bits
HMAC_SHA256_BYTES = 32


class RequestFlags(enum.IntFlag):
    """The flag octet of the Registration Request, most significant bit first (RFC 5944 §3.3)."""
    S = 0x80   # simultaneous bindings
    B = 0x40   # broadcast datagrams
    D = 0x20   # decapsulation by mobile node (co-located care-of address)
    M = 0x10   # minimal encapsulation
    G = 0x08   # GRE encapsulation
    R = 0x04   # "r": sent as zero, ignored on reception
    T = 0x02   # reverse tunnelling requested (RFC 3024 §3.1)
    X = 0x01   # "x": sent as zero, ignored on reception


class ReplyCode(enum.IntEnum):
    """Registration Reply codes (RFC 5944 §3.4; RFC 3024 §3.3 adds 74-76 and 137-139)."""
    ACCEPTED = 0
    ACCEPTED_NO_SIMULTANEOUS_BINDINGS = 1
    # denied by the foreign agent
    FA_REASON_UNSPECIFIED = 64
    FA_ADMINISTRATIVELY_PROHIBITED = 65
    FA_INSUFFICIENT_RESOURCES = 66
    FA_MOBILE_NODE_FAILED_AUTHENTICATION = 67
    FA_HOME_AGENT_FAILED_AUTHENTICATION = 68
    FA_REQUESTED_LIFETIME_TOO_LONG = 69
    FA_POORLY_FORMED_REQUEST = 70
    FA_POORLY_FORMED_REPLY = 71
    FA_REQUESTED_ENCAPSULATION_UNAVAILABLE = 72
    FA_RESERVED_AND_UNAVAILABLE = 73
    FA_REQUESTED_REVERSE_TUNNEL_UNAVAILABLE = 74
    FA_REVERSE_TUNNEL_MANDATORY_T_NOT_SET = 75
    FA_MOBILE_NODE_TOO_DISTANT = 76
    FA_INVALID_CARE_OF_ADDRESS = 77
    FA_REGISTRATION_TIMEOUT = 78
    FA_HOME_NETWORK_UNREACHABLE = 80
    FA_HOME_AGENT_HOST_UNREACHABLE = 81
    FA_HOME_AGENT_PORT_UNREACHABLE = 82
    FA_HOME_AGENT_UNREACHABLE = 88
    FA_INVALID_HOME_AGENT_ADDRESS = 194
    # denied by the home agent
    HA_REASON_UNSPECIFIED = 128
    HA_ADMINISTRATIVELY_PROHIBITED = 129
    HA_INSUFFICIENT_RESOURCES = 130
    HA_MOBILE_NODE_FAILED_AUTHENTICATION = 131
    HA_FOREIGN_AGENT_FAILED_AUTHENTICATION = 132
    HA_IDENTIFICATION_MISMATCH = 133
    HA_POORLY_FORMED_REQUEST = 134
    HA_TOO_MANY_SIMULTANEOUS_BINDINGS = 135
    HA_UNKNOWN_HOME_AGENT_ADDRESS = 136
    HA_REQUESTED_REVERSE_TUNNEL_UNAVAILABLE = 137
    HA_REVERSE_TUNNEL_MANDATORY_T_NOT_SET = 138
    HA_REQUESTED_ENCAPSULATION_UNAVAILABLE = 139

    @property
    def accepted(self) -> bool:
        return self in (ReplyCode.ACCEPTED, ReplyCode.ACCEPTED_NO_SIMULTANEOUS_BINDINGS)


# --- construct specifications of the fixed parts ------------------------------------------------

RRQ_HEADER = Struct(                # RFC 5944 §3.3
    "type" / Const(MSG_REGISTRATION_REQUEST, Int8ub),
    "flags" / Int8ub,
    "lifetime" / Int16ub,
    "home_address" / Bytes(4),
    "home_agent" / Bytes(4),
    "care_of_address" / Bytes(4),
    "identification" / Int64ub,
)

RRP_HEADER = Struct(                # RFC 5944 §3.4
    "type" / Const(MSG_REGISTRATION_REPLY, Int8ub),
    "code" / Int8ub,
    "lifetime" / Int16ub,
    "home_address" / Bytes(4),
    "home_agent" / Bytes(4),
    "identification" / Int64ub,
)

SHORT_TLV = Struct(                 # RFC 5944 §1.9: Type, Length, Data
    "type" / Int8ub, "length" / Int8ub, "data" / Bytes(lambda this: this.length))
LONG_EXTENSION = Struct(            # RFC 5944 §1.10: Type, Sub-Type, Length(16), Data
    "type" / Int8ub, "subtype" / Int8ub, "length" / Int16ub,
    "data" / Bytes(lambda this: this.length))


# --- the data model ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Extension:
    """One extension.  ``data`` is everything after the Type/Length (short format) or after the
    Type/Sub-Type/Length (long format, ``subtype`` not None).  For the authentication extensions
    (32/33/34) ``spi`` and ``authenticator`` give the two fields of ``data``.

    ``offset`` is where the extension started in the parsed message (``None`` when built); it is
    not part of equality.
    """
    type: int
    data: bytes = b""
    subtype: int | None = None
    offset: int | None = field(default=None, compare=False)

    @property
    def skippable(self) -> bool:
        return self.type >= EXT_SKIPPABLE_MIN

    @property
    def spi(self) -> int:
        self._need_auth()
        return int.from_bytes(self.data[:AUTH_SPI_BYTES], "big")

    @property
    def authenticator(self) -> bytes:
        self._need_auth()
        return self.data[AUTH_SPI_BYTES:]

    def _need_auth(self) -> None:
        if self.type not in AUTH_EXTENSION_TYPES:
            raise UsageError(f"extension type {self.type} is not an authentication extension")

    def encode(self) -> bytes:
        if self.subtype is not None or self.type in LONG_FORMAT_EXTENSION_TYPES:
            if len(self.data) > 0xFFFF:
                raise UsageError(f"extension type {self.type}: data longer than 65535 bytes")
            built: bytes = LONG_EXTENSION.build(dict(type=self.type, subtype=self.subtype or 0,
                                                     length=len(self.data), data=self.data))
            return built
        if len(self.data) > 0xFF:
            raise UsageError(f"extension type {self.type}: data longer than 255 bytes")
        return bytes((self.type, len(self.data))) + self.data


def auth_extension(spi: int, authenticator: bytes, type: int = EXT_MN_HA_AUTH) -> Extension:
    """An MN-HA (or MN-FA / FA-HA) authentication extension (RFC 5944 §3.5.2)."""
    if type not in AUTH_EXTENSION_TYPES:
        raise UsageError(f"extension type {type} is not an authentication extension")
    if not 0 <= spi <= 0xFFFFFFFF:
        raise UsageError(f"SPI {spi} does not fit 32 bits")
    return Extension(type, spi.to_bytes(4, "big") + authenticator)


def nai_extension(nai: str) -> Extension:
    """The Mobile Node NAI extension (RFC 2794 §2): the MN's identity, UTF-8, no terminator."""
    raw = nai.encode("utf-8")
    if not raw:
        raise UsageError("an NAI must not be empty (RFC 2794 §2)")
    return Extension(EXT_NAI, raw)


class _Message:
    """What requests and replies share: extension lookups."""

    extensions: tuple[Extension, ...]

    def extension(self, type: int) -> Extension | None:
        """The first extension of ``type`` or None."""
        for ext in self.extensions:
            if ext.type == type:
                return ext
        return None

    @property
    def mn_ha_auth(self) -> Extension | None:
        return self.extension(EXT_MN_HA_AUTH)

    @property
    def nai(self) -> str | None:
        ext = self.extension(EXT_NAI)
        return None if ext is None else ext.data.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class RegistrationRequest(_Message):
    """RFC 5944 §3.3.  Addresses are dotted-quad strings, ``identification`` a 64-bit integer."""
    home_address: str
    home_agent: str
    care_of_address: str
    identification: int
    lifetime: int = 0
    flags: RequestFlags = RequestFlags(0)
    extensions: tuple[Extension, ...] = ()


@dataclass(frozen=True, slots=True)
class RegistrationReply(_Message):
    """RFC 5944 §3.4.  ``code`` is a ``ReplyCode`` when known, else the raw integer."""
    code: ReplyCode | int
    home_address: str
    home_agent: str
    identification: int
    lifetime: int = 0
    extensions: tuple[Extension, ...] = ()


# --- parsing ----------------------------------------------------------------------------------

def _pack_addr(address: str) -> bytes:
    try:
        return ipaddress.IPv4Address(address).packed
    except ValueError as exc:
        raise UsageError(f"not an IPv4 address: {address!r}") from exc


def parse_extensions(data: bytes, start: int) -> tuple[Extension, ...]:
    """Walk the extensions from ``start`` to the end of ``data`` (RFC 5944 §1.9-§1.11)."""
    out = []
    pos = start
    end = len(data)
    while pos < end:
        ext_type = data[pos]
        if ext_type in LONG_FORMAT_EXTENSION_TYPES:                 # §1.10 long format
            if pos + 4 > end:
                raise ParseError(f"long extension {ext_type} header truncated at {pos}",
                                 DropReason.TRUNCATED)
            subtype = data[pos + 1]
            length = int.from_bytes(data[pos + 2:pos + 4], "big")
            body = pos + 4
        else:                                                      # §1.9 / §1.11 short formats
            if pos + 2 > end:
                raise ParseError(f"extension {ext_type} header truncated at {pos}",
                                 DropReason.TRUNCATED)
            subtype = None
            length = data[pos + 1]
            body = pos + 2
        if body + length > end:
            raise ParseError(f"extension {ext_type} at {pos} says {length} bytes, "
                             f"{end - body} left", DropReason.TRUNCATED)
        if ext_type < EXT_SKIPPABLE_MIN and ext_type not in KNOWN_EXTENSION_TYPES:
            # §1.9: "the receiving node MUST silently discard the entire ... message"
            raise ParseError(f"unknown non-skippable extension type {ext_type}",
                             DropReason.MIP_BAD_EXTENSION)
        if ext_type in AUTH_EXTENSION_TYPES and length < AUTH_SPI_BYTES:
            raise ParseError(f"authentication extension {ext_type} shorter than its SPI",
                             DropReason.MIP_BAD_EXTENSION)
        if ext_type == EXT_NAI and length == 0:                   # RFC 2794 §2: NAI not empty
            raise ParseError("empty NAI extension", DropReason.MIP_BAD_EXTENSION)
        out.append(Extension(ext_type, bytes(data[body:body + length]), subtype, pos))
        pos = body + length
    return tuple(out)


def _check_auth_order(extensions: tuple[Extension, ...]) -> None:
    # RFC 5944 §3.6.1.3 / §3.7.2.1: exactly one MN-HA authentication extension is processed; a
    # second one is ambiguous (which covers what?), so the message is refused.
    if sum(1 for e in extensions if e.type == EXT_MN_HA_AUTH) > 1:
        raise ParseError("more than one MN-HA authentication extension",
                         DropReason.MIP_BAD_EXTENSION)


def _parse_message(data: bytes, what: str, msg_type: int, header: Any, fixed: int
                   ) -> tuple[Any, tuple[Extension, ...]]:
    """The fixed part and the extensions of a registration message of type ``msg_type``."""
    if len(data) < fixed:
        raise ParseError(f"{what} of {len(data)} bytes", DropReason.TRUNCATED)
    if data[0] != msg_type:
        raise ParseError(f"message type {data[0]} is not a {what}", DropReason.MALFORMED)
    try:
        hdr = header.parse(data)
    except StreamError as exc:  # cannot happen after the length check; kept as a guard
        raise ParseError(str(exc), DropReason.TRUNCATED) from exc
    extensions = parse_extensions(data, fixed)
    _check_auth_order(extensions)
    return hdr, extensions


def parse_registration_request(data: bytes) -> RegistrationRequest:
    """Parse the UDP payload of a Registration Request (RFC 5944 §3.3)."""
    hdr, extensions = _parse_message(data, "registration request", MSG_REGISTRATION_REQUEST,
                                     RRQ_HEADER, RRQ_FIXED_BYTES)
    return RegistrationRequest(
        home_address=bytes_to_addr(hdr.home_address), home_agent=bytes_to_addr(hdr.home_agent),
        care_of_address=bytes_to_addr(hdr.care_of_address), identification=hdr.identification,
        lifetime=hdr.lifetime, flags=RequestFlags(hdr.flags), extensions=extensions)


def parse_registration_reply(data: bytes) -> RegistrationReply:
    """Parse the UDP payload of a Registration Reply (RFC 5944 §3.4)."""
    hdr, extensions = _parse_message(data, "registration reply", MSG_REGISTRATION_REPLY,
                                     RRP_HEADER, RRP_FIXED_BYTES)
    try:
        code: ReplyCode | int = ReplyCode(hdr.code)
    except ValueError:
        code = hdr.code
    return RegistrationReply(
        code=code, home_address=bytes_to_addr(hdr.home_address),
        home_agent=bytes_to_addr(hdr.home_agent),
        identification=hdr.identification, lifetime=hdr.lifetime, extensions=extensions)


# --- building ---------------------------------------------------------------------------------

def _check_u(value: int, bits: int, name: str) -> None:
    if not 0 <= value < (1 << bits):
        raise UsageError(f"{name} {value} does not fit {bits} bits")


def build_registration_request(rrq: RegistrationRequest) -> bytes:
    """The UDP payload of ``rrq``, extensions in the order given."""
    _check_u(rrq.lifetime, 16, "lifetime")
    _check_u(rrq.identification, 64, "identification")
    head: bytes = RRQ_HEADER.build(dict(
        flags=int(rrq.flags), lifetime=rrq.lifetime, home_address=_pack_addr(rrq.home_address),
        home_agent=_pack_addr(rrq.home_agent), care_of_address=_pack_addr(rrq.care_of_address),
        identification=rrq.identification))
    return head + b"".join(e.encode() for e in rrq.extensions)


def build_registration_reply(rrp: RegistrationReply) -> bytes:
    """The UDP payload of ``rrp``, extensions in the order given."""
    _check_u(int(rrp.code), 8, "code")
    _check_u(rrp.lifetime, 16, "lifetime")
    _check_u(rrp.identification, 64, "identification")
    head: bytes = RRP_HEADER.build(dict(
        code=int(rrp.code), lifetime=rrp.lifetime, home_address=_pack_addr(rrp.home_address),
        home_agent=_pack_addr(rrp.home_agent), identification=rrp.identification))
    return head + b"".join(e.encode() for e in rrp.extensions)


def auth_extension_offset(data: bytes, extensions: tuple[Extension, ...],
                          type: int = EXT_MN_HA_AUTH) -> tuple[int, Extension] | None:
    """Where the authenticated part ends for the first extension of ``type``.

    RFC 5944 §3.5.1: the authenticator protects "the UDP payload (that is, the Registration
    Request or Reply data), all prior Extensions in their entirety, and the Type, Length, and SPI
    of this Extension".  Returns (number of covered bytes, the extension) or None.
    """
    for ext in extensions:
        if ext.type == type:
            if ext.offset is None:
                raise UsageError("extension was not parsed from a message")
            return ext.offset + 2 + AUTH_SPI_BYTES, ext
    return None
