"""Security Association Database, inbound side (RFC 4301 §4.4.2): SPI -> SA.

A unicast inbound SA is identified by its SPI alone (RFC 4301 §4.1, RFC 4303 §2.1), so the SAD
is a dict and a lookup costs the same with 10 or 100,000 SAs.  Outbound SAs are reached through
their SPD policy (``mipsec.ipsec.spd``), not through here.

``Sad.process_inbound(outer_packet, now)`` is the inbound entry point (RFC 4301 §5.2, RFC 4303
§3.4): it reads the outer IPv4 header just far enough to find the SPI of a raw ESP packet
(protocol 50) or of ESP in UDP (RFC 3948), recognises NAT keepalives and IKE's non-ESP marker,
finds the SA and hands it the whole packet (``sa.decapsulate`` does every other check in the
fixed order: length, replay pre-check, ICV, decrypt, padding, window update, inner selector).
Remote input never raises out of it: it returns the inner packet or a ``DropReason``.

Drops that happen before an SA is known (no SA for the SPI, not ESP, truncated, fragment,
keepalive) are counted in ``Sad.drops``; the SA counts the ones it finds itself.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mipsec.drops import DropReason
from mipsec.errors import Dropped, ParseError, UsageError

if TYPE_CHECKING:
    from mipsec.ipsec.sa import SecurityAssociation

# --- specification constants (RFC 791, RFC 4303, RFC 3948) ------------------------------------
_IPPROTO_UDP = 17             # RFC 768
_IPPROTO_ESP = 50             # RFC 4303 §2
_IPV4_MIN_HEADER = 20         # RFC 791 §3.1
_UDP_HEADER_BYTES = 8         # RFC 768
_FRAGMENT_MASK = 0x3FFF       # RFC 791: MF flag + fragment offset; non-zero = a fragment
_NAT_KEEPALIVE = 0xFF         # RFC 3948 §2.3: one-octet UDP payload 0xFF
_SPI_MIN = 256                # RFC 4303 §2.1: 1..255 reserved, 0 local use: never on the wire

# Outer IPv4 fields read at fixed offsets: version/IHL (0), flags + fragment offset (6),
# protocol (9).
_OUTER = struct.Struct("!B5xHxB")
_SPI = struct.Struct("!I")
_unpack_spi = _SPI.unpack_from
# The same fields plus the SPI right after a 20-byte header (raw ESP, RFC 4303 §2.1).
_FAST_ESP = struct.Struct("!B5xHxB10xI")
_FAST_ESP_BYTES = _FAST_ESP.size
_unpack_fast_esp = _FAST_ESP.unpack_from
_UDP_SPI_OFFSET = _IPV4_MIN_HEADER + _UDP_HEADER_BYTES   # RFC 3948 §2.1


def find_spi(outer_packet: bytes) -> int | DropReason:
    """The SPI of an outer ESP packet (raw, or UDP-encapsulated per RFC 3948), or why not.

    Only what is needed to find the SPI is checked here; ``sa.decapsulate`` checks the rest.
    Never raises for bytes input.
    """
    n = len(outer_packet)
    if n < _IPV4_MIN_HEADER:
        return DropReason.TRUNCATED
    vihl, frag, proto = _OUTER.unpack_from(outer_packet)
    if vihl >> 4 != 4:
        return DropReason.BAD_IP_VERSION
    ihl = (vihl & 0x0F) << 2
    if ihl < _IPV4_MIN_HEADER or ihl > n:
        return DropReason.BAD_IP_HEADER_LENGTH
    if frag & _FRAGMENT_MASK:
        return DropReason.IP_FRAGMENT          # RFC 4303 §3.4.1: we do not reassemble
    if proto == _IPPROTO_ESP:
        offset = ihl
    elif proto == _IPPROTO_UDP:
        offset = ihl + _UDP_HEADER_BYTES       # RFC 3948 §2.1: ESP right after the UDP header
        if n == offset + 1 and outer_packet[offset] == _NAT_KEEPALIVE:
            return DropReason.NAT_KEEPALIVE    # RFC 3948 §2.3
        if n < offset + 4:
            return DropReason.TRUNCATED
    else:
        return DropReason.WRONG_PROTOCOL
    if n < offset + 4:
        return DropReason.TRUNCATED
    spi: int = _SPI.unpack_from(outer_packet, offset)[0]
    if spi == 0 and proto == _IPPROTO_UDP:
        return DropReason.WRONG_PROTOCOL       # RFC 3948 §2.2: non-ESP marker, IKE's traffic
    return spi


class Sad:
    """Inbound SAs keyed by SPI."""

    def __init__(self, sas: list[SecurityAssociation] | None = None):
        self._sas: dict[int, SecurityAssociation] = {}
        self.drops: Counter[DropReason] = Counter()
        for sa in sas or ():
            self.add(sa)

    def add(self, sa: SecurityAssociation) -> SecurityAssociation:
        """Install an inbound SA under ``sa.spi``; a second SA with the same SPI is refused."""
        spi = getattr(sa, "spi", None)
        if not isinstance(spi, int) or not _SPI_MIN <= spi <= 0xFFFFFFFF:
            raise UsageError(f"Sad.add: SA has no valid SPI ({spi!r}; RFC 4303 §2.1 wants "
                             f"{_SPI_MIN}..0xffffffff)")
        if spi in self._sas:
            raise UsageError(f"Sad.add: SPI 0x{spi:08x} is already in the SAD")
        self._sas[spi] = sa
        return sa

    def remove(self, spi: int) -> SecurityAssociation:
        """Remove and return the SA with ``spi``."""
        try:
            return self._sas.pop(spi)
        except KeyError:
            raise UsageError(f"Sad.remove: no SA with SPI {spi!r}") from None

    def get(self, spi: int) -> SecurityAssociation | None:
        return self._sas.get(spi)

    @property
    def by_spi(self) -> dict[int, SecurityAssociation]:
        """The SPI -> SA table itself, for a data path that looks SPIs up without a call
        (read it only: ``add`` and ``remove`` keep it)."""
        return self._sas

    def lookup(self, outer_packet: bytes) -> SecurityAssociation | DropReason:
        """The SA an outer packet is for, or the DropReason (not counted: no state changes)."""
        spi = find_spi(outer_packet)
        if isinstance(spi, DropReason):
            return spi
        sa = self._sas.get(spi)
        return DropReason.UNKNOWN_SPI if sa is None else sa

    def process_inbound(self, outer_packet: bytes, now: float = 0.0) -> bytes | DropReason:
        """Decapsulate an outer packet through the SA its SPI names (RFC 4301 §5.2).

        Returns the inner IPv4 packet, or the DropReason (counted here when no SA is involved,
        by the SA otherwise).
        """
        sa = None
        # Fast path: an option-less, unfragmented packet whose SPI is at a fixed offset (raw ESP:
        # 20, ESP in UDP: 28).  Anything else, or an SPI we do not know, takes find_spi() below,
        # which gives the precise reason.
        n = len(outer_packet)
        if n >= _FAST_ESP_BYTES:
            vihl, frag, proto, spi = _unpack_fast_esp(outer_packet)
            if vihl == 0x45 and not frag & _FRAGMENT_MASK:
                if proto == _IPPROTO_ESP:
                    sa = self._sas.get(spi)
                elif proto == _IPPROTO_UDP and n >= _UDP_SPI_OFFSET + 4:
                    sa = self._sas.get(_unpack_spi(outer_packet, _UDP_SPI_OFFSET)[0])
        if sa is None:
            spi = find_spi(outer_packet)
            if isinstance(spi, DropReason):
                self.drops[spi] += 1
                return spi
            sa = self._sas.get(spi)
            if sa is None:
                self.drops[DropReason.UNKNOWN_SPI] += 1    # RFC 4303 §3.4.2
                return DropReason.UNKNOWN_SPI
        try:
            return sa.decapsulate(outer_packet, now)
        except Dropped as exc:                           # already counted by the SA
            return exc.reason
        except ParseError as exc:                        # a parser below the SA refused it
            self.drops[exc.reason] += 1
            return exc.reason

    def __len__(self) -> int:
        return len(self._sas)

    def __iter__(self) -> Iterator[SecurityAssociation]:
        return iter(list(self._sas.values()))

    def __contains__(self, spi: object) -> bool:
        return spi in self._sas

    def status(self) -> dict[str, Any]:
        """JSON-able summary for ``mipsec status``."""
        return {"sas": [f"0x{spi:08x}" for spi in self._sas],
                "drops": {str(reason): n for reason, n in self.drops.items()}}


__all__ = ["Sad", "find_spi"]
