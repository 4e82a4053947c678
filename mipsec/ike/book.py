"""The ESP SAs that an IKE endpoint's events call for, kept in step with them.

A runtime (daemon, role, test peer) feeds every event from ``IkeEndpoint`` to
``ChildSaBook.apply``; the book keeps one (inbound, outbound) ``SecurityAssociation`` pair per
live child SA and answers the two questions the data path asks:

* ``book.inbound[spi]``: the inbound SA for an ESP packet's SPI (old and new both accepted while a
  re-key is completing, RFC 7296 §2.8, and the old one for ``CHILD_SA_DELETE_GRACE_S`` after
  its Delete: ESP sent on it may still be queued behind the Delete);
* ``book.outbound``: the SA to send with: after a re-key we initiated the new one at once, after
  one we answered the old one until its Delete (the peer installs the new SA only when our
  answer arrives; ``ChildSaRekeyed.send_on_new``).

``apply`` returns what changed, so a runtime with its own SAD/SPD can mirror it:
``("installed", child, inbound, outbound)``, ``("retired", child, inbound, outbound)`` (a
re-keyed child was deleted: its outbound SA is gone, its inbound SA stays for the grace period),
``("removed", child, inbound, outbound)``, ``("rebound", child, inbound, outbound)`` (MOBIKE or a
NAT mapping moved the outer addresses: the SA objects are re-pointed in place, keys, counters
and replay windows kept).  ``expire(now)`` (also run by every ``apply``) removes the retired
inbound SAs whose grace period is over; ``get_timer()`` says when that is due.
"""

from __future__ import annotations

from typing import Any

from mipsec.ike.constants import CHILD_SA_DELETE_GRACE_S
from mipsec.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    IkeSaFailed,
    IkeSaRekeyed,
    PeerAddressChanged,
)


class ChildSaBook:
    def __init__(self, *, inbound_any_source: bool = False, with_selector: bool = True,
                 lifetime: Any = None, grace_s: float = CHILD_SA_DELETE_GRACE_S):
        self.inbound_any_source = inbound_any_source
        self.with_selector = with_selector
        self.lifetime = lifetime
        self.grace_s = grace_s
        self.pairs: dict[int, tuple[Any, Any, Any]] = {}    # spi_in -> (child, inbound, outbound)
        self.inbound: dict[int, Any] = {}
        self.outbound: Any = None
        self._owner: dict[int, Any] = {}                    # spi_in -> IKE SA
        self._order: list[int] = []                         # spi_in, oldest first
        self._replaced: set[int] = set()                    # spi_in of re-keyed children
        # re-keyed children deleted, inbound SA kept: spi_in -> (forget at, entry, IKE SA)
        self.retired: dict[int, tuple[float, tuple[Any, Any, Any], Any]] = {}

    def apply(self, event: Any, now: float = 0.0) -> list[tuple]:
        return self.expire(now) + self._apply(event, now)

    def _apply(self, event: Any, now: float) -> list[tuple]:
        if isinstance(event, ChildSaEstablished):
            return [self._install(event.ike_id, event.child, now)]
        if isinstance(event, ChildSaRekeyed):
            if event.old is not None and event.old.spi_in in self.pairs:
                self._replaced.add(event.old.spi_in)
            return [self._install(event.ike_id, event.new, now, event.send_on_new)]
        if isinstance(event, ChildSaDeleted):
            spi = event.child.spi_in
            if spi in self._replaced:
                return self._retire(spi, now)
            return self._remove(spi)
        if isinstance(event, IkeSaRekeyed):
            self.take_over(event.ike_id, event.new_id)
            return []
        if isinstance(event, (IkeSaDeleted, IkeSaFailed)):
            # a child SA never outlives its IKE SA, a retired one neither
            out = []
            for spi, owner in list(self._owner.items()):
                if owner == event.ike_id:
                    out += self._remove(spi)
            for spi, (_at, _entry, owner) in list(self.retired.items()):
                if owner == event.ike_id:
                    out += self._forget(spi)
            return out
        if isinstance(event, PeerAddressChanged):
            out = []
            for spi in list(self._order):
                child, sin, sout = self.pairs[spi]
                if self._owner[spi] != event.ike_id:
                    continue
                local, remote = event.local[0], event.remote[0]
                kw = {}
                if sout.udp_encap is not None and child.udp_encap:
                    # a NAT may have moved the ports too (RFC 3948)
                    from mipsec.ipsec.sa import UdpEncap
                    kw["udp_encap"] = UdpEncap(local_port=event.local[1],
                                               remote_port=event.remote[1])
                sin.rebind(local=local, remote=None if self.inbound_any_source else remote, **kw)
                sout.rebind(local=local, remote=remote, **kw)
                out.append(("rebound", child, sin, sout))
            return out
        return []

    def _install(self, ike_sa: Any, child: Any, now: float, send_on_new: bool = True) -> tuple:
        sin, sout = child.make_sas(now=now, inbound_any_source=self.inbound_any_source,
                                   with_selector=self.with_selector, lifetime=self.lifetime)
        self.pairs[child.spi_in] = (child, sin, sout)
        self.inbound[child.spi_in] = sin
        self._owner[child.spi_in] = ike_sa
        self._order.append(child.spi_in)
        if send_on_new or self.outbound is None:
            self.outbound = sout
        return ("installed", child, sin, sout)

    def _unlink(self, spi_in: int) -> tuple | None:
        entry = self.pairs.pop(spi_in, None)
        if entry is None:
            return None
        owner = self._owner.pop(spi_in, None)
        self._order.remove(spi_in)
        self._replaced.discard(spi_in)
        if self.outbound is entry[2]:
            # the newest child left; one we answered becomes usable when the old one goes
            self.outbound = self.pairs[self._order[-1]][2] if self._order else None
        return entry, owner

    def _remove(self, spi_in: int) -> list[tuple]:
        got = self._unlink(spi_in)
        if got is None:
            return []
        self.inbound.pop(spi_in, None)
        return [("removed", *got[0])]

    def _retire(self, spi_in: int, now: float) -> list[tuple]:
        got = self._unlink(spi_in)
        if got is None:
            return []
        entry, owner = got
        self.retired[spi_in] = (now + self.grace_s, entry, owner)
        return [("retired", *entry)]

    def _forget(self, spi_in: int) -> list[tuple]:
        _at, entry, _owner = self.retired.pop(spi_in)
        self.inbound.pop(spi_in, None)
        return [("removed", *entry)]

    def expire(self, now: float) -> list[tuple]:
        """Forget the retired inbound SAs whose grace period is over."""
        out: list[tuple] = []
        for spi, (at, _entry, _owner) in list(self.retired.items()):
            if now >= at:
                out += self._forget(spi)
        return out

    def get_timer(self) -> float | None:
        return min((at for at, _e, _o in self.retired.values()), default=None)

    def take_over(self, old_ike_sa: Any, new_ike_sa: Any) -> None:
        """After an IKE SA re-key (``IkeSaRekeyed``) the children belong to the new IKE SA, so
        the old one's ``IkeSaDeleted`` leaves them alone."""
        for spi, owner in self._owner.items():
            if owner == old_ike_sa:
                self._owner[spi] = new_ike_sa
        for spi, (at, entry, owner) in self.retired.items():
            if owner == old_ike_sa:
                self.retired[spi] = (at, entry, new_ike_sa)
