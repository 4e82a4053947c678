"""The messages between a GW's control process and its data-plane workers (``workers = N``).

A GW with workers runs its data path in N processes; the control process (IKE, SIUs, the
Registration Requests' logic, status) keeps the role's state and tells each worker what it
must hold.  Every ESP SA is installed in exactly one worker, the one the kernel hands its
inbound SPI to (``mipsec.io.bpf.worker_of``), together with the MN's outbound SA: its sequence
counter and replay window exist in that process only.  The control process never encrypts or
decrypts ESP itself: when it must send on an MN's SA (the HA's Registration Reply after an SIU
re-pointed the SA) it asks the worker (``SendInner``), after the re-point (``Bind``) on the
same ordered channel, so the reply still leaves through the re-pointed SA.

Control -> worker: ``InstallPair``, ``AddInbound``, ``SetOutbound``, ``RemoveInbound``,
``RemoveMobile``, ``Bind``, ``Owner`` (which worker holds an MN's downlink SA: a worker that
reads the MN's downlink from its TUN queue hands it there), ``SendInner``.
Worker -> control: ``RrqSeen`` (an authenticated Registration Request: the control process
notes its care-of address and outer source for the SIU check, then forwards it), ``Report``
(counters, drops and SPIs for ``mipsec status``).

Wire format (one message per SOCK_SEQPACKET record, both ends ours): one type octet, a
two-octet length of a UTF-8 JSON object with the fields, then the packet the message carries
(if any).  Keys travel as hex.  ``decode`` raises ``ParseError`` for anything else.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from mipsec.errors import ParseError

_HEAD = struct.Struct("!BH")


@dataclass(frozen=True)
class SaSpec:
    """Everything needed to build one ESP SA in another process (keys included) and the
    state it starts from (``sequence``: last number sent; ``replay_top``: highest number seen,
    everything up to it counted as seen: the manual keys' state across restarts)."""
    spi: int
    direction: str                          # "inbound" | "outbound"
    encryption: str
    encryption_key: str                     # hex
    integrity: str | None
    integrity_key: str                      # hex
    local: str | None
    remote: str | None
    esn: bool = False
    replay_window: int = 0
    udp_local_port: int | None = None
    udp_remote_port: int | None = None
    selector: tuple[Any, ...] | None = None   # Selector(local, remote, protocol, lports, rports)
    lifetime: tuple[Any, ...] | None = None   # soft/hard seconds, soft/hard bytes
    created: float = 0.0
    sequence: int = 0
    replay_top: int = 0


@dataclass(frozen=True)
class InstallPair:
    """Install (or replace) an MN with its SA pair; its outbound SA starts unbound."""
    TYPE: ClassVar[int] = 1
    home_address: str
    home_agent: str
    allowed: tuple[str, ...]
    road_warrior: bool
    inbound: SaSpec
    outbound: SaSpec


@dataclass(frozen=True)
class AddInbound:
    """A further inbound SA of the MN (a re-key's): it decrypts from now on."""
    TYPE: ClassVar[int] = 2
    home_address: str
    sa: SaSpec


@dataclass(frozen=True)
class SetOutbound:
    """The MN's downlink moves to this (new) outbound SA, at the MN's current binding."""
    TYPE: ClassVar[int] = 3
    home_address: str
    sa: SaSpec


@dataclass(frozen=True)
class RemoveInbound:
    """An inbound SA is gone (its grace period after the Delete is over)."""
    TYPE: ClassVar[int] = 4
    spi: int


@dataclass(frozen=True)
class RemoveMobile:
    TYPE: ClassVar[int] = 5
    home_address: str


@dataclass(frozen=True)
class Bind:
    """The control process's binding of the MN: its state, care-of address, and where its
    outbound SA points (address, and UDP port with UDP encapsulation)."""
    TYPE: ClassVar[int] = 6
    home_address: str
    state: str
    care_of: str | None
    remote: str
    remote_port: int | None


@dataclass(frozen=True)
class Owner:
    """Which worker holds the MN's downlink SA (-1: none any more)."""
    TYPE: ClassVar[int] = 7
    home_address: str
    worker: int


@dataclass(frozen=True)
class SendInner:
    """Encrypt ``packet`` with the MN's outbound SA and send it; ``to_address`` (and
    ``to_port``): to there for this one packet (a REJECT's New CoA), the SA unchanged."""
    TYPE: ClassVar[int] = 8
    home_address: str
    packet: bytes
    to_address: str | None = None
    to_port: int | None = None


@dataclass(frozen=True)
class RrqSeen:
    """Worker -> control: an authenticated Registration Request of the MN of inbound SA
    ``spi`` (``packet``: the inner IPv4 packet) came from ``source`` (and UDP ``port``)."""
    TYPE: ClassVar[int] = 9
    spi: int
    source: str
    port: int | None
    packet: bytes


@dataclass(frozen=True)
class Report:
    """Worker -> control: the worker's counters, drops and SPIs (``mipsec status``)."""
    TYPE: ClassVar[int] = 10
    worker: int
    status: dict[str, Any]


Message = (InstallPair | AddInbound | SetOutbound | RemoveInbound | RemoveMobile | Bind | Owner
           | SendInner | RrqSeen | Report)
_TYPES: dict[int, type] = {cls.TYPE: cls for cls in (
    InstallPair, AddInbound, SetOutbound, RemoveInbound, RemoveMobile, Bind, Owner, SendInner,
    RrqSeen, Report)}
_SPEC_FIELDS = {f.name for f in dataclasses.fields(SaSpec)}


def encode(msg: Message) -> bytes:
    """One record: type, JSON length, JSON fields, the carried packet (if any)."""
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    packet = fields.pop("packet", b"")
    for key, value in fields.items():
        if isinstance(value, SaSpec):
            fields[key] = dataclasses.asdict(value)
    body = json.dumps(fields, separators=(",", ":")).encode()
    if len(body) > 0xFFFF:
        raise ValueError(f"{type(msg).__name__}: fields too long to encode ({len(body)} bytes)")
    return _HEAD.pack(msg.TYPE, len(body)) + body + packet


def _spec(value: Any) -> SaSpec:
    if not isinstance(value, dict) or set(value) != _SPEC_FIELDS:
        raise ParseError("worker message: not an SA specification")
    for key in ("selector", "lifetime"):
        if value[key] is not None:
            value[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value[key])
    return SaSpec(**value)


def decode(record: bytes) -> Message:
    """The message in one record; ParseError if it is not one."""
    if len(record) < _HEAD.size:
        raise ParseError("worker message: shorter than its header")
    kind, length = _HEAD.unpack_from(record)
    cls = _TYPES.get(kind)
    if cls is None:
        raise ParseError(f"worker message: unknown type {kind}")
    end = _HEAD.size + length
    if len(record) < end:
        raise ParseError("worker message: truncated fields")
    try:
        fields = json.loads(record[_HEAD.size:end])
    except ValueError:
        raise ParseError("worker message: fields are not JSON") from None
    names = [f.name for f in dataclasses.fields(cls)]
    carries = "packet" in names
    if not isinstance(fields, dict) or set(fields) != set(names) - {"packet"}:
        raise ParseError(f"worker message {cls.__name__}: wrong fields")
    if not carries and len(record) != end:
        raise ParseError(f"worker message {cls.__name__}: trailing bytes")
    if carries:
        fields["packet"] = bytes(record[end:])
    for key in ("inbound", "outbound", "sa"):
        if key in fields:
            fields[key] = _spec(fields[key])
    if "allowed" in fields:
        fields["allowed"] = tuple(fields["allowed"])
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ParseError(f"worker message {cls.__name__}: {exc}") from None
