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
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from cryptography.exceptions import InvalidTag

from mipsec.crypto.transforms import (
    ENCRYPTION, INTEGRITY, RANDOM_POOL_BYTES, Aead, CbcHmac, make_transform,
)
from mipsec.drops import DropReason
from mipsec.errors import ConfigError, Dropped, SaExhausted, UsageError
from mipsec.ipsec.constants import (
    ESP_HEADER_BYTES, IPPROTO_ESP, IPPROTO_IPIP, IPPROTO_UDP, NAT_T_PORT, NEXT_HEADER_NO_NEXT,
    NON_ESP_MARKER, OUTER_TTL, REPLAY_WINDOW_BITS, SEQ_MAX_32, SEQ_MAX_64,
)
from mipsec.ipsec.replay import ReplayWindow
from mipsec.wire.ipv4 import addr_to_bytes, bytes_to_addr

_II = struct.Struct("!II")
_I = struct.Struct("!I")
_PREFIX = struct.Struct("!BBHHHBBH")
_OUTER = struct.Struct("!BBHHHBBH4s4s")
_pack_ii = _II.pack
_pack_i = _I.pack
_pack_iii = struct.Struct("!III").pack
_unpack_ii = _II.unpack_from
_unpack_prefix = _PREFIX.unpack_from
_pack_outer = _OUTER.pack
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


