"""Traffic selectors (RFC 4301 §4.4.1.1), seen from the local end.

A ``Selector`` names the inner packets an SA or an SPD policy covers:

* ``local`` / ``remote``: IPv4 prefixes as strings ("10.1.0.0/24", a bare address is a /32);
  ``None`` (or "*") is the wildcard ANY;
* ``protocol``: the IP protocol number (RFC 4301 "Next Layer Protocol"), ``None`` = ANY;
* ``local_ports`` / ``remote_ports``: inclusive ``(low, high)`` ranges, ``None`` = ANY.

Everything is parsed once, at construction, into ``(network_int, mask_int)`` pairs so that the
per-packet check is a handful of integer operations.  A wildcard prefix is ``(0, 0)``, which every
address matches, so the hot path has no special case for it.

Direction.  The selector is written from the local point of view: ``matches(src, dst, ...)``
takes the *local* address as ``src`` and the *remote* one as ``dst`` (the outbound orientation).
``matches_outbound(packet)`` reads an inner packet we are about to send (inner source = local),
``matches_inbound(packet)`` one we just decapsulated (inner source = remote).

Ports (RFC 4301 §4.4.1.1, §7).  Ports are read only for TCP and UDP, and only from a packet that
is not a non-first fragment.  Otherwise they are OPAQUE (``None``): OPAQUE matches a selector
whose port field is ANY and nothing else, so a policy that names ports never covers a non-first
fragment or an ICMP packet.  (ICMP type/code selectors are not supported.)

Malformed input.  A packet shorter than its IPv4 header (or not IPv4), or a TCP/UDP first fragment
too short to hold both ports, is truncated and matches no selector at all.  No method raises for
packet input.

Text form (config files and ``__str__``)::

    SELECTOR := ENDPOINT "->" ENDPOINT [ "," PROTOCOL ]
    ENDPOINT := ADDRESS [ ":" PORTS ]
    ADDRESS  := "*" | a.b.c.d | a.b.c.d/len
    PORTS    := "*" | N | N "-" M
    PROTOCOL := "*" | "any" | "tcp" | "udp" | "icmp" | "esp" | "ipip" | "gre" | N

e.g. ``Selector.parse("10.1.0.100 -> 10.1.0.0/24:434, udp")`` (local 10.1.0.100/32 to UDP port
434 anywhere in 10.1.0.0/24) and ``Selector.parse("* -> *")`` (everything).  ``str(selector)``
gives the canonical text form back, which parses to an equal selector.

``Selector.from_dict({"local": "10.1.0.0/24", "remote": "*", "protocol": "udp",
"remote_ports": "434"})`` accepts the same pieces as a mapping (ports as "N", "N-M", N or
[N, M]; protocol as a name or a number); ``to_dict()`` is its inverse.  Bad configuration raises
``ConfigError`` naming the field and value.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from typing import Any

from mipsec.errors import ConfigError

# --- specification constants ------------------------------------------------------------------
# IANA "Assigned Internet Protocol Numbers".
PROTO_ICMP = 1
PROTO_IPIP = 4        # RFC 2003 IP-in-IP
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_GRE = 47
PROTO_ESP = 50        # RFC 4303

PROTOCOL_NAMES: dict[str, int] = {
    "icmp": PROTO_ICMP, "ipip": PROTO_IPIP, "tcp": PROTO_TCP, "udp": PROTO_UDP,
    "gre": PROTO_GRE, "esp": PROTO_ESP,
}
_NAME_OF_PROTOCOL = {number: name for name, number in PROTOCOL_NAMES.items()}

# Protocols whose first 4 octets are source and destination port (RFC 793, RFC 768).
PORT_PROTOCOLS = frozenset((PROTO_TCP, PROTO_UDP))

# RFC 791 §3.1 header fields at fixed offsets: version/IHL (0), flags + fragment offset (6),
# protocol (9), source address (12), destination address (16).
_IPV4_FIELDS = struct.Struct("!B5xHxB2xII")
_IPV4_MIN_HEADER = 20
_FRAGMENT_OFFSET_MASK = 0x1FFF
_PORTS = struct.Struct("!HH")
_unpack_ipv4 = _IPV4_FIELDS.unpack_from
_unpack_ports = _PORTS.unpack_from

_ANY = ("*", "any")


def five_tuple(packet: bytes) -> tuple[int, int, int, int | None, int | None] | None:
    """``(src, dst, protocol, sport, dport)`` of an IPv4 packet as it is on the wire.

    Addresses are 32-bit integers; ports are ``None`` when OPAQUE (not TCP/UDP, or a non-first
    fragment).  Returns ``None`` for a truncated or non-IPv4 packet.  Never raises for bytes input.
    """
    if len(packet) < _IPV4_MIN_HEADER:
        return None
    vihl, frag, proto, src, dst = _IPV4_FIELDS.unpack_from(packet)
    ihl = (vihl & 0x0F) << 2
    if vihl >> 4 != 4 or ihl < _IPV4_MIN_HEADER or ihl > len(packet):
        return None
    if proto in PORT_PROTOCOLS and not frag & _FRAGMENT_OFFSET_MASK:
        if ihl + 4 > len(packet):
            return None
        sport, dport = _PORTS.unpack_from(packet, ihl)
        return src, dst, proto, sport, dport
    return src, dst, proto, None, None


def _parse_prefix(field: str, value: str | None) -> tuple[str | None, int, int, int]:
    """-> (canonical text or None, network int, mask int, prefix length)."""
    if value is None:
        return None, 0, 0, 0
    if not isinstance(value, str):
        raise ConfigError(f"selector {field}: expected an IPv4 prefix string, got {value!r}")
    text = value.strip()
    if text.lower() in _ANY:
        return None, 0, 0, 0
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"selector {field}: {value!r} is not an IPv4 prefix ({exc})") from None
    if net.prefixlen == 0:
        return None, 0, 0, 0
    return str(net), int(net.network_address), int(net.netmask), net.prefixlen


# a port range as configured: (low, high), one port, "low-high" or "any" text, or None (any)
PortRange = tuple[int, int] | int | str | None


def _parse_ports(field: str, value: PortRange) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _ANY:
            return None
        low_text, sep, high_text = text.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if sep else low
        except ValueError:
            raise ConfigError(f"selector {field}: {value!r} is not a port or port range") from None
    elif isinstance(value, bool):
        raise ConfigError(f"selector {field}: {value!r} is not a port or port range")
    elif isinstance(value, int):
        low = high = value
    else:
        try:
            low, high = value
        except (TypeError, ValueError):
            raise ConfigError(f"selector {field}: {value!r} is not a port or port range") from None
        if not isinstance(low, int) or not isinstance(high, int) or isinstance(low, bool) \
                or isinstance(high, bool):
            raise ConfigError(f"selector {field}: {value!r} is not a port or port range")
    if not 0 <= low <= high <= 0xFFFF:
        raise ConfigError(f"selector {field}: {value!r} is not a range within 0..65535")
    if (low, high) == (0, 0xFFFF):
        return None  # the full range is ANY
    return low, high


def _parse_protocol(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _ANY:
            return None
        if text in PROTOCOL_NAMES:
            return PROTOCOL_NAMES[text]
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"selector protocol: unknown protocol {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise ConfigError(f"selector protocol: {value!r} is not a protocol number 0..255")
    return value


def _format_endpoint(prefix: str | None, ports: tuple[int, int] | None) -> str:
    text = "*" if prefix is None else prefix.removesuffix("/32")
    if ports is not None:
        low, high = ports
        text += f":{low}" if low == high else f":{low}-{high}"
    return text


class Selector:
    """An immutable traffic selector; see the module docstring for the semantics."""

    __slots__ = (
        "local", "remote", "protocol", "local_ports", "remote_ports",
        "local_net", "local_mask", "local_prefixlen",
        "remote_net", "remote_mask", "remote_prefixlen",
        "_lp_low", "_lp_high", "_rp_low", "_rp_high", "_has_ports", "_hash",
    )
    # set once in __init__ through object.__setattr__ (the class refuses assignment)
    local: str | None
    remote: str | None
    protocol: int | None
    local_ports: tuple[int, int] | None
    remote_ports: tuple[int, int] | None
    local_net: int
    local_mask: int
    local_prefixlen: int
    remote_net: int
    remote_mask: int
    remote_prefixlen: int
    _lp_low: int
    _lp_high: int
    _rp_low: int
    _rp_high: int
    _has_ports: bool
    _hash: int

    def __init__(self, local: str | None = None, remote: str | None = None,
                 protocol: int | str | None = None,
                 local_ports: PortRange = None, remote_ports: PortRange = None):
        set_ = object.__setattr__
        local_text, lnet, lmask, llen = _parse_prefix("local", local)
        remote_text, rnet, rmask, rlen = _parse_prefix("remote", remote)
        lports = _parse_ports("local_ports", local_ports)
        rports = _parse_ports("remote_ports", remote_ports)
        proto = _parse_protocol(protocol)
        if (lports or rports) and proto is not None and proto not in PORT_PROTOCOLS:
            raise ConfigError(
                f"selector: ports given with protocol {proto}, which has no ports "
                f"(only tcp and udp do)")
        set_(self, "local", local_text)
        set_(self, "remote", remote_text)
        set_(self, "protocol", proto)
        set_(self, "local_ports", lports)
        set_(self, "remote_ports", rports)
        set_(self, "local_net", lnet)
        set_(self, "local_mask", lmask)
        set_(self, "local_prefixlen", llen)
        set_(self, "remote_net", rnet)
        set_(self, "remote_mask", rmask)
        set_(self, "remote_prefixlen", rlen)
        # -1 / -1 disables a port check: every real port (0..65535) passes "low <= p <= high"
        # only when a range is set, and the None check comes first (see matches()).
        set_(self, "_lp_low", lports[0] if lports else -1)
        set_(self, "_lp_high", lports[1] if lports else -1)
        set_(self, "_rp_low", rports[0] if rports else -1)
        set_(self, "_rp_high", rports[1] if rports else -1)
        set_(self, "_has_ports", lports is not None or rports is not None)
        set_(self, "_hash", hash(self._key()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Selector is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Selector is immutable")

    # --- the per-packet checks ------------------------------------------------------------------

    def matches(self, src: int, dst: int, protocol: int,
                sport: int | None, dport: int | None) -> bool:
        """Does the flow local ``src`` -> remote ``dst`` match?  Ports ``None`` mean OPAQUE."""
        if (src & self.local_mask) != self.local_net or (dst & self.remote_mask) != self.remote_net:
            return False
        if self.protocol is not None and protocol != self.protocol:
            return False
        if self._lp_low >= 0 and (sport is None or not self._lp_low <= sport <= self._lp_high):
            return False
        if self._rp_low >= 0 and (dport is None or not self._rp_low <= dport <= self._rp_high):
            return False
        return True

    # matches_outbound / matches_inbound are five_tuple() + matches() written out inline: they
    # run once per packet on the ESP path (RFC 4301 §5.1 outbound, §5.2 step 4 inbound), where a
    # Python call costs about as much as the whole check.

    def matches_outbound(self, packet: bytes) -> bool:
        """An inner packet we send: its source is local, its destination remote."""
        n = len(packet)
        if n < _IPV4_MIN_HEADER:
            return False
        vihl, frag, proto, src, dst = _unpack_ipv4(packet)
        if vihl == 0x45:
            ihl = _IPV4_MIN_HEADER
        else:
            ihl = (vihl & 0x0F) << 2
            if vihl >> 4 != 4 or ihl < _IPV4_MIN_HEADER or ihl > n:
                return False
        if (src & self.local_mask) != self.local_net or (dst & self.remote_mask) != self.remote_net:
            return False
        if self.protocol is not None and proto != self.protocol:
            return False
        if (proto == PROTO_TCP or proto == PROTO_UDP) and not frag & _FRAGMENT_OFFSET_MASK:
            if ihl + 4 > n:
                return False
            if self._has_ports:
                sport, dport = _unpack_ports(packet, ihl)
                if self._lp_low >= 0 and not self._lp_low <= sport <= self._lp_high:
                    return False
                if self._rp_low >= 0 and not self._rp_low <= dport <= self._rp_high:
                    return False
            return True
        return not self._has_ports   # OPAQUE ports match only ANY

    def matches_inbound(self, packet: bytes) -> bool:
        """An inner packet we received: its source is remote, its destination local."""
        n = len(packet)
        if n < _IPV4_MIN_HEADER:
            return False
        vihl, frag, proto, src, dst = _unpack_ipv4(packet)
        if vihl == 0x45:
            ihl = _IPV4_MIN_HEADER
        else:
            ihl = (vihl & 0x0F) << 2
            if vihl >> 4 != 4 or ihl < _IPV4_MIN_HEADER or ihl > n:
                return False
        if (dst & self.local_mask) != self.local_net or (src & self.remote_mask) != self.remote_net:
            return False
        if self.protocol is not None and proto != self.protocol:
            return False
        if (proto == PROTO_TCP or proto == PROTO_UDP) and not frag & _FRAGMENT_OFFSET_MASK:
            if ihl + 4 > n:
                return False
            if self._has_ports:
                sport, dport = _unpack_ports(packet, ihl)
                if self._lp_low >= 0 and not self._lp_low <= dport <= self._lp_high:
                    return False
                if self._rp_low >= 0 and not self._rp_low <= sport <= self._rp_high:
                    return False
            return True
        return not self._has_ports   # OPAQUE ports match only ANY

    # --- properties the SPD index uses ---------------------------------------------------------

    @property
    def is_any(self) -> bool:
        """True when the selector matches every (well-formed) packet."""
        return (self.local is None and self.remote is None and self.protocol is None
                and self.local_ports is None and self.remote_ports is None)

    @property
    def remote_host(self) -> int | None:
        """The remote address as an int when ``remote`` is a single host (/32), else None."""
        return self.remote_net if self.remote_prefixlen == 32 else None

    @property
    def local_host(self) -> int | None:
        """The local address as an int when ``local`` is a single host (/32), else None."""
        return self.local_net if self.local_prefixlen == 32 else None

    def reversed(self) -> Selector:
        """The same traffic seen from the other end (local and remote swapped)."""
        return Selector(self.remote, self.local, self.protocol, self.remote_ports,
                        self.local_ports)

    # --- text and dict forms ----------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parse the text form documented in the module docstring."""
        if not isinstance(text, str):
            raise ConfigError(f"selector: expected a string, got {text!r}")
        body, comma, proto_text = text.partition(",")
        left, arrow, right = body.partition("->")
        if not arrow or "->" in right or "," in proto_text:
            raise ConfigError(f"selector {text!r}: expected 'LOCAL -> REMOTE [, PROTOCOL]'")
        if comma and not proto_text.strip():
            raise ConfigError(f"selector {text!r}: empty protocol after ','")

        def endpoint(part: str, side: str) -> tuple[str, str | None]:
            part = part.strip()
            if not part:
                raise ConfigError(f"selector {text!r}: empty {side} address")
            address, colon, ports = part.partition(":")
            if colon and not ports.strip():
                raise ConfigError(f"selector {text!r}: empty {side} port after ':'")
            return address, (ports if colon else None)

        local, local_ports = endpoint(left, "local")
        remote, remote_ports = endpoint(right, "remote")
        return cls(local, remote, proto_text if comma else None, local_ports, remote_ports)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selector:
        """Build from a mapping with the constructor's keys (all optional)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"selector: expected a mapping, got {data!r}")
        known = {"local", "remote", "protocol", "local_ports", "remote_ports"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"selector: unknown keys {sorted(unknown)} "
                              f"(known: {sorted(known)})")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able mapping that ``from_dict`` turns back into an equal selector."""
        return {
            "local": self.local, "remote": self.remote, "protocol": self.protocol,
            "local_ports": list(self.local_ports) if self.local_ports else None,
            "remote_ports": list(self.remote_ports) if self.remote_ports else None,
        }

    def __str__(self) -> str:
        text = (f"{_format_endpoint(self.local, self.local_ports)} -> "
                f"{_format_endpoint(self.remote, self.remote_ports)}")
        if self.protocol is not None:
            text += f", {_NAME_OF_PROTOCOL.get(self.protocol, str(self.protocol))}"
        return text

    def __repr__(self) -> str:
        return f"Selector.parse({str(self)!r})"

    def _key(self) -> tuple[str | None, str | None, int | None, tuple[int, int] | None,
                            tuple[int, int] | None]:
        return (self.local, self.remote, self.protocol, self.local_ports, self.remote_ports)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selector):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Selector], tuple[object, ...]]:
        return (Selector, self._key())


ANY = Selector()
"""The selector that matches every packet (``* -> *``)."""

__all__ = ["Selector", "ANY", "five_tuple", "PROTOCOL_NAMES", "PORT_PROTOCOLS",
           "PROTO_ICMP", "PROTO_IPIP", "PROTO_TCP", "PROTO_UDP", "PROTO_GRE", "PROTO_ESP"]
