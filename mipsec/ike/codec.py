"""IKEv2 message codec (RFC 7296 §3): pure functions, frozen dataclasses, strict parsing.

The fixed parts of the header and of every payload are ``construct`` specifications (parsed,
never compiled: the input is untrusted); the variable parts are sliced by length fields that are
checked before use.  Every failure raises ``ParseError`` with an ``IKE_*`` ``DropReason``:

* a length field that disagrees with the buffer or with its payload's minimum -> IKE_BAD_LENGTH;
* a payload type we do not know with the critical bit set (§2.5) -> IKE_UNKNOWN_CRITICAL_PAYLOAD
  (``UnknownCriticalPayload`` carries the type so the responder can answer
  UNSUPPORTED_CRITICAL_PAYLOAD); without the bit the payload is skipped (kept as ``Unknown``);
* anything else that does not parse (wrong version, bad counts, a payload after SK) -> MALFORMED.

The Encrypted payload (§3.14) is returned still encrypted (``Encrypted``); ``mipsec.ike.crypto``
opens it and ``parse_payload_chain`` parses its contents.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

import construct as cs

from mipsec.drops import DropReason
from mipsec.errors import ParseError
from mipsec.ike.constants import (
    ATTR_FORMAT_TV,
    ATTR_KEY_LENGTH,
    GENERIC_PAYLOAD_HEADER_LEN,
    IKE_HEADER_LEN,
    IKE_VERSION,
    KNOWN_PAYLOADS,
    Flag,
    PayloadType,
    ProtocolId,
    TransformType,
    TsType,
)

# --- construct specifications (§3.1 - §3.15) ---------------------------------------------------

HEADER = cs.Struct(                                    # §3.1
    "spi_i" / cs.Bytes(8),
    "spi_r" / cs.Bytes(8),
    "next_payload" / cs.Int8ub,
    "version" / cs.Int8ub,
    "exchange" / cs.Int8ub,
    "flags" / cs.Int8ub,
    "message_id" / cs.Int32ub,
    "length" / cs.Int32ub,
)
GENERIC = cs.Struct(                                   # §3.2
    "next_payload" / cs.Int8ub,
    "flags" / cs.Int8ub,                               # bit 7: Critical
    "length" / cs.Int16ub,
)
PROPOSAL_FIXED = cs.Struct(                            # §3.3.1
    "more" / cs.Int8ub,                                # 0 last, 2 more
    cs.Padding(1),
    "length" / cs.Int16ub,
    "number" / cs.Int8ub,
    "protocol" / cs.Int8ub,
    "spi_size" / cs.Int8ub,
    "num_transforms" / cs.Int8ub,
)
TRANSFORM_FIXED = cs.Struct(                           # §3.3.2
    "more" / cs.Int8ub,                                # 0 last, 3 more
    cs.Padding(1),
    "length" / cs.Int16ub,
    "type" / cs.Int8ub,
    cs.Padding(1),
    "id" / cs.Int16ub,
)
ATTRIBUTE_TV = cs.Struct("type" / cs.Int16ub, "value" / cs.Int16ub)   # §3.3.5
KE_FIXED = cs.Struct("group" / cs.Int16ub, cs.Padding(2))             # §3.4
ID_FIXED = cs.Struct("id_type" / cs.Int8ub, cs.Padding(3))            # §3.5
AUTH_FIXED = cs.Struct("method" / cs.Int8ub, cs.Padding(3))           # §3.8
NOTIFY_FIXED = cs.Struct(                                             # §3.10
    "protocol" / cs.Int8ub, "spi_size" / cs.Int8ub, "type" / cs.Int16ub)
DELETE_FIXED = cs.Struct(                                             # §3.11
    "protocol" / cs.Int8ub, "spi_size" / cs.Int8ub, "num_spis" / cs.Int16ub)
TS_HEADER = cs.Struct("count" / cs.Int8ub, cs.Padding(3))            # §3.13
TS_IPV4 = cs.Struct(                                                  # §3.13.1
    "ts_type" / cs.Int8ub,
    "ip_protocol" / cs.Int8ub,
    "length" / cs.Int16ub,
    "start_port" / cs.Int16ub,
    "end_port" / cs.Int16ub,
    "start_address" / cs.Bytes(4),
    "end_address" / cs.Bytes(4),
)
CP_FIXED = cs.Struct("cfg_type" / cs.Int8ub, cs.Padding(3))           # §3.15


# --- data model -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Transform:
    type: int                      # TransformType
    id: int
    key_length: int | None = None  # bits, the Key Length attribute (§3.3.5)


@dataclass(frozen=True, slots=True)
class Proposal:
    number: int
    protocol: int                  # ProtocolId
    spi: bytes
    transforms: tuple[Transform, ...]

    def ids(self, ttype: TransformType) -> list[Transform]:
        return [t for t in self.transforms if t.type == ttype]


@dataclass(frozen=True, slots=True)
class SaPayload:
    proposals: tuple[Proposal, ...]
    ptype = PayloadType.SA


@dataclass(frozen=True, slots=True)
class KePayload:
    group: int
    data: bytes
    ptype = PayloadType.KE


@dataclass(frozen=True, slots=True)
class IdPayload:
    ptype: PayloadType             # IDi or IDr
    id_type: int
    data: bytes

    def body(self) -> bytes:
        """The payload body after the generic header: what §2.15 MACs."""
        return ID_FIXED.build({"id_type": self.id_type}) + self.data


@dataclass(frozen=True, slots=True)
class AuthPayload:
    method: int
    data: bytes
    ptype = PayloadType.AUTH


@dataclass(frozen=True, slots=True)
class NoncePayload:
    data: bytes
    ptype = PayloadType.NONCE


@dataclass(frozen=True, slots=True)
class NotifyPayload:
    type: int
    data: bytes = b""
    protocol: int = ProtocolId.NONE
    spi: bytes = b""
    ptype = PayloadType.NOTIFY


@dataclass(frozen=True, slots=True)
class DeletePayload:
    protocol: int
    spis: tuple[bytes, ...] = ()
    ptype = PayloadType.DELETE


@dataclass(frozen=True, slots=True)
class VendorIdPayload:
    data: bytes
    ptype = PayloadType.VENDOR_ID


@dataclass(frozen=True, slots=True)
class TrafficSelector:
    """§3.13.1, IPv4 only; addresses as dotted strings, ports inclusive, protocol 0 = any."""
    start_address: str
    end_address: str
    ip_protocol: int = 0
    start_port: int = 0
    end_port: int = 65535

    @classmethod
    def from_network(cls, network: str, ip_protocol: int = 0) -> TrafficSelector:
        net = ipaddress.IPv4Network(network, strict=False)
        return cls(str(net.network_address), str(net.broadcast_address), ip_protocol)

    def contains(self, other: TrafficSelector) -> bool:
        a = ipaddress.IPv4Address
        return (a(self.start_address) <= a(other.start_address)
                and a(other.end_address) <= a(self.end_address)
                and self.start_port <= other.start_port and other.end_port <= self.end_port
                and self.ip_protocol in (0, other.ip_protocol))

    def intersect(self, other: TrafficSelector) -> TrafficSelector | None:
        a = ipaddress.IPv4Address
        if self.ip_protocol and other.ip_protocol and self.ip_protocol != other.ip_protocol:
            return None
        lo = max(a(self.start_address), a(other.start_address))
        hi = min(a(self.end_address), a(other.end_address))
        plo, phi = max(self.start_port, other.start_port), min(self.end_port, other.end_port)
        if lo > hi or plo > phi:
            return None
        return TrafficSelector(str(lo), str(hi), self.ip_protocol or other.ip_protocol, plo, phi)

    def as_network(self) -> str | None:
        """``a.b.c.d/n`` when the range is exactly one prefix, else None."""
        try:
            nets = list(ipaddress.summarize_address_range(
                ipaddress.IPv4Address(self.start_address), ipaddress.IPv4Address(self.end_address)))
        except ValueError:                                  # an empty (reversed) range
            return None
        return str(nets[0]) if len(nets) == 1 else None


@dataclass(frozen=True, slots=True)
class TsPayload:
    ptype: PayloadType             # TSi or TSr
    selectors: tuple[TrafficSelector, ...]


@dataclass(frozen=True, slots=True)
class Unknown:
    """A payload we keep as bytes: a non-critical unknown type, CERT, CERTREQ, CP, EAP."""
    ptype: int
    data: bytes
    critical: bool = False


@dataclass(frozen=True, slots=True)
class Encrypted:
    """The SK payload (§3.14) still encrypted: ``first_payload`` is its Next Payload field,
    ``body`` is IV | ciphertext | ICV, and ``offset`` is where its generic header starts in the
    message (what precedes it, with that header, is the AEAD associated data, RFC 5282 §5.1)."""
    first_payload: int
    body: bytes
    offset: int
    ptype = PayloadType.SK


Payload = (SaPayload | KePayload | IdPayload | AuthPayload | NoncePayload | NotifyPayload
           | DeletePayload | VendorIdPayload | TsPayload | Unknown | Encrypted)


@dataclass(frozen=True, slots=True)
class Header:
    spi_i: bytes
    spi_r: bytes
    exchange: int
    flags: int
    message_id: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & Flag.RESPONSE)

    @property
    def from_initiator(self) -> bool:
        """The I flag (§3.1): set by the original initiator of the IKE SA."""
        return bool(self.flags & Flag.INITIATOR)


@dataclass(frozen=True, slots=True)
class Message:
    header: Header
    payloads: tuple[Payload, ...]          # plaintext payloads (outside SK, or after decryption)
    encrypted: Encrypted | None = None
    raw: bytes = field(default=b"", repr=False)

    def find(self, cls, ptype: int | None = None):
        for p in self.payloads:
            if isinstance(p, cls) and (ptype is None or p.ptype == ptype):
                return p
        return None

    def notifies(self, ntype: int | None = None) -> list[NotifyPayload]:
        return [p for p in self.payloads
                if isinstance(p, NotifyPayload) and (ntype is None or p.type == ntype)]


class UnknownCriticalPayload(ParseError):
    def __init__(self, ptype: int):
        super().__init__(f"unknown critical payload type {ptype}",
                         DropReason.IKE_UNKNOWN_CRITICAL_PAYLOAD)
        self.ptype = ptype


def _bad_length(what: str) -> ParseError:
    return ParseError(what, DropReason.IKE_BAD_LENGTH)


# --- parsing ---------------------------------------------------------------------------------------

def parse_header(data: bytes) -> tuple[Header, int, int]:
    """Parse and check the §3.1 header; returns (header, first payload type, length)."""
    if len(data) < IKE_HEADER_LEN:
        raise _bad_length(f"{len(data)} octets is shorter than the IKE header")
    h = HEADER.parse(data[:IKE_HEADER_LEN])
    if h.version >> 4 != 2:
        raise ParseError(f"IKE major version {h.version >> 4}", DropReason.MALFORMED)  # §2.5
    if h.length != len(data):
        raise _bad_length(f"header length {h.length} but datagram has {len(data)} octets")
    return (Header(h.spi_i, h.spi_r, h.exchange, h.flags, h.message_id), h.next_payload, h.length)


def parse_message(data: bytes) -> Message:
    """Parse a whole IKE message (without the RFC 3948 non-ESP marker)."""
    header, first, _ = parse_header(data)
    payloads, encrypted = _parse_chain(first, data, IKE_HEADER_LEN, allow_sk=True)
    return Message(header, tuple(payloads), encrypted, bytes(data))


def parse_payload_chain(first: int, data: bytes) -> tuple[Payload, ...]:
    """Parse the plaintext of an SK payload (§3.14): a payload chain that must fill ``data``."""
    payloads, _ = _parse_chain(first, data, 0, allow_sk=False)
    return tuple(payloads)


def _parse_chain(first: int, data: bytes, offset: int, allow_sk: bool):
    payloads: list[Payload] = []
    nxt = first
    end = len(data)
    while nxt != PayloadType.NONE:
        if end - offset < GENERIC_PAYLOAD_HEADER_LEN:
            raise _bad_length("payload chain ends inside a generic payload header")
        g = GENERIC.parse(data[offset:offset + GENERIC_PAYLOAD_HEADER_LEN])
        if g.length < GENERIC_PAYLOAD_HEADER_LEN or offset + g.length > end:
            raise _bad_length(f"payload {nxt} length {g.length} at offset {offset}")
        critical = bool(g.flags & 0x80)
        body = bytes(data[offset + GENERIC_PAYLOAD_HEADER_LEN:offset + g.length])
        if nxt == PayloadType.SK:
            if not allow_sk:
                raise ParseError("SK payload inside SK", DropReason.MALFORMED)
            if offset + g.length != end:                      # §3.14: SK is the last payload
                raise _bad_length("SK payload is not the last payload")
            return payloads, Encrypted(g.next_payload, body, offset)
        if nxt not in KNOWN_PAYLOADS or nxt == PayloadType.SKF:
            if critical:
                raise UnknownCriticalPayload(nxt)             # §2.5
            payloads.append(Unknown(nxt, body, critical))
        else:
            payloads.append(_parse_body(PayloadType(nxt), body, critical))
        offset += g.length
        nxt = g.next_payload
    if offset != end:
        raise _bad_length(f"{end - offset} octets after the last payload")
    return payloads, None


def _need(body: bytes, n: int, what: str) -> None:
    if len(body) < n:
        raise _bad_length(f"{what} body of {len(body)} octets is shorter than {n}")


def _parse_body(ptype: PayloadType, body: bytes, critical: bool) -> Payload:
    if ptype == PayloadType.SA:                                          # §3.3
        return SaPayload(_parse_proposals(body))
    if ptype == PayloadType.KE:                                          # §3.4
        _need(body, 4, "KE")
        return KePayload(KE_FIXED.parse(body).group, body[4:])
    if ptype in (PayloadType.IDi, PayloadType.IDr):                      # §3.5
        _need(body, 4, "ID")
        return IdPayload(ptype, ID_FIXED.parse(body).id_type, body[4:])
    if ptype == PayloadType.AUTH:                                        # §3.8
        _need(body, 4, "AUTH")
        return AuthPayload(AUTH_FIXED.parse(body).method, body[4:])
    if ptype == PayloadType.NONCE:                                       # §3.9
        return NoncePayload(body)
    if ptype == PayloadType.NOTIFY:                                      # §3.10
        _need(body, 4, "Notify")
        n = NOTIFY_FIXED.parse(body)
        _need(body, 4 + n.spi_size, "Notify")
        return NotifyPayload(n.type, body[4 + n.spi_size:], n.protocol, body[4:4 + n.spi_size])
    if ptype == PayloadType.DELETE:                                      # §3.11
        _need(body, 4, "Delete")
        d = DELETE_FIXED.parse(body)
        if len(body) != 4 + d.spi_size * d.num_spis:
            raise _bad_length(f"Delete with {d.num_spis} SPIs of {d.spi_size} octets")
        if d.protocol == ProtocolId.IKE and (d.spi_size, d.num_spis) != (0, 0):
            raise ParseError("Delete of the IKE SA carries SPIs", DropReason.MALFORMED)
        spis = tuple(body[4 + i * d.spi_size:4 + (i + 1) * d.spi_size] for i in range(d.num_spis))
        return DeletePayload(d.protocol, spis)
    if ptype == PayloadType.VENDOR_ID:                                   # §3.12
        return VendorIdPayload(body)
    if ptype in (PayloadType.TSi, PayloadType.TSr):                      # §3.13
        return TsPayload(ptype, _parse_selectors(body))
    return Unknown(ptype, body, critical)               # CERT, CERTREQ, CP, EAP: not interpreted


def _parse_proposals(body: bytes) -> tuple[Proposal, ...]:
    proposals = []
    off = 0
    expect_number = 1
    while True:
        if len(body) - off < 8:
            raise _bad_length("proposal substructure truncated")
        p = PROPOSAL_FIXED.parse(body[off:off + 8])
        if p.length < 8 + p.spi_size or off + p.length > len(body):
            raise _bad_length(f"proposal length {p.length}")
        if p.more not in (0, 2):
            raise ParseError(f"proposal Last Substruc {p.more}", DropReason.MALFORMED)
        if p.number != expect_number and p.number != expect_number - 1:  # §3.3.1: 1, 2, ...
            raise ParseError(f"proposal number {p.number}", DropReason.MALFORMED)
        expect_number = p.number + 1
        spi = body[off + 8:off + 8 + p.spi_size]
        transforms = _parse_transforms(body[off + 8 + p.spi_size:off + p.length], p.num_transforms)
        proposals.append(Proposal(p.number, p.protocol, spi, transforms))
        off += p.length
        if p.more == 0:
            break
    if off != len(body):
        raise _bad_length("octets after the last proposal")
    return tuple(proposals)


def _parse_transforms(body: bytes, count: int) -> tuple[Transform, ...]:
    out = []
    off = 0
    for i in range(count):
        if len(body) - off < 8:
            raise _bad_length("transform substructure truncated")
        t = TRANSFORM_FIXED.parse(body[off:off + 8])
        if t.length < 8 or off + t.length > len(body):
            raise _bad_length(f"transform length {t.length}")
        if t.more != (0 if i == count - 1 else 3):
            raise ParseError("transform Last Substruc disagrees with the count", DropReason.MALFORMED)
        key_length = None
        attrs = body[off + 8:off + t.length]
        a = 0
        while a < len(attrs):                                           # §3.3.5
            if len(attrs) - a < 4:
                raise _bad_length("transform attribute truncated")
            at = ATTRIBUTE_TV.parse(attrs[a:a + 4])
            if not at.type & ATTR_FORMAT_TV:                            # TLV: only skip it
                tlv_len = at.value
                if a + 4 + tlv_len > len(attrs):
                    raise _bad_length("TLV attribute length")
                a += 4 + tlv_len
                continue
            if at.type & 0x7FFF == ATTR_KEY_LENGTH:
                key_length = at.value
            a += 4
        out.append(Transform(t.type, t.id, key_length))
        off += t.length
    if off != len(body):
        raise _bad_length("octets after the last transform")
    return tuple(out)


def _parse_selectors(body: bytes) -> tuple[TrafficSelector, ...]:
    _need(body, 4, "TS")
    count = TS_HEADER.parse(body).count
    if count == 0:
        raise ParseError("TS payload with no selectors", DropReason.MALFORMED)
    out = []
    off = 4
    for _ in range(count):
        if len(body) - off < 4:
            raise _bad_length("traffic selector truncated")
        ts_type, _proto, length = struct.unpack_from("!BBH", body, off)
        if length < 8 or off + length > len(body):
            raise _bad_length(f"traffic selector length {length}")
        if ts_type == TsType.TS_IPV4_ADDR_RANGE:
            if length != 16:
                raise _bad_length(f"IPv4 traffic selector length {length}")
            t = TS_IPV4.parse(body[off:off + 16])
            if t.start_address > t.end_address or t.start_port > t.end_port:
                raise ParseError("traffic selector range ends before it starts", DropReason.MALFORMED)
            out.append(TrafficSelector(str(ipaddress.IPv4Address(t.start_address)),
                                       str(ipaddress.IPv4Address(t.end_address)),
                                       t.ip_protocol, t.start_port, t.end_port))
        # other selector types (IPv6, RFC 4595 FC) are skipped: we never narrow to them
        off += length
    if off != len(body):
        raise _bad_length("octets after the last traffic selector")
    return tuple(out)


# --- building ----------------------------------------------------------------------------------------

def payload_body(p: Payload) -> bytes:
    """The octets after the generic payload header."""
    if isinstance(p, SaPayload):
        return _build_proposals(p.proposals)
    if isinstance(p, KePayload):
        return KE_FIXED.build({"group": p.group}) + p.data
    if isinstance(p, IdPayload):
        return p.body()
    if isinstance(p, AuthPayload):
        return AUTH_FIXED.build({"method": p.method}) + p.data
    if isinstance(p, NoncePayload | VendorIdPayload | Unknown):
        return p.data
    if isinstance(p, NotifyPayload):
        return (NOTIFY_FIXED.build({"protocol": p.protocol, "spi_size": len(p.spi), "type": p.type})
                + p.spi + p.data)
    if isinstance(p, DeletePayload):
        size = len(p.spis[0]) if p.spis else 0
        return (DELETE_FIXED.build({"protocol": p.protocol, "spi_size": size,
                                    "num_spis": len(p.spis)}) + b"".join(p.spis))
    if isinstance(p, TsPayload):
        return TS_HEADER.build({"count": len(p.selectors)}) + b"".join(
            TS_IPV4.build({"ts_type": TsType.TS_IPV4_ADDR_RANGE, "ip_protocol": s.ip_protocol,
                           "length": 16, "start_port": s.start_port, "end_port": s.end_port,
                           "start_address": ipaddress.IPv4Address(s.start_address).packed,
                           "end_address": ipaddress.IPv4Address(s.end_address).packed})
            for s in p.selectors)
    raise TypeError(f"cannot build {p!r}")


def _build_proposals(proposals: tuple[Proposal, ...]) -> bytes:
    out = []
    for i, pr in enumerate(proposals):
        tbytes = []
        for j, t in enumerate(pr.transforms):
            attrs = (ATTRIBUTE_TV.build({"type": ATTR_FORMAT_TV | ATTR_KEY_LENGTH,
                                         "value": t.key_length})
                     if t.key_length is not None else b"")
            tbytes.append(TRANSFORM_FIXED.build({
                "more": 0 if j == len(pr.transforms) - 1 else 3, "length": 8 + len(attrs),
                "type": t.type, "id": t.id}) + attrs)
        tb = b"".join(tbytes)
        out.append(PROPOSAL_FIXED.build({
            "more": 0 if i == len(proposals) - 1 else 2, "length": 8 + len(pr.spi) + len(tb),
            "number": pr.number, "protocol": pr.protocol, "spi_size": len(pr.spi),
            "num_transforms": len(pr.transforms)}) + pr.spi + tb)
    return b"".join(out)


def build_chain(payloads: tuple[Payload, ...] | list[Payload], last_next: int = 0) -> bytes:
    """Serialise a payload chain; the last payload's Next Payload is ``last_next``."""
    out = []
    for i, p in enumerate(payloads):
        body = payload_body(p)
        nxt = payloads[i + 1].ptype if i + 1 < len(payloads) else last_next
        crit = 0x80 if isinstance(p, Unknown) and p.critical else 0
        out.append(GENERIC.build({"next_payload": nxt, "flags": crit, "length": 4 + len(body)})
                   + body)
    return b"".join(out)


def build_header(h: Header, first_payload: int, length: int) -> bytes:
    return HEADER.build({"spi_i": h.spi_i, "spi_r": h.spi_r, "next_payload": first_payload,
                         "version": IKE_VERSION, "exchange": h.exchange, "flags": h.flags,
                         "message_id": h.message_id, "length": length})


def build_message(h: Header, payloads: tuple[Payload, ...] | list[Payload]) -> bytes:
    """An unencrypted message (IKE_SA_INIT, or an unprotected error notification)."""
    chain = build_chain(payloads)
    first = payloads[0].ptype if payloads else 0
    return build_header(h, first, IKE_HEADER_LEN + len(chain)) + chain
