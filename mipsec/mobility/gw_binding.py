"""The VPN gateway's binding machine: the compare-and-swap of the patent's Fig. 3 and Fig. 4.

Theory of operation
-------------------
The GW's outbound SA towards a mobile node (MN) points at the MN's care-of address (CoA), the
*binding*.  It moves only when an authenticated, fresh Security Information Update (SIU) from the
MN's home agent says so, and only if the SIU's Old CoA is what the GW has (a compare-and-swap:
an SIU that was overtaken or repeated cannot move the SA back), and only to where a recent
authenticated Registration Request of that MN came from (``rrq_source``).  The role
(``mipsec/node/gateway.py``) authenticates and checks the SIU, asks ``classify`` which event it
is, fires it, and carries out the effect: re-point the SA *before* the embedded Registration
Reply is encrypted and sent through it.

Binding state machine per MN (``BINDING_TRANSITIONS``, the table IS the logic: ``classify``
names the event, the table gives the next state and the effect, anything not in the table is
refused as SIU_STALE_CARE_OF and changes nothing):

    FRESH   --UPDATE (any Old CoA)----------> BOUND    REPOINT  (new SAs from config: the
                                                                 HA may name the CoA it knew)
    FRESH   --IKE installed-----------------> IKE_BOUND BIND_IKE (new SAs from IKE: to where
                                                                 the IKE_AUTH came from)
    IKE_BOUND --UPDATE (any CoAs)-----------> BOUND    REPOINT  (as FRESH: the HA's first SIU)
    UNBOUND --UPDATE (Old CoA 0.0.0.0)------> BOUND    REPOINT
    BOUND   --UPDATE (Old CoA = binding)----> BOUND    REPOINT  (a move: rebind, then RRP)
    BOUND   --UPDATE (New CoA = binding)----> BOUND    CONFIRM  (a repeat: RRP only)
    BOUND   --DEREGISTER (Old = binding)----> UNBOUND  RETIRE   (RRP to the binding, unbind)
    FRESH/UNBOUND/IKE_BOUND --DEREGISTER---> same     NOTHING
    any     --REJECT------------------------> same     REJECT   (RRP once to New CoA)
    BOUND/IKE_BOUND --MOBIKE update (MOBIKE mode)--> same MOBIKE (rebind to the IKE address)
    FRESH/UNBOUND --MOBIKE update-----------> same     NOTHING

IKE_BOUND: a pair IKE installed (IKE_AUTH, or a re-establishment after INITIAL_CONTACT) points
at once at the address and port the IKE_AUTH request came from (behind a NAT: its public
address and port).  The IKE_AUTH response had to reach that address, so the MN proved it is
there (the return routability MOBIKE would check); the downlink then flows without waiting for
an SIU, also when the HA->GW path is down and the MN re-established IKE from a new CoA.  Only
this first install binds: a later change of the IKE SA's address (a NAT-T float, a relayed
request) still never moves the ESP SA in SIU mode (ESP_MOVE_NOT_BY_SIU).  Until the HA's
first SIU the pair takes any Old CoA and any SPI, as FRESH does (the HA cannot know them).
"""

from __future__ import annotations

import enum

from mipsec.mobility.machine import Machine
from mipsec.wire.ipv4 import addr_to_bytes as a2b
from mipsec.wire.ipv4 import bytes_to_addr as b2a
from mipsec.wire.siu import SiuType

RRQ_SOURCES_PER_MOBILE = 4     # outer sources of an MN's recent RRQs an SIU may point the SA at
RRQ_SOURCE_MAX_AGE_S = 10.0    # ... if the RRQ was seen this recently (the SIU follows in ms)


class BindingState(enum.Enum):
    FRESH = "fresh"          # SAs installed (configuration), never bound
    IKE_BOUND = "ike-bound"  # SAs installed by IKE, bound to where IKE_AUTH came from, no SIU yet
    UNBOUND = "unbound"      # was bound; deregistered (downlink: NO_SA)
    BOUND = "bound"          # the outbound SA points at the MN's CoA


