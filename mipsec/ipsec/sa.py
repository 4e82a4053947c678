"""One ESP security association in tunnel mode (RFC 4303, RFC 4301), sans-I/O.

``SecurityAssociation.encapsulate(inner)`` returns the whole outer IPv4 packet (raw ESP, protocol
50, or ESP-in-UDP per RFC 3948); ``decapsulate(outer)`` returns the inner IPv4 packet or raises
``Dropped(reason)`` after counting ``reason`` in ``sa.counters.drops``.  Nothing else changes on
a drop, except where RFC 4301 §5.2 orders otherwise (the inner selector check comes after the
replay window update, as in the fixed order below).  ``decapsulate_many(packets, now)`` does
the same for a burst: (the inner packets in order, ``(index, reason)`` per drop), with exactly
the outputs, counters and window of one ``decapsulate`` call per packet.

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
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mipsec.crypto.transforms import (
    ENCRYPTION,
    INTEGRITY,
    Aead,
    CbcHmac,
    make_transform,
)
from mipsec.drops import DropReason
from mipsec.errors import ConfigError, Dropped, UsageError
from mipsec.ipsec.constants import (
    ESP_HEADER_BYTES,
    NAT_T_PORT,
    REPLAY_WINDOW_BITS,
    SEQ_MAX_32,
    SEQ_MAX_64,
)
from mipsec.ipsec.esp_datapath import (  # the data path and the constants it inlines
    _AEAD,
    _CBC,
    _INF,
    _NULL,
    _inbound_path,
    _outbound_path,
    _wrong_direction,
    _wrong_direction_burst,
)
from mipsec.ipsec.replay import ReplayWindow
from mipsec.wire.ipv4 import addr_to_bytes, bytes_to_addr

_KEEP: Any = object()


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


class BurstFunction(Protocol):
    """``sa.decapsulate_many``: a burst in, (inner packets in order, (index, reason) per drop)."""
    def __call__(self, packets: list[bytes], /, now: float = 0.0,
                 ) -> tuple[list[bytes], list[tuple[int, DropReason]]]: ...


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
        "_inbound", "_kind", "_max_inner", "encapsulate", "decapsulate", "decapsulate_many",
        "_configure",
    )
    # the data path: per-SA closures (see _build_data_path)
    encapsulate: PacketFunction
    decapsulate: PacketFunction
    decapsulate_many: BurstFunction
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

    @property
    def remote_bytes(self) -> bytes | None:
        """``remote`` as 4 bytes (None: wildcard), without building the dotted text."""
        return self._remote

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
    # rebind stays valid.  See ``_outbound_path`` / ``_inbound_path`` in
    # ``mipsec.ipsec.esp_datapath``.

    def _drop(self, reason: DropReason) -> Dropped:
        self.counters.drops[reason] += 1
        return Dropped(reason)

    def _build_data_path(self) -> None:
        if self._inbound:
            self.decapsulate, self.decapsulate_many, self._configure = _inbound_path(self)
            self.encapsulate = _wrong_direction(self, "inbound", "encapsulate")
        else:
            self.encapsulate, self._configure = _outbound_path(self)
            self.decapsulate = _wrong_direction(self, "outbound", "decapsulate")
            self.decapsulate_many = _wrong_direction_burst(self)
        self._configure()

    def key_material(self) -> tuple[bytes, bytes]:
        """(encryption key, integrity key): to build this SA in another process (a GW
        worker, ``mipsec.node.gateway_worker``); never logged or shown."""
        return self._encryption_key, self._integrity_key

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
