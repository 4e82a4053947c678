"""The ESP data path of one SA: the ``encapsulate`` / ``decapsulate`` closures that
``SecurityAssociation`` builds once per SA (``mipsec.ipsec.sa``; its docstring has the fixed
inbound order and the outer header choices these follow).

Everything here is per packet, so it is written for CPython's interpreter: struct objects and
constants are module globals bound to closure variables once, the transform kind is inlined, and
no call is made that can be avoided (docs/design.md, "ESP implementation notes").  Each builder
returns ``(packet function, configure)``: ``configure()`` resets the closure variables after
``rebind()`` or a new ``selector``, so a reference to ``sa.encapsulate`` taken earlier stays
valid.
"""

from __future__ import annotations

import hmac
import math
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag

from mipsec.crypto.transforms import (
    RANDOM_POOL_BYTES,
    Aead,
    CbcHmac,
    NullHmac,
)
from mipsec.drops import DropReason
from mipsec.errors import Dropped, SaExhausted, UsageError
from mipsec.ipsec.constants import (
    ESP_HEADER_BYTES,
    IPPROTO_ESP,
    IPPROTO_IPIP,
    IPPROTO_UDP,
    NEXT_HEADER_NO_NEXT,
    NON_ESP_MARKER,
    OUTER_TTL,
)
from mipsec.ipsec.selector import Selector

if TYPE_CHECKING:
    from mipsec.ipsec.sa import BurstFunction, PacketFunction, SecurityAssociation

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


def _trailer_reason(plaintext: bytes, end: int, padlen: int) -> DropReason:
    """Why an authenticated trailer is not padding 1, 2, 3 ... + pad length + 4."""
    if end < 0 or plaintext[end:-2] != _PADDING[:padlen]:
        return DropReason.BAD_PADDING
    if plaintext[-1] == NEXT_HEADER_NO_NEXT:
        return DropReason.DUMMY_PACKET
    return DropReason.BAD_NEXT_HEADER



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


def _wrong_direction_burst(sa: SecurityAssociation) -> BurstFunction:
    def refuse(packets: list[bytes], now: float = 0.0,
               ) -> tuple[list[bytes], list[tuple[int, DropReason]]]:
        raise UsageError(f"SA 0x{sa.spi:08x} is outbound: it cannot decapsulate")
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


