"""The ESP SA pairs that IKE's events call for, per IKE SA: one bookkeeping for MN, GW and peers.

Every runtime that takes child SAs from ``IkeEndpoint`` (the MN, the GW, the interoperability
peer) feeds the events to ``ChildSaBook.apply(event, now)``; the book owns the pairs and the
rules, and returns what changed, in order, as plain records for the runtime to mirror into its
own data path (SAD, current SA pair, actions):

* ``PairInstalled(ike_id, pair, rekey, send_on_new)``: a child became an (inbound, outbound)
  ``SecurityAssociation`` pair (``ChildSa.make_sas``); its inbound SA receives from now on.  On
  a re-key the new pair is installed when the event arrives, which is before the answer that
  lets the peer send on it leaves (RFC 7296 §2.8: the core puts the event first).
* ``PairRefused(ike_id, child, reason)``: the child cannot be installed (``make_sas`` or
  ``spi_taken`` refuses it); nothing changed: the runtime counts it and deletes the child at
  the peer (``IkeEndpoint.delete_child``).
* ``SendingSwitched(ike_id, old, new)``: send on ``new`` from now on; it was re-pointed first at
  the outer addresses (and UDP port) ``old`` had, so a binding moved meanwhile is kept.  After a
  re-key we initiated at once (the peer had the pair before it answered); after one we answered
  only when the pair it replaced is deleted (``ChildSaRekeyed.send_on_new``: the initiator
  installs the new pair on our answer, and deletes the old one after that).
* ``PairRetired(ike_id, pair, until)``: a deleted pair while another remains: its outbound SA
  is gone, its inbound SA keeps decrypting until ``until`` (``CHILD_SA_DELETE_GRACE_S`` after
  the Delete: ESP sent on it may still be queued behind the Delete).
* ``FellBack(ike_id, deleted, survivor)``: both ends re-keyed the same child (§2.8.1) and the
  newest pair was the one deleted: the other, not deleted, is current again.
* ``PairRemoved(ike_id, pair, last)``: the pair is gone at once (its IKE SA's last child, or
  the IKE SA ended); ``last``: the IKE SA has no pair left (its retired inbound SAs go too,
  each an ``InboundForgotten``: a child SA never outlives its IKE SA).
* ``InboundForgotten(ike_id, inbound)``: a retired inbound SA's grace period is over (``expire``,
  also run by every ``apply``; ``get_timer`` says when it is due).
* ``PairsRebound(ike_id, pairs)``: with ``follow_moves``, a ``PeerAddressChanged`` (MOBIKE or a
  NAT mapping) re-pointed the SAs in place, keys, counters and replay windows kept.  The roles
  leave it off: the MN moves its SAs itself, the GW only by its binding machine.

The data path reads ``book.inbound[spi]`` (every live and retired inbound SA) and, per IKE SA,
``lane(ike_id).sending`` / ``.current``; ``book.outbound`` is the sending SA of the newest IKE
SA (a runtime with one peer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from mipsec.errors import ConfigError, UsageError
from mipsec.ike.child import ChildSa
from mipsec.ike.constants import CHILD_SA_DELETE_GRACE_S
from mipsec.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    IkeSaFailed,
    IkeSaId,
    IkeSaRekeyed,
    PeerAddressChanged,
)
from mipsec.ipsec.sa import SecurityAssociation, UdpEncap


class Pair(NamedTuple):
    child: ChildSa
    inbound: SecurityAssociation
    outbound: SecurityAssociation


# --- what changed ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class PairInstalled:
    ike_id: IkeSaId
    pair: Pair
    rekey: bool = False
    send_on_new: bool = True


@dataclass(frozen=True, slots=True, eq=False)
class PairRefused:
    ike_id: IkeSaId
    child: ChildSa
    reason: str


@dataclass(frozen=True, slots=True, eq=False)
class SendingSwitched:
    ike_id: IkeSaId
    old: SecurityAssociation | None
    new: SecurityAssociation


@dataclass(frozen=True, slots=True, eq=False)
class PairRetired:
    ike_id: IkeSaId
    pair: Pair
    until: float


@dataclass(frozen=True, slots=True, eq=False)
class FellBack:
    ike_id: IkeSaId
    deleted: Pair
    survivor: Pair


@dataclass(frozen=True, slots=True, eq=False)
class PairRemoved:
    ike_id: IkeSaId
    pair: Pair
    last: bool


@dataclass(frozen=True, slots=True, eq=False)
class InboundForgotten:
    ike_id: IkeSaId
    inbound: SecurityAssociation


@dataclass(frozen=True, slots=True, eq=False)
class PairsRebound:
    ike_id: IkeSaId
    pairs: tuple[Pair, ...]


Change = (PairInstalled | PairRefused | SendingSwitched | PairRetired | FellBack | PairRemoved
          | InboundForgotten | PairsRebound)


class Lane:
    """The pairs of one IKE SA.  ``current``: the newest pair (its inbound SA is the data path's
    default); ``sending``: the pair whose outbound SA carries traffic; ``pending``: a re-key we
    answered, sending once the pair it replaced is deleted."""

    __slots__ = ("pairs", "current", "sending", "pending", "retired")

    def __init__(self) -> None:
        self.pairs: dict[int, Pair] = {}                 # by inbound SPI, oldest first
        self.current: Pair | None = None
        self.sending: Pair | None = None
        self.pending: Pair | None = None
        self.retired: dict[int, tuple[float, SecurityAssociation]] = {}   # spi -> (until, SA)


class ChildSaBook:
    def __init__(self, *, inbound_any_source: bool = False, with_selector: bool = True,
                 lifetime: Any = None, grace_s: float = CHILD_SA_DELETE_GRACE_S,
                 follow_moves: bool = True, spi_taken: Callable[[int], bool] | None = None):
        self.inbound_any_source = inbound_any_source
        self.with_selector = with_selector
        self.lifetime = lifetime
        self.grace_s = grace_s
        self.follow_moves = follow_moves
        self.spi_taken = spi_taken or (lambda spi: False)
        self.lanes: dict[IkeSaId, Lane] = {}
        self.inbound: dict[int, SecurityAssociation] = {}   # every live and retired inbound SA

    # --- views ----------------------------------------------------------------------------------

    def lane(self, ike_id: IkeSaId | None) -> Lane | None:
        return self.lanes.get(ike_id) if ike_id is not None else None

    @property
    def pairs(self) -> dict[int, Pair]:
        return {spi: p for lane in self.lanes.values() for spi, p in lane.pairs.items()}

    @property
    def retired(self) -> dict[int, float]:
        return {spi: at for lane in self.lanes.values() for spi, (at, _sa) in lane.retired.items()}

    @property
    def outbound(self) -> SecurityAssociation | None:
        for lane in reversed(self.lanes.values()):
            if lane.sending is not None:
                return lane.sending.outbound
        return None

    def sas(self) -> list[SecurityAssociation]:
        """Every SA held: both of each pair, and the retired inbound ones."""
        out: list[SecurityAssociation] = []
        for lane in self.lanes.values():
            for p in lane.pairs.values():
                out += [p.inbound, p.outbound]
            out += [sa for _at, sa in lane.retired.values()]
        return out

    def sizes(self) -> dict[str, int]:
        return {"pairs": sum(len(lane.pairs) for lane in self.lanes.values()),
                "retired": sum(len(lane.retired) for lane in self.lanes.values()),
                "inbound": len(self.inbound), "lanes": len(self.lanes)}

    # --- events in, changes out -------------------------------------------------------------------

    def apply(self, event: object, now: float = 0.0) -> list[Change]:
        out = self.expire(now)
        cls = event.__class__
        if cls is ChildSaEstablished:
            assert isinstance(event, ChildSaEstablished)
            out += self._install(event.ike_id, event.child, now, rekey=False, send_on_new=True)
        elif cls is ChildSaRekeyed:
            assert isinstance(event, ChildSaRekeyed)
            out += self._install(event.ike_id, event.new, now, rekey=True,
                                 send_on_new=event.send_on_new)
        elif cls is ChildSaDeleted:
            assert isinstance(event, ChildSaDeleted)
            out += self._delete(event.ike_id, event.child.spi_in, now)
        elif cls is IkeSaRekeyed:
            assert isinstance(event, IkeSaRekeyed)
            self._take_over(event.ike_id, event.new_id)
        elif cls is IkeSaDeleted or cls is IkeSaFailed:
            assert isinstance(event, (IkeSaDeleted, IkeSaFailed))
            out += self._end(event.ike_id)
        elif cls is PeerAddressChanged and self.follow_moves:
            assert isinstance(event, PeerAddressChanged)
            out += self._rebind(event)
        return out

    def expire(self, now: float) -> list[Change]:
        """Forget the retired inbound SAs whose grace period is over."""
        out: list[Change] = []
        for ike_id, lane in self.lanes.items():
            for spi, (at, sa) in list(lane.retired.items()):
                if now >= at:
                    out.append(self._forget(ike_id, lane, spi, sa))
        return out

    def get_timer(self) -> float | None:
        return min((at for lane in self.lanes.values() for at, _sa in lane.retired.values()),
                   default=None)

    # --- the rules --------------------------------------------------------------------------------

    def _install(self, ike_id: IkeSaId, child: ChildSa, now: float, *, rekey: bool,
                 send_on_new: bool) -> list[Change]:
        if child.spi_in in self.inbound or self.spi_taken(child.spi_in):
            return [PairRefused(ike_id, child, f"inbound SPI {child.spi_in:08x} is in use")]
        try:
            sin, sout = child.make_sas(now=now, inbound_any_source=self.inbound_any_source,
                                       with_selector=self.with_selector, lifetime=self.lifetime)
        except (ConfigError, UsageError) as exc:
            # values an authenticated peer chose that our SAs cannot take: refused, never raised
            return [PairRefused(ike_id, child, str(exc))]
        lane = self.lanes.setdefault(ike_id, Lane())
        pair = Pair(child, sin, sout)
        lane.pairs[child.spi_in] = pair
        self.inbound[child.spi_in] = sin
        lane.current = pair
        out: list[Change] = [PairInstalled(ike_id, pair, rekey, send_on_new)]
        if not rekey or lane.sending is None:
            lane.sending, lane.pending = pair, None
        elif send_on_new:
            out += self._switch(ike_id, lane, pair)
        else:
            lane.pending = pair
        return out

    def _switch(self, ike_id: IkeSaId, lane: Lane, to: Pair) -> list[Change]:
        """Send on ``to`` from now on, at the outer addresses the pair sending so far had."""
        lane.pending = None
        old = lane.sending
        if to is old:
            return []
        lane.sending = to
        new = to.outbound
        if old is not None:
            cur = old.outbound
            if new.udp_encap is not None and cur.udp_encap is not None:
                new.rebind(local=cur.local, remote=cur.remote,
                           udp_encap=UdpEncap(new.udp_encap.local_port, cur.udp_encap.remote_port))
            else:
                new.rebind(local=cur.local, remote=cur.remote)
        return [SendingSwitched(ike_id, old.outbound if old is not None else None, new)]

    def _delete(self, ike_id: IkeSaId, spi_in: int, now: float) -> list[Change]:
        lane = self.lanes.get(ike_id)
        if lane is None or spi_in not in lane.pairs:
            return []          # not this IKE SA's (e.g. a child we refused: its SPI is another's)
        pair = lane.pairs.pop(spi_in)
        if lane.pending is pair:
            lane.pending = None                    # a pair that lost a re-key collision
        if not lane.pairs:
            # its IKE SA's last child: nothing left to fall back on, the retired ones go too
            lane.current = lane.sending = None
            self.inbound.pop(spi_in, None)
            out: list[Change] = [PairRemoved(ike_id, pair, True)]
            for spi, (_at, sa) in list(lane.retired.items()):
                out.append(self._forget(ike_id, lane, spi, sa))
            return out
        until = now + self.grace_s
        lane.retired[spi_in] = (until, pair.inbound)
        out = [PairRetired(ike_id, pair, until)]
        if pair is lane.current:
            # §2.8.1: the newest pair lost a collision; the newest other one carries on
            survivor = next(reversed(lane.pairs.values()))
            lane.current = survivor
            if lane.sending is not survivor:
                out += self._switch(ike_id, lane, survivor)
            out.append(FellBack(ike_id, pair, survivor))
        elif lane.pending is not None or lane.sending is pair:
            # the Delete of a replaced pair shows the peer has the new one: send on it
            out += self._switch(ike_id, lane, lane.pending or lane.current or pair)
        return out

    def _forget(self, ike_id: IkeSaId, lane: Lane, spi: int,
                sa: SecurityAssociation) -> InboundForgotten:
        del lane.retired[spi]
        if self.inbound.get(spi) is sa:
            del self.inbound[spi]
        return InboundForgotten(ike_id, sa)

    def _end(self, ike_id: IkeSaId) -> list[Change]:
        """An IKE SA ended: its children were reported deleted before; whatever is left goes."""
        lane = self.lanes.get(ike_id)
        if lane is None:
            return []
        out: list[Change] = []
        pairs = list(lane.pairs.values())
        for i, pair in enumerate(pairs):
            del lane.pairs[pair.child.spi_in]
            self.inbound.pop(pair.child.spi_in, None)
            out.append(PairRemoved(ike_id, pair, i == len(pairs) - 1))
        for spi, (_at, sa) in list(lane.retired.items()):
            out.append(self._forget(ike_id, lane, spi, sa))
        del self.lanes[ike_id]
        return out

    def _take_over(self, old: IkeSaId, new: IkeSaId) -> None:
        """After an IKE SA re-key (§2.18) the children belong to the new IKE SA, so the old
        one's ``IkeSaDeleted`` leaves them alone."""
        lane = self.lanes.pop(old, None)
        if lane is None:
            return
        self.lanes[new] = lane

    def _rebind(self, ev: PeerAddressChanged) -> list[Change]:
        lane = self.lanes.get(ev.ike_id)
        if lane is None or not lane.pairs:
            return []
        local, remote = ev.local[0], ev.remote[0]
        for child, sin, sout in lane.pairs.values():
            if sout.udp_encap is not None and child.udp_encap:
                # a NAT may have moved the ports too (RFC 3948)
                enc = UdpEncap(local_port=ev.local[1], remote_port=ev.remote[1])
                sin.rebind(local=local, remote=None if self.inbound_any_source else remote,
                           udp_encap=enc)
                sout.rebind(local=local, remote=remote, udp_encap=enc)
            else:
                sin.rebind(local=local, remote=None if self.inbound_any_source else remote)
                sout.rebind(local=local, remote=remote)
        return [PairsRebound(ev.ike_id, tuple(lane.pairs.values()))]
