"""Security Policy Database (RFC 4301 §4.4.1): ordered policies, first match wins.

Theory of operation
-------------------
The SPD is an ordered list of ``Policy(name, selector, action, sa)``.  RFC 4301 §4.4.1 makes the
order significant: a packet gets the *first* policy whose selector matches it, and a packet that
matches none is discarded (default deny, ``DropReason.NO_POLICY``).  Selectors are written from
the local point of view (``mipsec.ipsec.selector``): ``lookup(src, dst, ...)`` takes the local
address first, i.e. an outbound packet as it is.

Lookups must not get slower as the SPD grows (10,000 policies no more than 2x the cost of 10), so
two structures sit in front of the ordered list.  Both are rebuilt or cleared on every change, so
neither can ever disagree with a linear scan of the list (a property test checks exactly that):

1. **Decision cache.**  ``5-tuple -> Policy | None`` for the flows seen since the last change,
   bounded (``DECISION_CACHE_MAX``, oldest entry evicted first) and cleared by every ``add``,
   ``insert`` or ``remove``.  A hit is one dict lookup.
2. **Prefix index** (the miss path).  Policies are grouped by the pair (local prefix length,
   remote prefix length); inside a group a dict maps ``(src & local_mask, dst & remote_mask)``
   to the group's policies with exactly those prefixes, in SPD order.  A lookup probes each group
   once (a dict lookup), scans only the candidates that already match both prefixes (they differ
   in protocol/ports only), and keeps the lowest SPD position.  Groups are visited in the order
   of their lowest position, so the search stops as soon as no remaining group can beat the best
   match found.  The cost is O(number of distinct prefix-length pairs + candidates per prefix
   pair), not O(number of policies): a GW with one ``/24 -> /32`` policy per mobile node has one
   group whatever the number of nodes.

The policy's ``sa`` (the outbound SA for PROTECT) may be attached or replaced at any time
(``policy.sa = sa``); it is read at ``protect_outbound`` time, so this needs no invalidation.
Name, selector and action are fixed once a policy exists: replace the policy to change them.

Drops that belong to no SA (``NO_POLICY``, ``POLICY_DISCARD``, ``NO_SA``, a truncated or
non-IPv4 inner packet) are counted in ``Spd.drops``; the SA counts its own.
"""

from __future__ import annotations

import enum
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from mipsec.drops import DropReason
from mipsec.errors import ConfigError, Dropped, SaExhausted, UsageError
from mipsec.ipsec.selector import PROTO_TCP, PROTO_UDP, Selector, five_tuple

if TYPE_CHECKING:
    from mipsec.ipsec.sa import SecurityAssociation

# --- tunables -----------------------------------------------------------------------------------
DECISION_CACHE_MAX = 65536   # flows remembered between SPD changes (oldest evicted first)


class Action(str, enum.Enum):
    """RFC 4301 §4.4.1: what to do with a packet that matches a policy."""
    PROTECT = "protect"   # apply IPsec (here: ESP tunnel mode through the policy's SA)
    BYPASS = "bypass"     # pass in the clear
    DISCARD = "discard"   # drop

    def __str__(self) -> str:
        return self.value


class Policy:
    """One SPD entry.  ``sa`` is the outbound SA (``SecurityAssociation``) for PROTECT."""

    __slots__ = ("name", "selector", "action", "sa")
    # set in __init__ through object.__setattr__ (only ``sa`` may change afterwards)
    name: str
    selector: Selector
    action: Action
    sa: SecurityAssociation | None

    def __init__(self, name: str, selector: Selector, action: Action | str,
                 sa: SecurityAssociation | None = None):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"policy name must be a non-empty string, got {name!r}")
        if isinstance(selector, str):
            selector = Selector.parse(selector)
        elif not isinstance(selector, Selector):
            raise ConfigError(f"policy {name!r}: selector must be a Selector, got {selector!r}")
        try:
            action = Action(action)
        except ValueError:
            raise ConfigError(f"policy {name!r}: unknown action {action!r} "
                              f"(protect, bypass or discard)") from None
        if sa is not None and action is not Action.PROTECT:
            raise ConfigError(f"policy {name!r}: only a PROTECT policy takes an SA")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "selector", selector)
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "sa", sa)

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr != "sa":
            raise AttributeError(f"Policy.{attr} is fixed; replace the policy to change it")
        if value is not None and self.action is not Action.PROTECT:
            raise UsageError(f"policy {self.name!r}: only a PROTECT policy takes an SA")
        object.__setattr__(self, attr, value)

    def to_dict(self) -> dict[str, Any]:
        """For ``mipsec status``."""
        sa = self.sa
        return {"name": self.name, "selector": str(self.selector), "action": self.action.value,
                "sa": None if sa is None else f"0x{getattr(sa, 'spi', 0):08x}"}

    def __repr__(self) -> str:
        return (f"Policy({self.name!r}, {self.selector!r}, {self.action}"
                f"{'' if self.sa is None else ', sa=…'})")


