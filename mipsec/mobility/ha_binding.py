"""The home agent's binding machine (the HA's side of the patent's Fig. 4).

Theory of operation
-------------------
The HA owns the bindings home address -> care-of address (CoA).  A Registration Request that
passed every check (``mipsec/node/home_agent.py``: it parses, authenticates, is ours, its
identification is fresh, its CoA is usable) becomes one event of this machine: ACCEPT (bind, or
move / refresh the binding), DEREGISTER (lifetime 0 or CoA = home address); the expiry timer
gives EXPIRE and the binding store at start RESTORE.  ``HaBindings`` owns the state the machine
works on: the bindings (with the CoA before the latest change, which the next SIU names as the
GW's Old CoA: the compare-and-swap key), their expiry heap, and the last CoA of each retired
binding (the reverse tunnel still accepts it for ``REVERSE_TUNNEL_GRACE_S``).  The role turns the
effect into actions: the persisted record, ``BindingChanged``, the reply and the SIU.
"""

from __future__ import annotations

import enum
import heapq
from typing import Any

from mipsec.mobility.machine import IllegalTransition
from mipsec.store.record import BindingRecord

REVERSE_TUNNEL_GRACE_S = 1.0


class BindingState(enum.Enum):
    NONE = "none"
    BOUND = "bound"


class BindingEvent(enum.Enum):
    RESTORE = "restore"
    ACCEPT = "accept"
    DEREGISTER = "deregister"
    EXPIRE = "expire"


class BindingEffect(enum.Enum):
    BIND = "bind"            # make or update the binding from the accepted request
    RESTORE = "restore"      # re-create it as the binding store kept it (a restart)
    UNBIND = "unbind"        # remove it: the home address is served on the home link again
    NOTHING = "nothing"      # nothing to change (a deregistration with no binding)


# (state, event) -> (new state, effect).  ``HaBindings.fire`` looks the pair up and
# ``HomeAgent._event`` carries out the effect and checks it reached the new state; a pair that
# is not here is refused (IllegalTransition, a UsageError: a bug in the caller, never remote
# input).  Refused requests never get here.
BINDING_TRANSITIONS: dict[tuple[BindingState, BindingEvent],
                          tuple[BindingState, BindingEffect]] = {
    (BindingState.NONE, BindingEvent.RESTORE): (BindingState.BOUND, BindingEffect.RESTORE),
    (BindingState.NONE, BindingEvent.ACCEPT): (BindingState.BOUND, BindingEffect.BIND),
    (BindingState.BOUND, BindingEvent.ACCEPT): (BindingState.BOUND, BindingEffect.BIND),
    (BindingState.BOUND, BindingEvent.DEREGISTER): (BindingState.NONE, BindingEffect.UNBIND),
    (BindingState.NONE, BindingEvent.DEREGISTER): (BindingState.NONE, BindingEffect.NOTHING),
    (BindingState.BOUND, BindingEvent.EXPIRE): (BindingState.NONE, BindingEffect.UNBIND),
}


class Binding:
    __slots__ = ("home_address", "care_of_address", "gw_old", "changed_at", "expires",
                 "expires_wall", "lifetime", "identification", "via_gateway", "gateway")

    def __init__(self, home_address: str):
        self.home_address = home_address
        self.care_of_address: str | None = None
        self.gw_old: str | None = None        # the CoA before the latest change
        self.changed_at = 0.0
        self.expires = 0.0
        self.expires_wall = 0.0               # the same instant on the wall clock (stored)
        self.lifetime = 0
        self.identification = 0
        self.via_gateway = True
        self.gateway: str | None = None       # GW pool: the GW it was registered through

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        return {"care_of": self.care_of_address, "lifetime": self.lifetime,
                "expires": self.expires, "previous_care_of": self.gw_old,
                "via_gateway": self.via_gateway,
                **({"gateway": self.gateway} if self.gateway is not None else {}),
                **({"remaining_s": max(0.0, self.expires - now)} if now is not None else {})}

    def record(self) -> BindingRecord:
        return BindingRecord(
            home_address=self.home_address, care_of_address=self.care_of_address or "",
            lifetime=self.lifetime, expires_wall=self.expires_wall,
            previous_care_of=self.gw_old, identification=self.identification,
            via_gateway=self.via_gateway)