def _inbound_path(sa: SecurityAssociation,
                  ) -> tuple[PacketFunction, BurstFunction, Callable[[], None]]:
    """(decapsulate, decapsulate_many, configure) for an inbound SA."""
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

    # --- a burst at a time ----------------------------------------------------------------------
    # ``decapsulate_many`` runs the common packet through a loop that keeps the replay window,
    # the counters and every constant in locals for the whole burst, and sends every other
    # packet through ``decapsulate`` itself (state written back first, read again after), so
    # its outputs, drops, counters and window are exactly those of one call per packet.  The
    # common packet: ESP (raw or in UDP) without ESN, an option-less unfragmented outer header,
    # new to the window, authenticated, with the default trailer right after an option-less
    # inner header.  A packet the loop cannot decide the same way as ``decapsulate`` goes there.
    # A run of consecutive sequence numbers is folded into the bitmap once (``run``).
    off = 28 if udp else 20
    hdr = struct.Struct("!QQI" + ("HHHH" if udp else "") + "II").unpack_from
    # version/IHL 0x45, total length (per packet), fragment offset and MF 0; protocol
    v0_mask, v0 = 0xFF00FFFF00003FFF, 0x4500000000000000
    proto_mask, proto_bits = 0xFF << 48, want_proto << 48
    mac_at = off + 8 + t.iv_size      # AEAD: ciphertext; CBC: IV + ciphertext after the header

    def decapsulate_many(outer_packets: list[bytes], now: float = 0.0,
                         ) -> tuple[list[bytes], list[tuple[int, DropReason]]]:
        """``decapsulate`` over a burst: (the inner packets in order, (index, reason) of each
        drop), with the same outputs, counters and window as one call per packet."""
        inners: list[bytes] = []
        dropped: list[tuple[int, DropReason]] = []
        octets = counters.octets
        if esn or sel_kind == _SEL_GENERAL or now >= sa._deadline \
                or octets + sum(map(len, outer_packets)) >= sa._byte_limit:
            # (an inner packet is shorter than its outer one: no lifetime limit inside a burst)
            for i, pkt in enumerate(outer_packets):
                try:
                    inners.append(decapsulate(pkt, now))
                except Dropped as exc:
                    dropped.append((i, exc.reason))
            return inners, dropped
        min_n = off + min_esp
        top, bitmap, run = replay.top, replay.bitmap, 0
        packets = counters.packets
        last = None                    # outer source of the last packet authenticated here
        for i, pkt in enumerate(outer_packets):
            n = len(pkt)
            if n >= min_n:
                if udp:
                    h0, h1, dst, _sport, dport, ulen, _ucsum, spi_got, seq = hdr(pkt)
                    header_ok = dport == udp_port and ulen == n - 20
                else:
                    h0, h1, dst, spi_got, seq = hdr(pkt)
                    header_ok = True
                src = h1 & 0xFFFFFFFF
                if (header_ok and spi_got == spi and h0 & v0_mask == v0 | n << 32
                        and h1 & proto_mask == proto_bits and not (h0 + h1 + dst) % 0xFFFF
                        and (local is None or dst == local)
                        and (remote is None or src == remote)
                        and not (cbc and (n - off - 24 - icv) & 15)):
                    # replay pre-check (the window's bitmap is only needed below its top)
                    if seq <= top:
                        if run:
                            bitmap = ((bitmap << run) | ((1 << run) - 1)) & replay_mask
                            run = 0
                        diff = top - seq
                        fresh = seq != 0 and diff < replay_bits and not (bitmap >> diff) & 1
                    else:
                        fresh = True
                    if fresh:
                        if aead:
                            try:
                                pt = aead_decrypt(salt + pkt[off + 8:mac_at], pkt[mac_at:],
                                                  pkt[off:off + 8])
                            except InvalidTag:
                                drops[DropReason.ICV_MISMATCH] += 1
                                dropped.append((i, DropReason.ICV_MISMATCH))
                                continue
                        else:
                            icv_at = n - icv
                            mac = hmac_copy()
                            mac.update(pkt[off:icv_at])
                            if not _compare_digest(mac.finalize()[:icv], pkt[icv_at:]):
                                drops[DropReason.ICV_MISMATCH] += 1
                                dropped.append((i, DropReason.ICV_MISMATCH))
                                continue
                            pt = cbc_decrypt(pkt[off + 8:icv_at])[16:] if cbc \
                                else pkt[off + 8:icv_at]
                        padlen = pt[-2]
                        end = len(pt) - 2 - padlen
                        if (end >= 24 and pt[0] == 0x45 and (pt[2] << 8 | pt[3]) == end
                                and pt[end:] == _TAILS[padlen]):
                            if sel_kind == _SEL_ADDRESSES:
                                isrc, idst = _unpack_ii(pt, 12)
                                accept = (idst & lmask) == lnet and (isrc & rmask) == rnet
                            else:
                                accept = True
                            if accept:
                                # the window moves only now
                                if seq == top + 1:
                                    run += 1
                                elif seq > top:
                                    if run:
                                        bitmap = ((bitmap << run) | ((1 << run) - 1)) \
                                            & replay_mask
                                        run = 0
                                    shift = seq - top
                                    bitmap = ((bitmap << shift) | 1) & replay_mask \
                                        if shift < replay_bits else 1
                                else:
                                    bitmap |= 1 << (top - seq)
                                if seq > top:
                                    top = seq
                                last = src
                                packets += 1
                                octets += end
                                inners.append(pt[:end])
                                continue
            # any other packet: one call, on the state as it stands
            if run:
                bitmap = ((bitmap << run) | ((1 << run) - 1)) & replay_mask
                run = 0
            replay.top, replay.bitmap = top, bitmap
            counters.packets, counters.octets = packets, octets
            if last is not None:
                counters.last_authenticated_time = now
                counters._last_source = last
                last = None
            try:
                inners.append(decapsulate(pkt, now))
            except Dropped as exc:
                dropped.append((i, exc.reason))
            top, bitmap = replay.top, replay.bitmap
            packets, octets = counters.packets, counters.octets
        if run:
            bitmap = ((bitmap << run) | ((1 << run) - 1)) & replay_mask
        replay.top, replay.bitmap = top, bitmap
        counters.packets, counters.octets = packets, octets
        if last is not None:
            counters.last_authenticated_time = now
            counters._last_source = last
        return inners, dropped

    return decapsulate, decapsulate_many, configure