class Spd:
    """An ordered SPD with a decision cache and a prefix index; see the module docstring."""

    def __init__(self, policies: list[Policy] | None = None):
        self._policies: list[Policy] = []
        self._by_name: dict[str, Policy] = {}
        self._cache: dict[_FlowKey, Policy | None] = {}
        # [(lowest position, local_mask, remote_mask, {(lnet, rnet): [(position, policy), ...]})]
        self._groups: list[tuple[int, int, int, dict[tuple[int, int], _Bucket]]] = []
        self._group_of: dict[tuple[int, int], dict[tuple[int, int], _Bucket]] = {}
        self.drops: Counter[DropReason] = Counter()
        if policies:
            self.extend(policies)

    # --- changing the SPD --------------------------------------------------------------------

    def add(self, policy: Policy) -> Policy:
        """Append ``policy`` at the end (lowest priority so far).  O(1): no rebuild."""
        self._check_new(policy)
        self._policies.append(policy)
        self._by_name[policy.name] = policy
        self._index(len(self._policies) - 1, policy)
        self._cache.clear()
        return policy

    def extend(self, policies: Iterable[Policy]) -> None:
        """Append several policies in order (all or none are added)."""
        policies = list(policies)
        names = set()
        for policy in policies:
            self._check_new(policy)
            if policy.name in names:
                raise ConfigError(f"policy {policy.name!r} appears twice")
            names.add(policy.name)
        for policy in policies:
            self.add(policy)

    def _check_new(self, policy: Policy) -> None:
        if not isinstance(policy, Policy):
            raise UsageError(f"Spd: expected a Policy, got {policy!r}")
        if policy.name in self._by_name:
            raise ConfigError(f"policy {policy.name!r} is already in the SPD")

    def insert(self, position: int, policy: Policy) -> Policy:
        """Put ``policy`` at ``position`` in the order (0 = first consulted).  O(n)."""
        self._check_new(policy)
        if not 0 <= position <= len(self._policies):
            raise UsageError(f"Spd.insert: position {position} outside 0..{len(self._policies)}")
        self._policies.insert(position, policy)
        self._by_name[policy.name] = policy
        self._rebuild()
        return policy

    def remove(self, name: str) -> Policy:
        """Remove the policy called ``name`` and return it."""
        policy = self._by_name.pop(name, None)
        if policy is None:
            raise UsageError(f"no policy {name!r} in the SPD")
        self._policies.remove(policy)
        self._rebuild()
        return policy

    def get(self, name: str) -> Policy | None:
        return self._by_name.get(name)

    def _rebuild(self) -> None:
        """Recompute the prefix index and forget every cached decision (O(n) per change)."""
        self._cache.clear()
        self._groups = []
        self._group_of = {}
        for position, policy in enumerate(self._policies):
            self._index(position, policy)

    def _index(self, position: int, policy: Policy) -> None:
        """Enter the policy at ``position`` (the highest so far) into the prefix index."""
        sel = policy.selector
        masks = (sel.local_mask, sel.remote_mask)
        buckets = self._group_of.get(masks)
        if buckets is None:
            # a new group's lowest position is the highest so far: the list stays sorted
            buckets = self._group_of[masks] = {}
            self._groups.append((position, masks[0], masks[1], buckets))
        buckets.setdefault((sel.local_net, sel.remote_net), []).append((position, policy))

    # --- lookups -----------------------------------------------------------------------------

    def lookup(self, src: int, dst: int, protocol: int,
               sport: int | None = None, dport: int | None = None) -> Policy | None:
        """First policy (in SPD order) matching local ``src`` -> remote ``dst``, or None."""
        key = (src, dst, protocol, sport, dport)
        cache = self._cache
        try:
            return cache[key]
        except KeyError:
            pass
        policy = self._search(src, dst, protocol, sport, dport)
        if len(cache) >= DECISION_CACHE_MAX:
            del cache[next(iter(cache))]
        cache[key] = policy
        return policy

    def _search(self, src: int, dst: int, protocol: int,
                sport: int | None, dport: int | None) -> Policy | None:
        best_position = len(self._policies)
        best = None
        for lowest, lmask, rmask, buckets in self._groups:
            if lowest >= best_position:
                break   # groups are sorted by their lowest position: none can win any more
            candidates = buckets.get((src & lmask, dst & rmask))
            if candidates is None:
                continue
            for position, policy in candidates:
                if position >= best_position:
                    break
                if policy.selector.matches(src, dst, protocol, sport, dport):
                    best_position, best = position, policy
                    break
        return best

    def lookup_packet(self, packet: bytes, inbound: bool = False) -> Policy | None:
        """The policy for an inner packet we send (or, ``inbound=True``, one we received in the
        clear and must check for BYPASS, RFC 4301 §5.2).  None when nothing matches or the packet
        is truncated."""
        t = five_tuple(packet)
        if t is None:
            return None
        if inbound:
            return self.lookup(t[1], t[0], t[2], t[4], t[3])
        return self.lookup(t[0], t[1], t[2], t[3], t[4])

    def linear_lookup(self, src: int, dst: int, protocol: int,
                      sport: int | None = None, dport: int | None = None) -> Policy | None:
        """The RFC 4301 definition, a plain scan in order (reference for tests and benchmarks)."""
        for policy in self._policies:
            if policy.selector.matches(src, dst, protocol, sport, dport):
                return policy
        return None

    # --- outbound processing (RFC 4301 §5.1) -----------------------------------------------------

    def protect_outbound(self, inner_packet: bytes, now: float = 0.0) -> bytes | DropReason:
        """Apply the SPD to an inner packet we are about to send.

        Returns the outer ESP packet (PROTECT), the inner packet object itself unchanged (BYPASS:
        ``result is inner_packet``), or the ``DropReason`` (DISCARD, no policy, no SA installed,
        truncated / non-IPv4 packet, or the reason the SA refused it).
        """
        # Fast path: an option-less IPv4 header followed by at least 4 bytes, read in one unpack
        # (the same fields and OPAQUE rule as selector.five_tuple, which the general path uses).
        if len(inner_packet) >= _FAST_BYTES:
            vihl, frag, proto, src, dst, sport, dport = _unpack_fast(inner_packet)
            if vihl == 0x45:
                if (proto != _TCP and proto != _UDP) or frag & _FRAGMENT_OFFSET_MASK:
                    sport = dport = None
                key = (src, dst, proto, sport, dport)
                policy = self._cache.get(key, _MISSING)
                if policy is _MISSING:
                    policy = self.lookup(src, dst, proto, sport, dport)
            else:
                policy = self._general_lookup(inner_packet)
        else:
            policy = self._general_lookup(inner_packet)
        if not isinstance(policy, Policy):
            reason = policy if isinstance(policy, DropReason) else DropReason.NO_POLICY
            self.drops[reason] += 1
            return reason
        action = policy.action
        if action is Action.PROTECT:
            sa = policy.sa
            if sa is None:
                self.drops[DropReason.NO_SA] += 1
                return DropReason.NO_SA
            try:
                return sa.encapsulate(inner_packet, now)
            except Dropped as exc:      # counted by the SA (lifetime, exhausted, selector)
                return exc.reason
            except SaExhausted:
                return DropReason.SA_EXHAUSTED
        if action is Action.BYPASS:
            return inner_packet
        self.drops[DropReason.POLICY_DISCARD] += 1
        return DropReason.POLICY_DISCARD

    def _general_lookup(self, packet: bytes) -> Policy | DropReason | None:
        """The policy for any packet, or the DropReason when it cannot be parsed."""
        t = five_tuple(packet)
        if t is None:
            return _unparseable_reason(packet)
        return self.lookup(t[0], t[1], t[2], t[3], t[4])

    # --- the container -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._policies)

    def __iter__(self) -> Iterator[Policy]:
        return iter(list(self._policies))

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def status(self) -> dict[str, Any]:
        """JSON-able summary for ``mipsec status``."""
        return {"policies": [p.to_dict() for p in self._policies],
                "drops": {str(reason): n for reason, n in self.drops.items()},
                "cached_flows": len(self._cache)}


