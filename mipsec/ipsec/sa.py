"""One ESP security association in tunnel mode (RFC 4303, RFC 4301), sans-I/O.

``SecurityAssociation.encapsulate(inner)`` returns the whole outer IPv4 packet (raw ESP, protocol
50, or ESP-in-UDP per RFC 3948); ``decapsulate(outer)`` returns the inner IPv4 packet or raises
``Dropped(reason)`` after counting ``reason`` in ``sa.counters.drops``.  Nothing else changes on
a drop, except where RFC 4301 §5.2 orders otherwise (the inner selector check comes after the
replay window update, as in the fixed order below).

Inbound order (docs/design.md, style.md item 8), each step cheaper than the next and none of
them revealing anything about the keys:

1. outer IPv4 framing: version, IHL, total length, header checksum, fragment, protocol
   (and for UDP encapsulation: UDP length, port, NAT-keepalive, non-ESP marker);
2. ESP length (header + IV + ICV + one block) and, for CBC, ciphertext a multiple of 16;
3. SPI match; outer source (only if ``remote`` is set) and destination (if ``local`` is set);
4. lifetime (hard expiry refuses everything);
5. replay pre-check (no change);  6. ICV in constant time (AEAD: tag);  7. decrypt;
8. padding 1, 2, 3 ... (RFC 4303 §2.4) and next header (4; 59 = dummy);
9. replay window update, only now;  10. inner selector check;  11. counters.

A CBC padding error can only be seen after the ICV verified, so to a sender without the key it
is indistinguishable from an ICV error (both look like "dropped").

Outer header choices for encapsulation: TTL 64 (``OUTER_TTL``); TOS byte (DSCP and ECN) copied
from the inner header (RFC 4301 §5.1.2.1 copies DSCP; RFC 6040 normal mode copies ECN); DF copied
from the inner header (RFC 4301 §8.1, the "copy" default) so path MTU discovery keeps working;
identification from a per-SA 16-bit counter; UDP checksum 0 (RFC 3948 §2.1).  Decapsulation
does not propagate outer ECN CE into the inner header (a documented limitation).
"""

from __future__ import annotations

import enum
import hmac
import math
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag

from mipsec.crypto.transforms import (
    ENCRYPTION,
    INTEGRITY,
    RANDOM_POOL_BYTES,
    Aead,
    CbcHmac,
    NullHmac,
    make_transform,
)
from mipsec.drops import DropReason
from mipsec.errors import ConfigError, Dropped, SaExhausted, UsageError
from mipsec.ipsec.constants import (
    ESP_HEADER_BYTES,
    IPPROTO_ESP,
    IPPROTO_IPIP,
    IPPROTO_UDP,
    NAT_T_PORT,
    NEXT_HEADER_NO_NEXT,
    NON_ESP_MARKER,
    OUTER_TTL,
    REPLAY_WINDOW_BITS,
    SEQ_MAX_32,
    SEQ_MAX_64,
)
from mipsec.ipsec.replay import ReplayWindow
from mipsec.ipsec.selector import Selector
from mipsec.wire.ipv4 import addr_to_bytes, bytes_to_addr

_II = struct.Struct("!II")
_I = struct.Struct("!I")
_pack_i = _I.pack
_pack_iii = struct.Struct("!III").pack
_unpack_ii = _II.unpack_from
_unpack_header = struct.Struct("!HHHHHHQ").unpack_from
_unpack_udp = struct.Struct("!HHHH").unpack_from
_from_bytes = int.from_bytes
_compare_digest = hmac.compare_digest
_AEAD, _CBC, _NULL = 0, 1, 2                 # transform kinds, inlined on the hot path
_PADDING = bytes(range(1, 256))   # RFC 4303 §2.4: the default padding is 1, 2, 3, ...
_TAILS = [_PADDING[:n] + bytes((n, IPPROTO_IPIP)) for n in range(256)]  # padding + trailer
_INF = math.inf
_KEEP: Any = object()


def _trailer_reason(plaintext: bytes, end: int, padlen: int) -> DropReason:
    """Why an authenticated trailer is not padding 1, 2, 3 ... + pad length + 4."""
    if end < 0 or plaintext[end:-2] != _PADDING[:padlen]:
        return DropReason.BAD_PADDING
    if plaintext[-1] == NEXT_HEADER_NO_NEXT:
        return DropReason.DUMMY_PACKET
    return DropReason.BAD_NEXT_HEADER