class HaBindings:
    """The HA's binding machine for all its home addresses and all of its state: a binding
    exists (BOUND) or not (NONE) per home address; ``fire`` moves by the table."""

    __slots__ = ("bindings", "expiry", "retired", "who")

    def __init__(self, who: str):
        self.who = who
        self.bindings: dict[str, Binding] = {}
        self.expiry: list[tuple[float, str]] = []            # (expires, home), a heap
        self.retired: dict[str, tuple[str, float]] = {}      # home -> (last CoA, when)

    def state(self, home: str) -> BindingState:
        return BindingState.BOUND if home in self.bindings else BindingState.NONE

    def fire(self, home: str, event: BindingEvent) -> tuple[BindingState, BindingEffect]:
        """The table's (new state, effect) for ``event``; the caller carries the effect out
        (``bind``, ``restore``, ``unbind``)."""
        entry = BINDING_TRANSITIONS.get((self.state(home), event))
        if entry is None:
            raise IllegalTransition(f"{self.who}: {event.value} is not allowed for {home} in "
                                    f"state {self.state(home).value}")
        return entry

    def bind(self, home: str, now: float, wall: float, *, care_of: str, lifetime: int,
             identification: int, via_gateway: bool, gateway: str | None = None) -> bool:
        """BIND: make or update the binding; whether its CoA changed (or, in a GW pool, the GW
        that serves it: the downlink route changes either way)."""
        binding = self.bindings.get(home)
        if binding is None:
            binding = self.bindings[home] = Binding(home)
            self.retired.pop(home, None)
        changed = binding.care_of_address != care_of
        moved_gw = binding.gateway != gateway
        binding.gateway = gateway
        if changed:
            binding.gw_old = binding.care_of_address
            binding.care_of_address = care_of
            binding.changed_at = now
        binding.lifetime = lifetime
        binding.expires = now + lifetime
        binding.expires_wall = wall + lifetime
        binding.identification = identification
        binding.via_gateway = via_gateway
        self._schedule_expiry(binding)
        return changed or moved_gw

    def restore(self, home: str, now: float, wall: float, record: BindingRecord,
                gateway: str | None = None) -> None:
        """RESTORE: re-create the binding as the store kept it (a restart)."""
        binding = self.bindings[home] = Binding(home)
        binding.care_of_address = record.care_of_address
        binding.gw_old = record.previous_care_of
        binding.changed_at = now - REVERSE_TUNNEL_GRACE_S     # no grace for the old CoA
        binding.lifetime = record.lifetime
        binding.expires_wall = record.expires_wall
        binding.expires = now + (record.expires_wall - wall)
        binding.identification = record.identification
        binding.via_gateway = record.via_gateway
        binding.gateway = gateway
        self._schedule_expiry(binding)

    def unbind(self, home: str, now: float) -> Binding:
        """UNBIND: the home address is served on the home link again."""
        binding = self.bindings.pop(home)
        self.retired[home] = (binding.care_of_address, now)  # type: ignore[assignment]
        return binding

    def _schedule_expiry(self, binding: Binding) -> None:
        heapq.heappush(self.expiry, (binding.expires, binding.home_address))
        if len(self.expiry) > 2 * len(self.bindings) + 16:
            # superseded entries stay until their own expiry: an MN re-registering fast would
            # grow the heap by rate x lifetime; keep it O(bindings) (amortised O(1) a push)
            self.expiry = [(b.expires, h) for h, b in self.bindings.items()]
            heapq.heapify(self.expiry)

    def next_expiry(self) -> float | None:
        return self.expiry[0][0] if self.expiry else None

    def expired(self, now: float) -> list[Binding]:
        """The bindings whose lifetime ran out by ``now`` (superseded heap entries skipped);
        the caller fires EXPIRE for each."""
        out = []
        while self.expiry and self.expiry[0][0] <= now:
            expires, home = heapq.heappop(self.expiry)
            binding = self.bindings.get(home)
            if binding is not None and binding.expires == expires:
                out.append(binding)
        return out

    def in_grace(self, home: str, outer_src: str, now: float) -> bool:
        """Is ``outer_src`` the previous CoA of ``home`` (moved or retired) within the grace?"""
        binding = self.bindings.get(home)
        if binding is not None:
            return (outer_src == binding.gw_old
                    and now - binding.changed_at <= REVERSE_TUNNEL_GRACE_S)
        retired = self.retired.get(home)
        return (retired is not None and retired[0] == outer_src
                and now - retired[1] <= REVERSE_TUNNEL_GRACE_S)