_IPV4_VIHL = struct.Struct("!B")
# version/IHL, flags + fragment offset, protocol, source, destination (RFC 791 §3.1), then the
# first 4 bytes after a 20-byte header: the ports for TCP/UDP (RFC 793, RFC 768).
_FAST = struct.Struct("!B5xHxB2xIIHH")
_FAST_BYTES = _FAST.size
_unpack_fast = _FAST.unpack_from
_FRAGMENT_OFFSET_MASK = 0x1FFF
_TCP, _UDP = PROTO_TCP, PROTO_UDP
_MISSING = object()
# a flow as the decision cache keys it: (src, dst, protocol, sport, dport); ports None = OPAQUE
_FlowKey = tuple[int, int, int, int | None, int | None]
# one prefix-index bucket: [(position in the SPD, policy), ...] in SPD order
_Bucket = list[tuple[int, "Policy"]]


def _unparseable_reason(packet: bytes) -> DropReason:
    """Why ``five_tuple`` refused a packet (slow path, drops only)."""
    if len(packet) < 1 or _IPV4_VIHL.unpack_from(packet)[0] >> 4 != 4:
        return DropReason.BAD_IP_VERSION if len(packet) >= 1 else DropReason.TRUNCATED
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) >= 20 and (ihl < 20 or ihl > len(packet)):
        return DropReason.BAD_IP_HEADER_LENGTH
    return DropReason.TRUNCATED


__all__ = ["Action", "Policy", "Spd", "DECISION_CACHE_MAX"]