class BindingEvent(enum.Enum):
    UPDATE_FROM_CURRENT = "update-from-current"    # UPDATE, Old CoA = binding (0.0.0.0: none)
    UPDATE_TO_CURRENT = "update-to-current"        # UPDATE, New CoA = binding (a repeat)
    UPDATE_FROM_OTHER = "update-from-other"        # UPDATE, Old CoA is not the binding
    DEREGISTER_FROM_CURRENT = "deregister-from-current"  # Old CoA = binding, or no binding
    DEREGISTER_FROM_OTHER = "deregister-from-other"
    REJECT = "reject"
    MOBIKE_MOVED = "mobike-moved"                  # authenticated UPDATE_SA_ADDRESSES
    IKE_INSTALLED = "ike-installed"                # IKE installed this pair (IKE_AUTH's peer)


class Effect(enum.Enum):
    REPOINT = "repoint"      # rebind the outbound SA to New CoA (and the RRQ's port), then RRP
    CONFIRM = "confirm"      # already there (a NAT's new port is taken): RRP only
    RETIRE = "retire"        # RRP to the binding, then unbind
    REJECT = "reject"        # RRP once to New CoA with the SA's keys; nothing moves
    MOBIKE = "mobike"        # rebind to where the IKE SA moved
    BIND_IKE = "bind-ike"    # bind to where the IKE_AUTH that made the pair came from
    NOTHING = "nothing"


S, E, X = BindingState, BindingEvent, Effect
BINDING_TRANSITIONS: dict[tuple[BindingState, BindingEvent], tuple[BindingState, Effect]] = {
    (S.FRESH, E.UPDATE_FROM_CURRENT): (S.BOUND, X.REPOINT),
    (S.FRESH, E.UPDATE_FROM_OTHER): (S.BOUND, X.REPOINT),
    (S.FRESH, E.DEREGISTER_FROM_CURRENT): (S.FRESH, X.NOTHING),
    (S.FRESH, E.REJECT): (S.FRESH, X.REJECT),
    (S.FRESH, E.MOBIKE_MOVED): (S.FRESH, X.NOTHING),
    (S.FRESH, E.IKE_INSTALLED): (S.IKE_BOUND, X.BIND_IKE),
    (S.IKE_BOUND, E.UPDATE_FROM_CURRENT): (S.BOUND, X.REPOINT),
    (S.IKE_BOUND, E.UPDATE_FROM_OTHER): (S.BOUND, X.REPOINT),
    (S.IKE_BOUND, E.UPDATE_TO_CURRENT): (S.BOUND, X.REPOINT),
    (S.IKE_BOUND, E.DEREGISTER_FROM_CURRENT): (S.IKE_BOUND, X.NOTHING),
    (S.IKE_BOUND, E.DEREGISTER_FROM_OTHER): (S.IKE_BOUND, X.NOTHING),
    (S.IKE_BOUND, E.REJECT): (S.IKE_BOUND, X.REJECT),
    (S.IKE_BOUND, E.MOBIKE_MOVED): (S.IKE_BOUND, X.MOBIKE),
    (S.UNBOUND, E.UPDATE_FROM_CURRENT): (S.BOUND, X.REPOINT),
    (S.UNBOUND, E.DEREGISTER_FROM_CURRENT): (S.UNBOUND, X.NOTHING),
    (S.UNBOUND, E.REJECT): (S.UNBOUND, X.REJECT),
    (S.UNBOUND, E.MOBIKE_MOVED): (S.UNBOUND, X.NOTHING),
    (S.BOUND, E.UPDATE_FROM_CURRENT): (S.BOUND, X.REPOINT),
    (S.BOUND, E.UPDATE_TO_CURRENT): (S.BOUND, X.CONFIRM),
    (S.BOUND, E.DEREGISTER_FROM_CURRENT): (S.UNBOUND, X.RETIRE),
    (S.BOUND, E.REJECT): (S.BOUND, X.REJECT),
    (S.BOUND, E.MOBIKE_MOVED): (S.BOUND, X.MOBIKE),
}
del S, E, X


