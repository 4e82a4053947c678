"""IP-in-IP encapsulation (RFC 2003) between HA and care-of address, and the HA's reverse-tunnel
check (RFC 3024).

Per-packet code: ``struct`` at the named offsets of ``mipsec.wire.ipv4``, no construct.

Encapsulation (RFC 2003 §3.1): the outer header gets protocol 4, TTL 64 (the encapsulator's
default TTL), the inner TOS, and the inner DF bit (§5.1: "the encapsulator ... MAY set DF in the
outer header if DF is set in the inner header"; we copy it, so path-MTU discovery of the inner
flow keeps working and we never fragment what the sender asked us not to).  The inner datagram
is not changed (its TTL was already decremented by the forwarding step of the role).

Decapsulation checks the outer header (length, version, IHL, total length, checksum, no
fragment, protocol 4) and that the payload looks like an IPv4 datagram whose total length fills
the payload exactly; each failure has its own ``DropReason``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

from mipsec.drops import DropReason
from mipsec.errors import ParseError
from mipsec.mip.constants import IPIP_OUTER_TTL, IPPROTO_IPIP
from mipsec.wire.ipv4 import (
    FLAG_DF,
    IPV4_MIN_HEADER_BYTES,
    OFF_DESTINATION,
    OFF_FLAGS_FRAGMENT,
    OFF_SOURCE,
    OFF_TOS,
    OFF_TOTAL_LENGTH,
    VERSION_IHL_20,
    addr_to_bytes,
    bytes_to_addr,
    check_ipv4,
    checksum,
    pack_ipv4,
)

_MAX_TOTAL = 0xFFFF

# Tunnel endpoints are few (one HA, a CoA per MN): parse each dotted quad once.
_packed = lru_cache(maxsize=65536)(addr_to_bytes)
_dotted = lru_cache(maxsize=65536)(bytes_to_addr)


def encapsulate(inner: bytes, src: str, dst: str, identification: int = 0,
                ttl: int = IPIP_OUTER_TTL) -> bytes:
    """Wrap the IPv4 datagram ``inner`` in an outer header from ``src`` to ``dst``.

    ``identification`` is the outer IP ID; callers that may send without DF pass a counter.
    """
    return encapsulate_packed(inner, _packed(src), _packed(dst), identification, ttl)


def packed(address: str) -> bytes:
    """The 4 bytes of a dotted-quad tunnel endpoint (cached: endpoints are few)."""
    return _packed(address)


def encapsulate_packed(inner: bytes, src_b: bytes, dst_b: bytes, identification: int = 0,
                       ttl: int = IPIP_OUTER_TTL) -> bytes:
    """``encapsulate`` with both endpoints as 4 bytes each (the per-packet form)."""
    total = IPV4_MIN_HEADER_BYTES + len(inner)
    if total > _MAX_TOTAL:
        raise ValueError(f"inner datagram of {len(inner)} bytes does not fit an IPv4 packet")
    tos = inner[OFF_TOS] if len(inner) > OFF_TOS else 0
    df = FLAG_DF if len(inner) > OFF_FLAGS_FRAGMENT and inner[OFF_FLAGS_FRAGMENT] & 0x40 else 0
    header = pack_ipv4(VERSION_IHL_20, tos, total, identification & 0xFFFF, df, ttl,
                       IPPROTO_IPIP, 0, src_b, dst_b)
    csum = checksum(header)
    return header[:10] + csum.to_bytes(2, "big") + header[12:] + inner


def decapsulate(outer: bytes) -> tuple[str, str, bytes]:
    """(outer source, outer destination, inner datagram) of an IP-in-IP packet.

    Raises ParseError with TRUNCATED, BAD_IP_VERSION, BAD_IP_HEADER_LENGTH,
    BAD_IP_TOTAL_LENGTH, BAD_IP_CHECKSUM, IP_FRAGMENT, WRONG_PROTOCOL or IPIP_BAD_INNER.
    """
    ihl, proto = check_ipv4(outer, what="IP-in-IP packet")
    if proto != IPPROTO_IPIP:
        raise ParseError(f"outer protocol {proto}, not 4", DropReason.WRONG_PROTOCOL)
    inner = outer[ihl:]
    m = len(inner)
    # RFC 2003 §3: the payload is an IPv4 datagram, header and total length consistent
    if m < IPV4_MIN_HEADER_BYTES:
        raise ParseError(f"inner datagram of {m} bytes", DropReason.IPIP_BAD_INNER)
    inner_vihl = inner[0]
    if inner_vihl >> 4 != 4 or (inner_vihl & 0x0F) < 5 or (inner_vihl & 0x0F) << 2 > m:
        raise ParseError("inner header is not a valid IPv4 header", DropReason.IPIP_BAD_INNER)
    if int.from_bytes(inner[OFF_TOTAL_LENGTH:OFF_TOTAL_LENGTH + 2], "big") != m:
        raise ParseError("inner total length does not fill the payload",
                         DropReason.IPIP_BAD_INNER)
    return (_dotted(bytes(outer[OFF_SOURCE:OFF_SOURCE + 4])),
            _dotted(bytes(outer[OFF_DESTINATION:OFF_DESTINATION + 4])), bytes(inner))


def inner_source(inner: bytes) -> str:
    """The source address of an (already checked) inner datagram."""
    return _dotted(bytes(inner[OFF_SOURCE:OFF_SOURCE + 4]))


def unusable_care_of(address: str, own_addresses: frozenset[str] = frozenset()) -> bool:
    """True when ``address`` cannot be a care-of address, i.e. a tunnel endpoint (RFC 2003 §3)
    that an HA or a GW may send to: not a dotted quad, or an address RFC 1122 §3.2.1.3 /
    RFC 6890 never allows as a unicast destination (this network 0/8, loopback 127/8,
    multicast 224/4, reserved 240/4, limited broadcast), or one of the node's own addresses.

    For the roles: an authenticated RRQ or SIU naming such a CoA is refused
    (``DropReason.MIP_BAD_CARE_OF``) before any binding or SA moves.
    """
    try:
        first = _packed(address)[0]
    except (ValueError, AttributeError, TypeError):
        return True
    return first == 0 or first == 127 or first >= 224 or address in own_addresses


class BindingLike(Protocol):
    home_address: str
    care_of_address: str | None


def check_reverse_tunnel(outer_src: str, inner_src: str,
                         binding: BindingLike | None) -> DropReason | None:
    """HA: may this reverse-tunnelled packet (RFC 3024) be forwarded?  None means yes.

    ``binding`` is the HA's current binding for the home address ``inner_src`` (None when the
    HA has none).  RFC 3024 §4.2 (reverse tunnel, home agent): the outer source must be the
    registered care-of address of the mobile node named by the inner source, otherwise the
    packet is a spoof and is dropped.
    """
    if binding is None or binding.care_of_address is None:
        return DropReason.IPIP_UNKNOWN_TUNNEL
    if inner_src != binding.home_address or outer_src != binding.care_of_address:
        return DropReason.REVERSE_TUNNEL_SOURCE_MISMATCH
    return None