class SaCounters:
    """Per-SA counters.  ``octets`` counts inner packet bytes; ``drops`` counts by reason."""

    __slots__ = ("packets", "octets", "drops", "last_authenticated_time", "_last_source")

    def __init__(self) -> None:
        self.packets = 0
        self.octets = 0
        self.drops: Counter[DropReason] = Counter()
        self.last_authenticated_time: float | None = None
        self._last_source: bytes | None = None

    @property
    def last_authenticated_source(self) -> str | None:
        """Outer source address of the last authenticated inbound packet."""
        raw = self._last_source
        return None if raw is None else bytes_to_addr(raw)

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
        "spi", "direction", "esn", "udp_encap", "selector", "lifetime", "counters", "replay",
        "sequence", "needs_rekey", "expired", "created", "transform",
        "encryption", "integrity", "_encryption_key", "_integrity_key",
        "_local", "_remote", "_seq_max", "_align_mask", "_trailers", "_min_esp", "_icv",
        "_csum_base", "_ident", "_deadline", "_byte_limit", "_selector_in", "_selector_out",
        "_check", "_replay_bits", "_replay_mask", "_infer", "_udp_local_port", "_inbound", "_kind",
        "_aead_encrypt", "_aead_decrypt", "_salt", "_cbc_encrypt", "_cbc_decrypt", "_random",
        "_hmac_copy", "_pool", "_pool_pos", "_pack_prefix", "_overhead", "_udp_ports",
        "_esp_start", "_addresses", "_max_inner",
    )

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
        self._icv = t.icv_size
        # The hot path inlines the transform's steps on its keyed primitives (one call less).
        self._aead_encrypt = self._aead_decrypt = self._salt = None
        self._cbc_encrypt = self._cbc_decrypt = self._random = None
        self._hmac_copy = None
        self._pool, self._pool_pos = b"", RANDOM_POOL_BYTES   # CBC random blocks, see transforms
        if isinstance(t, Aead):
            self._kind = _AEAD
            self._aead_encrypt, self._aead_decrypt, self._salt = t.encrypt, t.decrypt, t.salt
        else:
            self._kind = _CBC if isinstance(t, CbcHmac) else _NULL
            self._hmac_copy = t.hmac.keyed.copy
            if isinstance(t, CbcHmac):
                self._cbc_encrypt, self._cbc_decrypt = t.encrypt_update, t.decrypt_update
                self._random = t.random
        self._align_mask = t.align - 1
        self._trailers = _TAILS[:t.align]
        # RFC 4303 §2: header, IV, at least the 2-byte trailer (one block for CBC), ICV
        self._min_esp = ESP_HEADER_BYTES + t.iv_size + max(2, t.block_size) + t.icv_size
        self.esn = bool(esn)
        self._seq_max = SEQ_MAX_64 if esn else SEQ_MAX_32
        self.sequence = 0              # last sequence number sent (outbound)
        self.replay = ReplayWindow(replay_window)
        self._check = self.replay.check
        self._replay_bits = self.replay.size
        self._replay_mask = (1 << self.replay.size) - 1
        self._infer = self.replay.infer
        if udp_encap is not None and not isinstance(udp_encap, UdpEncap):
            raise ConfigError(f"SA udp_encap {udp_encap!r}: must be a UdpEncap")
        self.udp_encap = udp_encap
        self.selector = selector
        self._selector_in = selector.matches_inbound if selector is not None else None
        self._selector_out = selector.matches_outbound if selector is not None else None
        self.counters = SaCounters()
        self.needs_rekey = False
        self.expired = False
        if lifetime is not None and not isinstance(lifetime, Lifetime):
            raise ConfigError(f"SA lifetime {lifetime!r}: must be a Lifetime")
        self.lifetime = lifetime
        self.created = now
        self._ident = 0
        self._local: bytes | None = None
        self._remote: bytes | None = None
        self._set_addresses(local, remote)
        self._next_lifetime_limits()

    # --- configuration ------------------------------------------------------------------------
    def _set_addresses(self, local: str | None, remote: str | None) -> None:
        local_b = _addr("local", local)
        remote_b = _addr("remote", remote)
        if not self._inbound and (local_b is None or remote_b is None):
            raise ConfigError("outbound SA: both local (outer source) and remote (outer "
                              "destination) addresses are required")
        self._local, self._remote = local_b, remote_b
        # inbound packets carry remote (source) then local (destination) at offset 12
        self._addresses = remote_b + local_b if remote_b and local_b else None
        udp = self.udp_encap
        if udp is not None:
            self._udp_local_port = udp.local_port
        if self._inbound:
            self._csum_base = 0
            return
        # Outbound: one struct packs outer IPv4 header [+ UDP header] + ESP header [+ AEAD IV].
        proto = IPPROTO_UDP if udp is not None else IPPROTO_ESP
        fixed = _pack_outer(0x45, 0, 0, 0, 0, OUTER_TTL, proto, 0, local_b, remote_b)
        self._csum_base = sum(struct.unpack("!10H", fixed))  # constant words, RFC 1071 sum
        t = self.transform
        fmt = "!BBHHHBBH4s4s" + ("HHHH" if udp is not None else "") + "II"
        if self._kind == _AEAD:
            fmt += "Q"
        packer = struct.Struct(fmt).pack
        self._esp_start = 20 + (8 if udp is not None else 0)
        # total length = overhead + len(padded plaintext)
        self._overhead = self._esp_start + ESP_HEADER_BYTES + t.iv_size + t.icv_size
        self._max_inner = 0xFFFF - self._overhead - 2 - (t.align - 1)
        self._pack_prefix = packer
        self._udp_ports = (udp.local_port, udp.remote_port) if udp is not None else None

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
        times = [lt.hard_seconds] + ([] if self.needs_rekey else [lt.soft_seconds])
        sizes = [lt.hard_bytes] + ([] if self.needs_rekey else [lt.soft_bytes])
        times = [self.created + t for t in times if t is not None]
        sizes = [b for b in sizes if b is not None]
        self._deadline = min(times, default=_INF)
        self._byte_limit = min(sizes, default=_INF)

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
    def _drop(self, reason: DropReason) -> Dropped:
        self.counters.drops[reason] += 1
        return Dropped(reason)

    def encapsulate(self, inner_ipv4: bytes, now: float = 0.0) -> bytes:
        """ESP tunnel mode (RFC 4303 §3.1.2): the whole outer IPv4 packet for ``inner_ipv4``."""
        if self._inbound:
            raise UsageError(f"SA 0x{self.spi:08x} is inbound: it cannot encapsulate")
        counters = self.counters
        if now >= self._deadline or counters.octets >= self._byte_limit:
            self._lifetime_reached(now)
        n = len(inner_ipv4)
        if n < 20 or n > self._max_inner or inner_ipv4[0] >> 4 != 4:
            # no fragmentation here: the outer packet must fit in 65535 bytes (RFC 791)
            raise self._drop(DropReason.INNER_TOO_BIG if n > self._max_inner
                             else DropReason.MALFORMED)
        if self._selector_out is not None and not self._selector_out(inner_ipv4):
            # RFC 4301 §5.1: the packet must match the SA's selectors before protection
            raise self._drop(DropReason.SELECTOR_MISMATCH)
        seq = self.sequence + 1
        if seq > self._seq_max:
            # RFC 4303 §3.3.3: the counter must not cycle; a new SA is needed
            self.needs_rekey = True
            counters.drops[DropReason.SA_EXHAUSTED] += 1
            raise SaExhausted(f"SA 0x{self.spi:08x}: sequence numbers exhausted")
        self.sequence = seq
        # RFC 4303 §2.4: pad payload + 2-byte trailer to the alignment; §2.6 next header 4
        plaintext = inner_ipv4 + self._trailers[-(n + 2) & self._align_mask]
        # The outer header (RFC 791), UDP header (RFC 3948 §2.1, checksum 0), ESP header and,
        # for AEAD, the explicit IV are all known before encryption: one struct call each.
        tos = inner_ipv4[1]
        df = (inner_ipv4[6] & 0x40) << 8
        ident = self._ident = (self._ident + 1) & 0xFFFF
        total = self._overhead + len(plaintext)
        # RFC 1071: the one's complement sum is the plain sum modulo 0xFFFF (as 0xFFFF, not 0,
        # for a non-zero header); the checksum is its complement.
        c = 0xFFFF - ((self._csum_base + tos + total + ident + df) % 0xFFFF or 0xFFFF)
        kind = self._kind
        if kind == _AEAD:
            # RFC 4106 §3.1 / RFC 7634 §2: IV = the 64-bit sequence number; §5: AAD
            if self._udp_ports is None:
                prefix = self._pack_prefix(0x45, tos, total, ident, df, OUTER_TTL, IPPROTO_ESP,
                                           c, self._local, self._remote, self.spi,
                                           seq & 0xFFFFFFFF, seq)
            else:
                prefix = self._pack_prefix(0x45, tos, total, ident, df, OUTER_TTL, IPPROTO_UDP,
                                           c, self._local, self._remote, *self._udp_ports,
                                           total - 20, 0, self.spi, seq & 0xFFFFFFFF, seq)
            if self.esn:
                aad = _pack_iii(self.spi, seq >> 32, seq & 0xFFFFFFFF)
            else:
                aad = _pack_ii(self.spi, seq)
            out = prefix + self._aead_encrypt(self._salt + prefix[-8:], plaintext, aad)
        elif kind == _CBC:
            # RFC 3602 §3; the IV is C0, see mipsec.crypto.transforms
            if self._udp_ports is None:
                prefix = self._pack_prefix(0x45, tos, total, ident, df, OUTER_TTL, IPPROTO_ESP,
                                           c, self._local, self._remote, self.spi,
                                           seq & 0xFFFFFFFF)
            else:
                prefix = self._pack_prefix(0x45, tos, total, ident, df, OUTER_TTL, IPPROTO_UDP,
                                           c, self._local, self._remote, *self._udp_ports,
                                           total - 20, 0, self.spi, seq & 0xFFFFFFFF)
            pos = self._pool_pos
            if pos >= RANDOM_POOL_BYTES:
                self._pool = self._random(RANDOM_POOL_BYTES)
                pos = 0
            self._pool_pos = pos + 16
            ct = self._cbc_encrypt(self._pool[pos:pos + 16] + plaintext)
            mac = self._hmac_copy()
            mac.update(prefix[self._esp_start:])
            mac.update(ct)
            if self.esn:
                mac.update(_pack_i(seq >> 32))      # RFC 4303 §2.2.1: high half, not sent
            out = prefix + ct + mac.finalize()[:self._icv]
        else:
            # RFC 2410: NULL encryption, RFC 4303 §3.3.4 ICV over header and payload
            if self._udp_ports is None:
                prefix = self._pack_prefix(0x45, tos, total, ident, df, OUTER_TTL, IPPROTO_ESP,
                                           c, self._local, self._remote, self.spi,
                                           seq & 0xFFFFFFFF)
            else:
                prefix = self._pack_prefix(0x45, tos, total, ident, df, OUTER_TTL, IPPROTO_UDP,
                                           c, self._local, self._remote, *self._udp_ports,
                                           total - 20, 0, self.spi, seq & 0xFFFFFFFF)
            mac = self._hmac_copy()
            mac.update(prefix[self._esp_start:])
            mac.update(plaintext)
            if self.esn:
                mac.update(_pack_i(seq >> 32))
            out = prefix + plaintext + mac.finalize()[:self._icv]
        counters.packets += 1
        counters.octets += n
        return out

    def decapsulate(self, outer_ipv4: bytes, now: float = 0.0) -> bytes:
        """The inner IPv4 packet of an ESP tunnel-mode packet, or raises ``Dropped``."""
        if not self._inbound:
            raise UsageError(f"SA 0x{self.spi:08x} is outbound: it cannot decapsulate")
        pkt = outer_ipv4
        n = len(pkt)
        # 1. outer IPv4 header (RFC 791)
        if n < 20:
            raise self._drop(DropReason.TRUNCATED)
        vihl, _tos, total, _ident, frag, _ttl, proto, _csum = _unpack_prefix(pkt)
        if vihl == 0x45:
            ihl = 20
        else:
            if vihl >> 4 != 4:
                raise self._drop(DropReason.BAD_IP_VERSION)
            ihl = (vihl & 0x0F) << 2
            if ihl < 20 or ihl > n:
                raise self._drop(DropReason.BAD_IP_HEADER_LENGTH)
        if total != n:
            raise self._drop(DropReason.BAD_IP_TOTAL_LENGTH)
        if _from_bytes(pkt[:ihl], "big") % 0xFFFF:
            # RFC 1071: the one's complement sum of a correct header is 0xFFFF (== 0 mod 0xFFFF)
            raise self._drop(DropReason.BAD_IP_CHECKSUM)
        if frag & 0x3FFF:
            # RFC 4303 §3.4.1: reassembly is not ours; the outer packets must arrive whole
            raise self._drop(DropReason.IP_FRAGMENT)
        if self.udp_encap is None:
            if proto != IPPROTO_ESP:
                raise self._drop(DropReason.WRONG_PROTOCOL)
            off = ihl
        else:
            if proto != IPPROTO_UDP:
                raise self._drop(DropReason.WRONG_PROTOCOL)
            off = ihl + 8
            if n < off:
                raise self._drop(DropReason.TRUNCATED)
            _sport, dport, ulen, _ucsum = _unpack_udp(pkt, ihl)
            if ulen != n - ihl:
                raise self._drop(DropReason.BAD_UDP_LENGTH)
            if dport != self._udp_local_port:
                raise self._drop(DropReason.WRONG_UDP_PORT)
            if n - off == 1 and pkt[off] == 0xFF:
                raise self._drop(DropReason.NAT_KEEPALIVE)      # RFC 3948 §2.3
            if pkt[off:off + 4] == NON_ESP_MARKER:
                raise self._drop(DropReason.WRONG_PROTOCOL)     # RFC 3948 §2.2: IKE, not ESP
        # 2. ESP lengths (RFC 4303 §2)
        esp_len = n - off
        if esp_len < self._min_esp:
            raise self._drop(DropReason.TRUNCATED)
        kind = self._kind
        if kind == _CBC and (esp_len - 24 - self._icv) & 15:
            raise self._drop(DropReason.BAD_CIPHERTEXT_LENGTH)  # RFC 3602 §3
        # 3. SPI and outer addresses
        spi, seq_low = _unpack_ii(pkt, off)
        if spi != self.spi:
            raise self._drop(DropReason.UNKNOWN_SPI)
        if self._addresses is not None:             # both fixed: one comparison
            if pkt[12:20] != self._addresses:
                if pkt[12:16] != self._remote:
                    raise self._drop(DropReason.OUTER_SOURCE_MISMATCH)
                raise self._drop(DropReason.OUTER_DESTINATION_MISMATCH)
        else:
            if self._remote is not None and pkt[12:16] != self._remote:
                raise self._drop(DropReason.OUTER_SOURCE_MISMATCH)
            if self._local is not None and pkt[16:20] != self._local:
                raise self._drop(DropReason.OUTER_DESTINATION_MISMATCH)
        # 4. lifetime
        counters = self.counters
        if now >= self._deadline or counters.octets >= self._byte_limit:
            self._lifetime_reached(now)
        # 5. replay pre-check (RFC 4303 §3.4.3)
        if self.esn:
            seq = self._infer(seq_low)
            seq_hi = _pack_i(seq >> 32)
        else:
            seq = seq_low
            seq_hi = b""
        replay = self.replay
        top = replay.top
        if seq <= top:                  # new highest numbers need no look at the bitmap
            reason = self._check(seq)
            if reason is not None:
                raise self._drop(reason)
        # 6-7. ICV in constant time, then decryption (RFC 4303 §3.4.4)
        if kind == _AEAD:
            if seq_hi:
                aad = pkt[off:off + 4] + seq_hi + pkt[off + 4:off + 8]
            else:
                aad = pkt[off:off + 8]
            try:
                plaintext = self._aead_decrypt(self._salt + pkt[off + 8:off + 16],
                                               pkt[off + 16:], aad)
            except InvalidTag:
                raise self._drop(DropReason.ICV_MISMATCH) from None
        else:
            icv_at = n - self._icv
            mac = self._hmac_copy()
            mac.update(pkt[off:icv_at])
            if seq_hi:
                mac.update(seq_hi)                 # RFC 4303 §2.2.1
            if not _compare_digest(mac.finalize()[:self._icv], pkt[icv_at:]):
                raise self._drop(DropReason.ICV_MISMATCH)
            if kind == _CBC:
                # IV || ciphertext through the persistent decryptor; block 0 is discarded
                plaintext = self._cbc_decrypt(pkt[off + 8:icv_at])[16:]
            else:
                plaintext = pkt[off + 8:icv_at]
        # 8. trailer (RFC 4303 §2.4, §2.6): padding 1, 2, 3 ..., pad length, next header 4, all
        #    compared at once with the expected tail; the cold path names what is wrong
        padlen = plaintext[-2]
        end = len(plaintext) - 2 - padlen
        if end < 0 or plaintext[end:] != _TAILS[padlen]:
            raise self._drop(_trailer_reason(plaintext, end, padlen))
        if (end >= 20 and (plaintext[0] & 0xF0) == 0x40
                and (plaintext[2] << 8 | plaintext[3]) == end):
            inner = plaintext[:end]
        else:
            inner_total = (plaintext[2] << 8 | plaintext[3]) if end >= 20 else 0
            if (plaintext[0] & 0xF0) != 0x40 or not 20 <= inner_total < end:
                raise self._drop(DropReason.MALFORMED)
            inner = plaintext[:inner_total]   # RFC 4303 §2.4: TFC padding after the packet
        # 9. the window moves only now (ReplayWindow.update, inlined)
        if seq > top:
            shift = seq - top
            replay.bitmap = ((replay.bitmap << shift) | 1) & self._replay_mask \
                if shift < self._replay_bits else 1
            replay.top = seq
        else:
            replay.bitmap |= 1 << (top - seq)
        counters.last_authenticated_time = now
        counters._last_source = pkt[12:16]
        # 10. inner selector (RFC 4301 §5.2 step 4)
        if self._selector_in is not None and not self._selector_in(inner):
            raise self._drop(DropReason.SELECTOR_MISMATCH)
        counters.packets += 1
        counters.octets += len(inner)
        return inner

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
        src, dst = sa.local, sa.remote
    auth = INTEGRITY[sa.integrity].tshark_name if sa.integrity else "NULL"
    return ["IPv4", src, dst, f"0x{sa.spi:08x}", espec.tshark_names[0],
            "0x" + sa._encryption_key.hex(), auth, "0x" + sa._integrity_key.hex()]


def esp_sa_uat_record(fields: list[str]) -> str:
    """One line of the esp_sa file / the value of ``-o uat:esp_sa:...``."""
    for f in fields:
        if '"' in f or "\\" in f or "\n" in f:
            raise UsageError(f"esp_sa field {f!r} would need UAT escaping")
    return ",".join(f'"{f}"' for f in fields)