# pairs no SIU has bound yet: their first SIU may name any Old CoA and any SPI
_UNCONFIRMED = frozenset((BindingState.FRESH, BindingState.IKE_BOUND))
# the outbound SA has an outer destination, so the downlink may use it: an SIU bound it, or IKE
# did at install, to where the authenticated IKE_AUTH came from (FRESH, UNBOUND: NO_SA)
CARRIES_DOWNLINK = frozenset((BindingState.BOUND, BindingState.IKE_BOUND))


def classify(siu_type: SiuType, old: str | None, new: str | None,
             current: str | None) -> BindingEvent | None:
    """The binding event an authenticated SIU is (None: no SIU event, e.g. an UPDATE without a
    New CoA).  ``old``/``new``/``current``: None for 0.0.0.0 / no binding."""
    if siu_type == SiuType.UPDATE and new is not None:
        if current is not None and new == current:
            return BindingEvent.UPDATE_TO_CURRENT
        if old == current:
            return BindingEvent.UPDATE_FROM_CURRENT
        return BindingEvent.UPDATE_FROM_OTHER
    if siu_type == SiuType.DEREGISTER:
        if current is None or old == current:
            return BindingEvent.DEREGISTER_FROM_CURRENT
        return BindingEvent.DEREGISTER_FROM_OTHER
    if siu_type == SiuType.REJECT and new is not None:
        return BindingEvent.REJECT
    return None


class GwBinding(Machine[BindingState, BindingEvent, Effect]):
    """One MN's binding machine at the GW and all of its state (``Mobile`` adds the SAs)."""

    __slots__ = ("care_of", "mobike_moved", "rrq_sources", "siu_sequence")

    def __init__(self, who: str):
        super().__init__(BINDING_TRANSITIONS, BindingState.FRESH, who)
        self.care_of: str | None = None   # the binding: where the outbound SA points (its CoA)
        self.mobike_moved = False         # MOBIKE moved the SA; the HA's SIU has not confirmed
        # care-of address a recent authenticated RRQ registered -> (the outer source address it
        # came from, its UDP source port or None for raw ESP, when), oldest first
        self.rrq_sources: dict[bytes, tuple[bytes, int | None, float]] = {}
        self.siu_sequence = 0             # the latest SIU sequence number applied to this MN

    @property
    def fresh(self) -> bool:
        return self.state is BindingState.FRESH

    @property
    def binding(self) -> BindingState:
        return self.state

    @property
    def carries_downlink(self) -> bool:
        """The outbound SA has an outer destination the downlink may be sent to."""
        return self.state in CARRIES_DOWNLINK

    @property
    def unconfirmed(self) -> bool:
        """No SIU has bound this pair yet: its first SIU may name any Old CoA and any SPI."""
        return self.state in _UNCONFIRMED

    def classify(self, siu_type: SiuType, old: str | None, new: str | None) -> BindingEvent | None:
        return classify(siu_type, old, new, self.care_of)

    def outdated(self, sequence: int) -> bool:
        """The replay window lets SIUs for different MNs overtake each other; for one MN an SIU
        older than the one last applied is outdated and must not move the SA back."""
        return sequence < self.siu_sequence

    def note_rrq_source(self, care_of: bytes, source: bytes, port: int | None,
                        now: float) -> None:
        """An authenticated Registration Request of this MN for ``care_of`` came from
        ``source``:``port`` (outer header).  Raw ESP must come from the CoA it registers;
        ESP in UDP (NAT-T) may come from a NAT's public address and port instead."""
        if port is None and source != care_of:
            return
        sources = self.rrq_sources
        sources.pop(care_of, None)
        sources[care_of] = (source, port, now)
        if len(sources) > RRQ_SOURCES_PER_MOBILE:
            del sources[next(iter(sources))]

    def rrq_source(self, care_of: str, now: float) -> tuple[str, int | None] | None:
        """Where a recent authenticated RRQ of this MN for ``care_of`` came from: (address,
        UDP port or None); None if there was none (SIU_CARE_OF_MISMATCH)."""
        entry = self.rrq_sources.get(a2b(care_of))
        if entry is None or now - entry[2] > RRQ_SOURCE_MAX_AGE_S:
            return None
        return b2a(entry[0]), entry[1]