class Direction(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True)
class UdpEncap:
    """ESP-in-UDP (RFC 3948).  Outbound: source local_port, destination remote_port.  Inbound:
    the destination port must be local_port; the source port is not checked (a NAT rewrites it).
    """
    local_port: int = NAT_T_PORT
    remote_port: int = NAT_T_PORT

    def __post_init__(self) -> None:
        for name in ("local_port", "remote_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 < port <= 0xFFFF:
                raise ConfigError(f"UdpEncap {name} {port!r}: must be a port in 1 .. 65535")


@dataclass(frozen=True)
class Lifetime:
    """SA lifetimes (RFC 4301 §4.4.2.1).  None = no limit.  Bytes count inner packet bytes.

    Soft: ``sa.needs_rekey`` becomes True.  Hard: ``sa.expired`` becomes True and the SA refuses
    every packet both ways (``SA_EXPIRED``).
    """
    soft_seconds: float | None = None
    hard_seconds: float | None = None
    soft_bytes: int | None = None
    hard_bytes: int | None = None

    def __post_init__(self) -> None:
        for kind in ("seconds", "bytes"):
            soft, hard = getattr(self, "soft_" + kind), getattr(self, "hard_" + kind)
            for name, value in (("soft_" + kind, soft), ("hard_" + kind, hard)):
                if value is not None and value <= 0:
                    raise ConfigError(f"lifetime: {name} = {value!r} must be positive")
            if soft is not None and hard is not None and soft > hard:
                raise ConfigError(f"lifetime: soft_{kind} {soft} exceeds hard_{kind} {hard}")


class SelectorLike(Protocol):
    def matches_inbound(self, packet: bytes) -> bool: ...
    def matches_outbound(self, packet: bytes) -> bool: ...


class PacketFunction(Protocol):
    """``sa.encapsulate`` / ``sa.decapsulate``: a packet in, a packet out (or ``Dropped``)."""
    def __call__(self, packet: bytes, /, now: float = 0.0) -> bytes: ...


class SaCounters:
    """Per-SA counters.  ``octets`` counts inner packet bytes; ``drops`` counts by reason."""

    __slots__ = ("packets", "octets", "drops", "last_authenticated_time", "_last_source")

    def __init__(self) -> None:
        self.packets = 0
        self.octets = 0
        self.drops: Counter[DropReason] = Counter()
        self.last_authenticated_time: float | None = None
        self._last_source: int | None = None     # as an integer (the data path's form)

    @property
    def last_authenticated_source(self) -> str | None:
        """Outer source address of the last authenticated inbound packet."""
        raw = self._last_source
        return None if raw is None else bytes_to_addr(raw.to_bytes(4, "big"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "packets": self.packets,
            "octets": self.octets,
            "drops": {str(reason): n for reason, n in sorted(self.drops.items()) if n},
            "last_authenticated_time": self.last_authenticated_time,
            "last_authenticated_source": self.last_authenticated_source,
        }


def _addr(field: str, value: str | None) -> bytes | None:
    if value is None or value == "*":
        return None
    try:
        return addr_to_bytes(value)
    except (ValueError, AttributeError):
        raise ConfigError(f"SA {field}: {value!r} is not an IPv4 address") from None


class SecurityAssociation:
    """An ESP tunnel-mode SA, one direction.  See the module docstring and docs/design.md."""

    __slots__ = (
        "spi", "direction", "esn", "udp_encap", "_selector", "lifetime", "counters", "replay",
        "sequence", "needs_rekey", "expired", "created", "transform",
        "encryption", "integrity", "_encryption_key", "_integrity_key",
        "_local", "_remote", "_seq_max", "_min_esp", "_ident", "_deadline", "_byte_limit",
        "_inbound", "_kind", "_max_inner", "encapsulate", "decapsulate", "_configure",
    )
    # the data path: per-SA closures (see _build_data_path)
    encapsulate: PacketFunction
    decapsulate: PacketFunction
    _configure: Callable[[], None]
    _deadline: float               # next time the lifetime state changes (inf: never)
    _byte_limit: float             # next octet count at which it changes (inf: never)

    def __init__(
        self, *, spi: int, direction: Direction,
        encryption: str, encryption_key: bytes,
        integrity: str | None = None, integrity_key: bytes = b"",
        local: str | None, remote: str | None,
        esn: bool = False, replay_window: int = REPLAY_WINDOW_BITS,
        udp_encap: UdpEncap | None = None,
        selector: SelectorLike | None = None,
        lifetime: Lifetime | None = None, now: float = 0.0,
        random: Callable[[int], bytes] = os.urandom,
    ):
        if not isinstance(spi, int) or not 0 < spi <= SEQ_MAX_32:
            # RFC 4303 §2.1: SPI 0 is reserved and never sent
            raise ConfigError(f"SA spi {spi!r}: must be an integer in 1 .. 2**32-1")
        if not isinstance(direction, Direction):
            raise ConfigError(f"SA direction {direction!r}: must be a Direction")
        self.spi = spi
        self.direction = direction
        self._inbound = direction is Direction.INBOUND
        self.transform = make_transform(encryption, encryption_key, integrity, integrity_key,
                                        random)
        self.encryption = encryption
        self.integrity = integrity
        self._encryption_key = bytes(encryption_key)
        self._integrity_key = bytes(integrity_key)
        t = self.transform
        if isinstance(t, Aead):
            self._kind = _AEAD
        else:
            self._kind = _CBC if isinstance(t, CbcHmac) else _NULL
        # RFC 4303 §2: header, IV, at least the 2-byte trailer (one block for CBC), ICV
        self._min_esp = ESP_HEADER_BYTES + t.iv_size + max(2, t.block_size) + t.icv_size
        self.esn = bool(esn)
        self._seq_max = SEQ_MAX_64 if esn else SEQ_MAX_32
        self.sequence = 0              # last sequence number sent (outbound)
        self.replay = ReplayWindow(replay_window)
        if udp_encap is not None and not isinstance(udp_encap, UdpEncap):
            raise ConfigError(f"SA udp_encap {udp_encap!r}: must be a UdpEncap")
        self.udp_encap = udp_encap
        self._selector = selector
        self.counters = SaCounters()
        self.needs_rekey = False
        self.expired = False
        if lifetime is not None and not isinstance(lifetime, Lifetime):
            raise ConfigError(f"SA lifetime {lifetime!r}: must be a Lifetime")
        self.lifetime = lifetime
        self.created = now
        self._ident = 0
        self._max_inner = 0            # outbound: the largest inner packet (set with the data path)
        self._local: bytes | None = None
        self._remote: bytes | None = None
        self._set_addresses(local, remote)
        self._next_lifetime_limits()
        self._build_data_path()

    # --- configuration ------------------------------------------------------------------------
    def _set_addresses(self, local: str | None, remote: str | None) -> None:
        local_b = _addr("local", local)
        remote_b = _addr("remote", remote)
        if not self._inbound and (local_b is None or remote_b is None):
            raise ConfigError("outbound SA: both local (outer source) and remote (outer "
                              "destination) addresses are required")
        self._local, self._remote = local_b, remote_b

    def rebind(self, local: str | None = _KEEP, remote: str | None = _KEEP,
               udp_encap: UdpEncap | None = _KEEP) -> None:
        """Re-point the outer addresses (and optionally the UDP ports) in place.

        Keys, the sequence counter, the replay window and with them all nonce state are kept,
        so an AEAD nonce is never reused across a handover.
        """
        new_local = bytes_to_addr(self._local) if self._local else None
        new_remote = bytes_to_addr(self._remote) if self._remote else None
        if local is not _KEEP:
            new_local = local
        if remote is not _KEEP:
            new_remote = remote
        if udp_encap is not _KEEP:
            if udp_encap is not None and not isinstance(udp_encap, UdpEncap):
                raise ConfigError(f"SA udp_encap {udp_encap!r}: must be a UdpEncap")
            if (udp_encap is None) != (self.udp_encap is None):
                raise UsageError("rebind cannot switch between raw ESP and UDP encapsulation")
            self.udp_encap = udp_encap
        self._set_addresses(new_local, new_remote)
        self._configure()

    @property
    def selector(self) -> SelectorLike | None:
        """The inner-packet selector checked per packet (None: no check)."""
        return self._selector

    @selector.setter
    def selector(self, selector: SelectorLike | None) -> None:
        self._selector = selector
        self._configure()

    @property
    def local(self) -> str | None:
        return bytes_to_addr(self._local) if self._local else None

    @property
    def remote(self) -> str | None:
        return bytes_to_addr(self._remote) if self._remote else None

    # --- lifetimes --------------------------------------------------------------------------
    def _next_lifetime_limits(self) -> None:
        """The next time / byte count at which the lifetime state changes."""
        lt = self.lifetime
        if self.expired:
            self._deadline, self._byte_limit = -_INF, -1
            return
        if lt is None:
            self._deadline, self._byte_limit = _INF, _INF
            return
        time_limits = [lt.hard_seconds] + ([] if self.needs_rekey else [lt.soft_seconds])
        byte_limits = [lt.hard_bytes] + ([] if self.needs_rekey else [lt.soft_bytes])
        self._deadline = min((self.created + t for t in time_limits if t is not None),
                             default=_INF)
        self._byte_limit = min((b for b in byte_limits if b is not None), default=_INF)

    def _update_lifetime(self, now: float) -> None:
        """Set ``needs_rekey`` / ``expired`` for ``now`` and the octets so far."""
        lt = self.lifetime
        octets = self.counters.octets
        if lt is not None and not self.expired:
            if ((lt.soft_seconds is not None and now >= self.created + lt.soft_seconds)
                    or (lt.soft_bytes is not None and octets >= lt.soft_bytes)):
                self.needs_rekey = True
            if ((lt.hard_seconds is not None and now >= self.created + lt.hard_seconds)
                    or (lt.hard_bytes is not None and octets >= lt.hard_bytes)):
                self.needs_rekey = True
                self.expired = True
        self._next_lifetime_limits()

    def _lifetime_reached(self, now: float) -> None:
        self._update_lifetime(now)
        if self.expired:
            # RFC 4301 §4.4.2.1: past the hard lifetime the SA must not be used
            raise self._drop(DropReason.SA_EXPIRED)

    def poll(self, now: float) -> None:
        """Update ``needs_rekey`` / ``expired`` for the time ``now`` without a packet."""
        if now >= self._deadline or self.counters.octets >= self._byte_limit:
            self._update_lifetime(now)

    # --- data path --------------------------------------------------------------------------
    # ``encapsulate`` and ``decapsulate`` are not methods: they are per-SA closures stored in
    # slots of the same name (``_build_data_path``), specialised at construction to the SA's
    # transform family, so that per packet every constant is a closure variable (LOAD_DEREF)
    # rather than an attribute of ``self``.  ``rebind`` and a new ``selector`` update those
    # variables in place (``_configure``), so a reference to ``sa.encapsulate`` taken before a
    # rebind stays valid.  See ``_outbound_path`` / ``_inbound_path`` below the class.

    def _drop(self, reason: DropReason) -> Dropped:
        self.counters.drops[reason] += 1
        return Dropped(reason)

    def _build_data_path(self) -> None:
        if self._inbound:
            self.decapsulate, self._configure = _inbound_path(self)
            self.encapsulate = _wrong_direction(self, "inbound", "encapsulate")
        else:
            self.encapsulate, self._configure = _outbound_path(self)
            self.decapsulate = _wrong_direction(self, "outbound", "decapsulate")
        self._configure()

    # --- status ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-able status (``mipsec status``): no key material."""
        return {
            "spi": f"0x{self.spi:08x}",
            "direction": self.direction.value,
            "local": self.local,
            "remote": self.remote if self._remote is not None else "*",
            "encryption": self.encryption,
            "integrity": self.integrity,
            "esn": self.esn,
            "udp_encap": (None if self.udp_encap is None else
                          {"local_port": self.udp_encap.local_port,
                           "remote_port": self.udp_encap.remote_port}),
            "sequence": self.sequence,
            "replay_window": {"size": self.replay.size, "top": self.replay.top},
            "needs_rekey": self.needs_rekey,
            "expired": self.expired,
            "counters": self.counters.as_dict(),
        }

    def tshark_esp_sa_entry(self) -> list[str]:
        """This SA as one record of Wireshark's ``esp_sa`` table (see ``esp_sa_uat_record``)."""
        return tshark_esp_sa_fields(self)

    def __repr__(self) -> str:
        return (f"<SecurityAssociation spi=0x{self.spi:08x} {self.direction.value} "
                f"{self.encryption}/{self.integrity} {self.local}->{self.remote}>")


# --- the per-SA data path -------------------------------------------------------------------------
# Measured on CPython 3.11 (benchmarks/README.md): at 64 bytes the crypto call itself is 0.6 us
# (GCM) to 1.5 us (CBC + HMAC); everything else per packet is interpreter work, so these
# closures keep it to the steps the RFCs require, on closure variables, with no call that can be
# avoided.  Both closures follow exactly the order of the module docstring.

_SEL_NONE, _SEL_ANY, _SEL_ADDRESSES, _SEL_GENERAL = range(4)


def _selector_plan(selector: Any) -> tuple[int, int, int, int, int]:
    """How the data path checks ``selector``: (kind, mask/net of both ends).

    A ``Selector`` without protocol and ports, on a packet whose first byte is 0x45 and that is
    at least 24 bytes long, matches exactly when its address prefixes do (that is what
    ``matches_inbound`` / ``matches_outbound`` compute for such a packet: no options, ports
    present if any), so the data path compares the prefixes itself; every other case (a packet
    with options, a short one, a selector with protocol or ports, any other selector object)
    goes through the selector's method.  The wildcard ANY needs no comparison at all.
    """
    if selector is None:
        return _SEL_NONE, 0, 0, 0, 0
    if type(selector) is not Selector or selector.protocol is not None \
            or selector.local_ports is not None or selector.remote_ports is not None:
        return _SEL_GENERAL, 0, 0, 0, 0
    kind = _SEL_ANY if selector.is_any else _SEL_ADDRESSES
    return (kind, selector.local_mask, selector.local_net, selector.remote_mask,
            selector.remote_net)



def _no_selector(packet: bytes) -> bool:
    """An SA without a selector lets every inner packet through (never called: its plan is
    _SEL_NONE, so the data path skips the check)."""
    return True


def _wrong_direction(sa: SecurityAssociation, direction: str,
                     operation: str) -> PacketFunction:
    def refuse(packet: bytes, now: float = 0.0) -> bytes:
        raise UsageError(f"SA 0x{sa.spi:08x} is {direction}: it cannot {operation}")
    refuse.__doc__ = f"Refuses: an {direction} SA cannot {operation}."
    return refuse


def _outbound_path(sa: SecurityAssociation) -> tuple[PacketFunction, Callable[[], None]]:
    """(encapsulate, configure) for an outbound SA."""
    t = sa.transform
    counters = sa.counters
    drops = counters.drops
    spi = sa.spi
    esn = sa.esn
    seq_max = sa._seq_max
    align_mask = t.align - 1
    trailers = _TAILS[:t.align]
    icv = t.icv_size
    aead = sa._kind == _AEAD
    cbc = sa._kind == _CBC
    udp = sa.udp_encap is not None
    esp_start = 28 if udp else 20
    # total length = overhead + len(padded plaintext)
    overhead = esp_start + ESP_HEADER_BYTES + t.iv_size + icv
    max_inner = sa._max_inner = 0xFFFF - overhead - 2 - align_mask
    ttl_proto = OUTER_TTL << 8 | (IPPROTO_UDP if udp else IPPROTO_ESP)
    # One struct packs outer IPv4 header [+ UDP header] + ESP header [+ AEAD IV]: the version
    # and TOS, TTL and protocol go in as 16-bit words, both addresses as one 8-byte field, and
    # SPI + sequence number as one 64-bit field (the sequence number is 32 bits without ESN).
    fmt = "!HHHHHH8s" + ("HHHH" if udp else "") + ("II" if esn else "Q") + ("Q" if aead else "")
    pack = struct.Struct(fmt).pack
    spi_high = spi << 32
    if isinstance(t, Aead):
        aead_encrypt, salt = t.encrypt, t.salt
    elif isinstance(t, CbcHmac):
        hmac_copy = t.hmac.keyed.copy
        cbc_encrypt, random = t.encrypt_update, t.random
    elif isinstance(t, NullHmac):
        hmac_copy = t.hmac.keyed.copy
    pool, pool_pos = b"", RANDOM_POOL_BYTES     # CBC random blocks, see mipsec.crypto.transforms
    # set by configure(): addresses, UDP ports, checksum base, selector plan
    addresses = b""
    sport = dport = csum_base = 0
    sel_kind = lmask = lnet = rmask = rnet = 0
    sel_out: Callable[[bytes], bool] = _no_selector

    def configure() -> None:
        nonlocal addresses, sport, dport, csum_base, sel_kind, lmask, lnet, rmask, rnet, sel_out
        local_b, remote_b = sa._local, sa._remote
        assert local_b is not None and remote_b is not None, "checked by _set_addresses"
        addresses = local_b + remote_b
        encap = sa.udp_encap
        if encap is not None:           # rebind() keeps an SA raw or UDP: same as ``udp``
            sport, dport = encap.local_port, encap.remote_port
        # RFC 1071 sum of the constant words (version/IHL, TTL/protocol, addresses) plus the
        # constant part of the total length; per packet: + TOS + padded length + ident + DF
        csum_base = sum(struct.unpack("!4H", addresses)) + 0x4500 + ttl_proto + overhead
        sel_kind, lmask, lnet, rmask, rnet = _selector_plan(sa.selector)
        sel_out = sa.selector.matches_outbound if sa.selector is not None else _no_selector

    def encapsulate(inner_ipv4: bytes, now: float = 0.0) -> bytes:
        """ESP tunnel mode (RFC 4303 §3.1.2): the whole outer IPv4 packet for ``inner_ipv4``."""
        nonlocal pool, pool_pos
        if now >= sa._deadline or counters.octets >= sa._byte_limit:
            sa._lifetime_reached(now)
        n = len(inner_ipv4)
        if n < 20 or n > max_inner or inner_ipv4[0] >> 4 != 4:
            # no fragmentation here: the outer packet must fit in 65535 bytes (RFC 791)
            raise sa._drop(DropReason.INNER_TOO_BIG if n > max_inner else DropReason.MALFORMED)
        if sel_kind:
            # RFC 4301 §5.1: the packet must match the SA's selectors before protection
            if sel_kind == _SEL_GENERAL or inner_ipv4[0] != 0x45 or n < 24:
                if not sel_out(inner_ipv4):
                    raise sa._drop(DropReason.SELECTOR_MISMATCH)
            elif sel_kind == _SEL_ADDRESSES:
                src, dst = _unpack_ii(inner_ipv4, 12)
                if (src & lmask) != lnet or (dst & rmask) != rnet:
                    raise sa._drop(DropReason.SELECTOR_MISMATCH)
        seq = sa.sequence + 1
        if seq > seq_max:
            # RFC 4303 §3.3.3: the counter must not cycle; a new SA is needed
            sa.needs_rekey = True
            drops[DropReason.SA_EXHAUSTED] += 1
            raise SaExhausted(f"SA 0x{spi:08x}: sequence numbers exhausted")
        sa.sequence = seq
        # RFC 4303 §2.4: pad payload + 2-byte trailer to the alignment; §2.6 next header 4
        plaintext = inner_ipv4 + trailers[-(n + 2) & align_mask]
        length = len(plaintext)
        # Outer header (RFC 791): TOS byte (DSCP + ECN) and DF copied from the inner header
        tos = inner_ipv4[1]
        df = (inner_ipv4[6] & 0x40) << 8
        ident = sa._ident = (sa._ident + 1) & 0xFFFF
        # RFC 1071: the one's complement sum is the plain sum modulo 0xFFFF (as 0xFFFF, not 0,
        # for a non-zero header); the checksum is its complement.
        c = 0xFFFF - ((csum_base + tos + length + ident + df) % 0xFFFF or 0xFFFF)
        if aead:
            # RFC 4106 §3.1 / RFC 7634 §2: IV = the 64-bit sequence number; §5: AAD
            if esn:
                if udp:
                    prefix = pack(0x4500 | tos, overhead + length, ident, df, ttl_proto, c,
                                  addresses, sport, dport, overhead + length - 20, 0, spi,
                                  seq & 0xFFFFFFFF, seq)
                else:
                    prefix = pack(0x4500 | tos, overhead + length, ident, df, ttl_proto, c,
                                  addresses, spi, seq & 0xFFFFFFFF, seq)
                aad = _pack_iii(spi, seq >> 32, seq & 0xFFFFFFFF)
            else:
                if udp:
                    prefix = pack(0x4500 | tos, overhead + length, ident, df, ttl_proto, c,
                                  addresses, sport, dport, overhead + length - 20, 0,
                                  spi_high | seq, seq)
                else:
                    prefix = pack(0x4500 | tos, overhead + length, ident, df, ttl_proto, c,
                                  addresses, spi_high | seq, seq)
                aad = prefix[esp_start:esp_start + 8]
            out = prefix + aead_encrypt(salt + prefix[-8:], plaintext, aad)
        else:
            if udp:
                if esn:
                    prefix = pack(0x4500 | tos, overhead + length, ident, df, ttl_proto, c,
                                  addresses, sport, dport, overhead + length - 20, 0, spi,
                                  seq & 0xFFFFFFFF)
                else:
                    prefix = pack(0x4500 | tos, overhead + length, ident, df, ttl_proto, c,
                                  addresses, sport, dport, overhead + length - 20, 0,
                                  spi_high | seq)
            elif esn:
                prefix = pack(0x4500 | tos, overhead + length, ident, df, ttl_proto, c,
                              addresses, spi, seq & 0xFFFFFFFF)
            else:
                prefix = pack(0x4500 | tos, overhead + length, ident, df, ttl_proto, c,
                              addresses, spi_high | seq)
            if cbc:
                # RFC 3602 §3; the IV is C0, see mipsec.crypto.transforms
                pos = pool_pos
                if pos >= RANDOM_POOL_BYTES:
                    pool = random(RANDOM_POOL_BYTES)
                    pos = 0
                pool_pos = pos + 16
                body = cbc_encrypt(pool[pos:pos + 16] + plaintext)
            else:
                body = plaintext                      # RFC 2410: NULL encryption
            # RFC 4303 §3.3.4: ICV over ESP header, IV and ciphertext
            mac = hmac_copy()
            mac.update(prefix[esp_start:])
            mac.update(body)
            if esn:
                mac.update(_pack_i(seq >> 32))      # RFC 4303 §2.2.1: high half, not sent
            out = prefix + body + mac.finalize()[:icv]
        counters.packets += 1
        counters.octets += n
        return out

    return encapsulate, configure


def _inbound_path(sa: SecurityAssociation) -> tuple[PacketFunction, Callable[[], None]]:
    """(decapsulate, configure) for an inbound SA."""
    t = sa.transform
    counters = sa.counters
    drops = counters.drops
    replay = sa.replay
    replay_bits = replay.size
    replay_mask = (1 << replay.size) - 1
    infer = replay.infer
    spi = sa.spi
    esn = sa.esn
    icv = t.icv_size
    min_esp = sa._min_esp
    aead = sa._kind == _AEAD
    cbc = sa._kind == _CBC
    udp = sa.udp_encap is not None
    want_proto = IPPROTO_UDP if udp else IPPROTO_ESP
    if isinstance(t, Aead):
        aead_decrypt, salt = t.decrypt, t.salt
    elif isinstance(t, CbcHmac):
        hmac_copy = t.hmac.keyed.copy
        cbc_decrypt = t.decrypt_update
    elif isinstance(t, NullHmac):
        hmac_copy = t.hmac.keyed.copy
    # set by configure()
    udp_port = 0
    local = remote = both = None
    sel_kind = lmask = lnet = rmask = rnet = 0
    sel_in: Callable[[bytes], bool] = _no_selector

    def drop(reason: DropReason) -> Dropped:
        drops[reason] += 1
        return Dropped(reason)

    def configure() -> None:
        nonlocal udp_port, local, remote, both, sel_kind, lmask, lnet, rmask, rnet, sel_in
        encap = sa.udp_encap
        if encap is not None:           # rebind() keeps an SA raw or UDP: same as ``udp``
            udp_port = encap.local_port
        # as integers; inbound packets carry remote (source) then local (destination)
        local = None if sa._local is None else _from_bytes(sa._local, "big")
        remote = None if sa._remote is None else _from_bytes(sa._remote, "big")
        both = remote << 32 | local if remote is not None and local is not None else None
        sel_kind, lmask, lnet, rmask, rnet = _selector_plan(sa.selector)
        sel_in = sa.selector.matches_inbound if sa.selector is not None else _no_selector

    def decapsulate(outer_ipv4: bytes, now: float = 0.0) -> bytes:
        """The inner IPv4 packet of an ESP tunnel-mode packet, or raises ``Dropped``."""
        pkt = outer_ipv4
        n = len(pkt)
        # 1. outer IPv4 header (RFC 791)
        if n < 20:
            raise drop(DropReason.TRUNCATED)
        # the 20-byte header as 16-bit words with both addresses as one 64-bit field: RFC 1071
        # sums 16-bit words modulo 0xFFFF, and 2**16 == 1 modulo 0xFFFF, so the 64-bit field
        # counts as the sum of its four words
        word0, total, ident, frag, word4, csum, addrs = _unpack_header(pkt)
        if word0 >> 8 == 0x45:
            ihl = 20
            if total != n:
                raise drop(DropReason.BAD_IP_TOTAL_LENGTH)
            if (word0 + total + ident + frag + word4 + csum + addrs) % 0xFFFF:
                # the sum of a correct header is 0xFFFF (== 0 modulo 0xFFFF)
                raise drop(DropReason.BAD_IP_CHECKSUM)
        else:
            if word0 >> 12 != 4:
                raise drop(DropReason.BAD_IP_VERSION)
            ihl = (word0 >> 6) & 0x3C
            if ihl < 20 or ihl > n:
                raise drop(DropReason.BAD_IP_HEADER_LENGTH)
            if total != n:
                raise drop(DropReason.BAD_IP_TOTAL_LENGTH)
            if _from_bytes(pkt[:ihl], "big") % 0xFFFF:     # with options: the same sum
                raise drop(DropReason.BAD_IP_CHECKSUM)
        if frag & 0x3FFF:
            # RFC 4303 §3.4.1: reassembly is not ours; the outer packets must arrive whole
            raise drop(DropReason.IP_FRAGMENT)
        if word4 & 0xFF != want_proto:
            raise drop(DropReason.WRONG_PROTOCOL)
        if udp:
            off = ihl + 8
            if n < off:
                raise drop(DropReason.TRUNCATED)
            _sport, dport, ulen, _ucsum = _unpack_udp(pkt, ihl)
            if ulen != n - ihl:
                raise drop(DropReason.BAD_UDP_LENGTH)
            if dport != udp_port:
                raise drop(DropReason.WRONG_UDP_PORT)
            if n - off == 1 and pkt[off] == 0xFF:
                raise drop(DropReason.NAT_KEEPALIVE)      # RFC 3948 §2.3
            if pkt[off:off + 4] == NON_ESP_MARKER:
                raise drop(DropReason.WRONG_PROTOCOL)     # RFC 3948 §2.2: IKE, not ESP
        else:
            off = ihl
        # 2. ESP lengths (RFC 4303 §2)
        esp_len = n - off
        if esp_len < min_esp:
            raise drop(DropReason.TRUNCATED)
        if cbc and (esp_len - 24 - icv) & 15:
            raise drop(DropReason.BAD_CIPHERTEXT_LENGTH)  # RFC 3602 §3
        # 3. SPI and outer addresses
        spi_got, seq_low = _unpack_ii(pkt, off)
        if spi_got != spi:
            raise drop(DropReason.UNKNOWN_SPI)
        if both is not None:                     # both fixed: one comparison
            if addrs != both:
                if addrs >> 32 != remote:
                    raise drop(DropReason.OUTER_SOURCE_MISMATCH)
                raise drop(DropReason.OUTER_DESTINATION_MISMATCH)
        else:
            if remote is not None and addrs >> 32 != remote:
                raise drop(DropReason.OUTER_SOURCE_MISMATCH)
            if local is not None and addrs & 0xFFFFFFFF != local:
                raise drop(DropReason.OUTER_DESTINATION_MISMATCH)
        # 4. lifetime
        if now >= sa._deadline or counters.octets >= sa._byte_limit:
            sa._lifetime_reached(now)
        # 5. replay pre-check (RFC 4303 §3.4.3; ReplayWindow.check, inlined)
        if esn:
            seq = infer(seq_low)
            seq_hi = _pack_i(seq >> 32)
        else:
            seq = seq_low
        top = replay.top
        if seq <= top:                  # new highest numbers need no look at the bitmap
            diff = top - seq
            if seq == 0 or diff >= replay_bits:
                raise drop(DropReason.TOO_OLD)   # §3.3.3: the first packet has number 1
            if (replay.bitmap >> diff) & 1:
                raise drop(DropReason.REPLAYED)
        # 6-7. ICV in constant time, then decryption (RFC 4303 §3.4.4)
        if aead:
            if esn:
                aad = pkt[off:off + 4] + seq_hi + pkt[off + 4:off + 8]
            else:
                aad = pkt[off:off + 8]
            try:
                plaintext = aead_decrypt(salt + pkt[off + 8:off + 16], pkt[off + 16:], aad)
            except InvalidTag:
                raise drop(DropReason.ICV_MISMATCH) from None
        else:
            icv_at = n - icv
            mac = hmac_copy()
            mac.update(pkt[off:icv_at])
            if esn:
                mac.update(seq_hi)                 # RFC 4303 §2.2.1
            if not _compare_digest(mac.finalize()[:icv], pkt[icv_at:]):
                raise drop(DropReason.ICV_MISMATCH)
            if cbc:
                # IV || ciphertext through the persistent decryptor; block 0 is discarded
                plaintext = cbc_decrypt(pkt[off + 8:icv_at])[16:]
            else:
                plaintext = pkt[off + 8:icv_at]
        # 8. trailer (RFC 4303 §2.4, §2.6): padding 1, 2, 3 ..., pad length, next header 4, all
        #    compared at once with the expected tail; the cold path names what is wrong
        padlen = plaintext[-2]
        end = len(plaintext) - 2 - padlen
        if end < 0 or plaintext[end:] != _TAILS[padlen]:
            raise drop(_trailer_reason(plaintext, end, padlen))
        first = plaintext[0]
        if first == 0x45 and end >= 20 and (plaintext[2] << 8 | plaintext[3]) == end:
            inner = plaintext[:end]
        else:
            # an IPv4 header (RFC 791) whose IHL is at least 5 and inside its total length,
            # which ends at the trailer or before it (RFC 4303 §2.4: TFC padding after it)
            inner_total = (plaintext[2] << 8 | plaintext[3]) if end >= 20 else 0
            if (first & 0xF0) != 0x40 or not 20 <= (first & 0x0F) << 2 <= inner_total <= end:
                raise drop(DropReason.MALFORMED)
            inner = plaintext[:inner_total]
        # 9. the window moves only now (ReplayWindow.update, inlined)
        if seq > top:
            shift = seq - top
            replay.bitmap = ((replay.bitmap << shift) | 1) & replay_mask \
                if shift < replay_bits else 1
            replay.top = seq
        else:
            replay.bitmap |= 1 << (top - seq)
        counters.last_authenticated_time = now
        counters._last_source = addrs >> 32
        # 10. inner selector (RFC 4301 §5.2 step 4): remote is the source, local the destination
        if sel_kind:
            if sel_kind == _SEL_GENERAL or first != 0x45 or len(inner) < 24:
                if not sel_in(inner):
                    raise drop(DropReason.SELECTOR_MISMATCH)
            elif sel_kind == _SEL_ADDRESSES:
                src, dst = _unpack_ii(inner, 12)
                if (dst & lmask) != lnet or (src & rmask) != rnet:
                    raise drop(DropReason.SELECTOR_MISMATCH)
        counters.packets += 1
        counters.octets += len(inner)
        return inner

    return decapsulate, configure


# --- Wireshark / tshark -------------------------------------------------------------------------
# Wireshark 4.0 (epan/dissectors/packet-ipsec.c) keeps ESP SAs in the "esp_sa" UAT, a file in the
# profile directory (~/.config/wireshark/esp_sa) or given per run as ``-o uat:esp_sa:<record>``.
# A record is eight double-quoted, comma-separated fields:
#   "IPv4","<src>","<dst>","0x<spi, 8 hex digits>","<encryption>","0x<key>","<auth>","0x<key>"
# src/dst are the outer addresses of the packets this SA protects ("*" = any).  Encryption
# strings: "NULL", "AES-CBC [RFC3602]", "AES-GCM with 16 octet ICV [RFC4106]" (key includes the
# 4-byte salt); 4.0 has no ChaCha20-Poly1305 for ESP.  Authentication strings: "NULL",
# "HMAC-SHA-1-96 [RFC2404]", "HMAC-SHA-256-128 [RFC4868]", "HMAC-SHA-384-192 [RFC4868]",
# "HMAC-SHA-512-256 [RFC4868]".  Decryption also needs ``-o esp.enable_encryption_decode:TRUE``
# (and ``esp.enable_authentication_check:TRUE`` to verify ICVs).


def tshark_esp_sa_fields(sa: SecurityAssociation) -> list[str]:
    """The eight fields of ``sa``'s esp_sa record; UsageError for a cipher Wireshark lacks."""
    espec = ENCRYPTION[sa.encryption]
    if not espec.tshark_names:
        raise UsageError(f"Wireshark 4.0 cannot decrypt {sa.encryption} in ESP")
    if sa._inbound:
        src, dst = sa.remote or "*", sa.local or "*"
    else:
        src, dst = sa.local or "*", sa.remote or "*"     # both set on an outbound SA
    auth = INTEGRITY[sa.integrity].tshark_name if sa.integrity else "NULL"
    return ["IPv4", src, dst, f"0x{sa.spi:08x}", espec.tshark_names[0],
            "0x" + sa._encryption_key.hex(), auth, "0x" + sa._integrity_key.hex()]


def esp_sa_uat_record(fields: list[str]) -> str:
    """One line of the esp_sa file / the value of ``-o uat:esp_sa:...``."""
    for f in fields:
        if '"' in f or "\\" in f or "\n" in f:
            raise UsageError(f"esp_sa field {f!r} would need UAT escaping")
    return ",".join(f'"{f}"' for f in fields)
