"""The ESP SAs that an IKE endpoint's events call for, kept in step with them.

A runtime (daemon, role, test peer) feeds every event from ``IkeEndpoint`` to
``ChildSaBook.apply``; the book keeps one (inbound, outbound) ``SecurityAssociation`` pair per
live child SA and answers the two questions the data path asks:

* ``book.inbound[spi]``: the inbound SA for an ESP packet's SPI (old and new both accepted while a
  re-key is completing, RFC 7296 §2.8);
* ``book.outbound``: the SA to send with, the newest child (after a re-key the new one at once).

``apply`` returns what changed, so a runtime with its own SAD/SPD can mirror it:
``("installed", child, inbound, outbound)``, ``("removed", child, inbound, outbound)``,
``("rebound", child, inbound, outbound)`` (MOBIKE or a NAT mapping moved the outer addresses:
the SA objects are re-pointed in place, keys, counters and replay windows kept).
"""

from __future__ import annotations

from typing import Any

from mipsec.ike.config import (
    ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed, IkeSaDeleted, IkeSaFailed, IkeSaRekeyed,
    PeerAddressChanged,
)


class ChildSaBook:
    def __init__(self, *, inbound_any_source: bool = False, with_selector: bool = True,
                 lifetime: Any = None):
        self.inbound_any_source = inbound_any_source
        self.with_selector = with_selector
        self.lifetime = lifetime
        self.pairs: dict[int, tuple[Any, Any, Any]] = {}    # spi_in -> (child, inbound, outbound)
        self.inbound: dict[int, Any] = {}
        self.outbound: Any = None
        self._owner: dict[int, Any] = {}                    # spi_in -> IKE SA
        self._order: list[int] = []                         # spi_in, oldest first

    def apply(self, event: Any, now: float = 0.0) -> list[tuple]:
        if isinstance(event, ChildSaEstablished):
            return [self._install(event.ike_sa, event.child, now)]
        if isinstance(event, ChildSaRekeyed):
            return [self._install(event.ike_sa, event.new, now)]
        if isinstance(event, ChildSaDeleted):
            return self._remove(event.child.spi_in)
        if isinstance(event, IkeSaRekeyed):
            self.take_over(event.old, event.new)
            return []
        if isinstance(event, (IkeSaDeleted, IkeSaFailed)):
            out = []
            for spi, owner in list(self._owner.items()):
                if owner is event.ike_sa:
                    out += self._remove(spi)
            return out
        if isinstance(event, PeerAddressChanged):
            out = []
            for spi in list(self._order):
                child, sin, sout = self.pairs[spi]
                if self._owner[spi] is not event.ike_sa:
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

    def _install(self, ike_sa: Any, child: Any, now: float) -> tuple:
        sin, sout = child.make_sas(now=now, inbound_any_source=self.inbound_any_source,
                                   with_selector=self.with_selector, lifetime=self.lifetime)
        self.pairs[child.spi_in] = (child, sin, sout)
        self.inbound[child.spi_in] = sin
        self._owner[child.spi_in] = ike_sa
        self._order.append(child.spi_in)
        self.outbound = sout
        return ("installed", child, sin, sout)

    def _remove(self, spi_in: int) -> list[tuple]:
        entry = self.pairs.pop(spi_in, None)
        if entry is None:
            return []
        self.inbound.pop(spi_in, None)
        self._owner.pop(spi_in, None)
        self._order.remove(spi_in)
        if self.outbound is entry[2]:
            self.outbound = self.pairs[self._order[-1]][2] if self._order else None
        return [("removed", *entry)]

    def take_over(self, old_ike_sa: Any, new_ike_sa: Any) -> None:
        """After an IKE SA re-key (``IkeSaRekeyed``) the children belong to the new IKE SA, so
        the old one's ``IkeSaDeleted`` leaves them alone."""
        for spi, owner in self._owner.items():
            if owner is old_ike_sa:
                self._owner[spi] = new_ike_sa
