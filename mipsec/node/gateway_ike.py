"""The VPN gateway's IKEv2 integration (docs/ikev2.md "Integration"), sans-I/O.

``VpnGateway`` takes these methods from ``GatewayIke``: a child SA IKEv2 installs becomes the
MN's SA pair (``install_mobile``) and is bound at once to where its IKE_AUTH came from (the
binding machine's IKE_INSTALLED, ``_bind_to_ike``); a re-key installs the new pair and keeps the
binding (``_install_rekeyed``).  Which pair is installed, which one sends and which inbound SA
keeps its grace period after a Delete is the shared bookkeeping's (``mipsec.ike.book``, as on
the MN): ``_pairs_changed`` mirrors what it reports into the MN's entry and the SAD.  In MOBIKE
mode an authenticated UPDATE_SA_ADDRESSES moves the SA
(MOBIKE_MOVED, ``_mobike_move``), in SIU mode an IKE address change never does
(ESP_MOVE_NOT_BY_SIU).  A child the peer negotiated that our SAD cannot take is counted
(IKE_CHILD_UNUSABLE) and deleted at the peer, never raised.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mipsec.constants import UNSPECIFIED_ADDRESS
from mipsec.drops import DropReason
from mipsec.errors import UsageError
from mipsec.ike.book import (
    Change,
    ChildSaBook,
    FellBack,
    InboundForgotten,
    PairInstalled,
    PairRefused,
    PairRemoved,
    PairRetired,
    SendingSwitched,
)
from mipsec.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
    PeerAddressChanged,
)
from mipsec.ipsec.sa import SecurityAssociation, UdpEncap
from mipsec.ipsec.sad import Sad
from mipsec.mip import ipip
from mipsec.mobility.gw_binding import BindingEvent, Effect
from mipsec.node import timeline as tl
from mipsec.node.actions import Action, Log, RebindSa, TimelineEvent
from mipsec.node.config import GatewayConfig, GatewayMobile
from mipsec.node.ike import RoleIke
from mipsec.node.packet import a2b

if TYPE_CHECKING:
    from mipsec.node.gateway import Mobile

UNBOUND_ADDRESS = UNSPECIFIED_ADDRESS    # the outer destination of an SA no SIU has bound
LINEAGE_SPIS = 16          # earlier outbound SPIs per MN an SIU may still name (re-keys)


class GatewayIke:
    """The IKEv2 half of ``VpnGateway`` (see the module docstring); the attributes below are
    the GW's, set by ``VpnGateway.__init__``."""

    name: str
    config: GatewayConfig
    ike: RoleIke | None
    sad: Sad
    mobiles: dict[str, Mobile]
    timeline: list[TimelineEvent]
    drops: Counter[DropReason]
    _by_spi: dict[int, Mobile]
    _by_ike_id: dict[str, GatewayMobile]
    book: ChildSaBook
    _own_addresses: frozenset[str]

    if TYPE_CHECKING:      # VpnGateway's own methods, used here
        def _drop(self, reason: DropReason) -> list[Action]: ...
        def install_mobile(self, home_address: str, inbound_sa: SecurityAssociation,
                           outbound_sa: SecurityAssociation, *, home_agent: str,
                           allowed_destinations: Iterable[str],
                           now: float = 0.0, road_warrior: bool = False) -> list[Action]: ...
        def remove_mobile(self, home_address: str) -> None: ...

    def _ike_outputs(self, outputs: list, now: float) -> list[Action]:
        return RoleIke.actions(outputs, lambda event: self._ike_event(event, now))

    @property
    def _ikev2(self) -> RoleIke:
        """The GW's IKEv2 side: only the IKE paths use it, and they run only with IKEv2."""
        if self.ike is None:
            raise UsageError(f"GW {self.name}: manual keys, no IKEv2")
        return self.ike

    def _ike_mobile(self, peer_id: str) -> Mobile | None:
        cfg = self._by_ike_id.get(peer_id)
        return self.mobiles.get(cfg.home_address) if cfg is not None else None

    def _ike_event(self, ev: Any, now: float) -> list[Action]:
        cls = ev.__class__
        if cls is ChildSaEstablished:
            cfg = self._by_ike_id.get(ev.peer_id)
            if cfg is None:               # cannot happen: only configured identities have a PSK
                return [Log("warning", f"child SA for unknown IKE identity {ev.peer_id}")]
            return self._pairs_changed(self.book.apply(ev, now), now, cfg=cfg, remote=ev.remote)
        if cls is ChildSaRekeyed:
            mobile = self._ike_mobile(ev.peer_id)
            if mobile is None or mobile.ike_id != ev.ike_id:
                return []
            self._ikev2.note(now, f"{ev.peer_id}: child re-keyed -> {ev.new.spi_in:08x}/"
                               f"{ev.new.spi_out:08x}", rekey=True)
            return self._pairs_changed(self.book.apply(ev, now), now, rekeyed=mobile)
        if cls is ChildSaDeleted:
            return self._pairs_changed(self.book.apply(ev, now), now)
        if cls is IkeSaRekeyed:
            actions = self._pairs_changed(self.book.apply(ev, now), now)   # (grace expiries)
            for m in self.mobiles.values():
                if m.ike_id == ev.ike_id:
                    m.ike_id = ev.new_id
            self._ikev2.note(now, f"IKE SA {ev.name} re-keyed", rekey=True)
            return actions
        if cls is PeerAddressChanged:
            mobile = self._ike_mobile(ev.peer_id)
            if mobile is None or mobile.ike_id != ev.ike_id:
                return []
            if self.config.handover_mode != "mobike" or not ev.explicit:
                # SIU mode, or a NAT-T float (RFC 7296 §2.23) in MOBIKE mode: IKE follows the
                # address of an authenticated request, the ESP SA does not: only an SIU (or an
                # UPDATE_SA_ADDRESSES in MOBIKE mode) moves it (docs/security.md)
                self.drops[DropReason.ESP_MOVE_NOT_BY_SIU] += 1
                tl.record(self.timeline, now, self.name, "gw-esp-not-moved",
                          home_address=mobile.home_address, ike_remote=ev.remote[0],
                          care_of=mobile.care_of)
                return []
            return self._mobike_move(mobile, ev.remote, now)
        if cls is IkeSaEstablished:
            self._ikev2.note(now, f"IKE SA {ev.name} up with {ev.peer_id} at {ev.remote[0]}")
            return []
        if cls is IkeSaDeleted or cls is IkeSaFailed:
            # every IKE SA that ends is logged and, for a known MN, in its timeline (its child
            # SAs were reported deleted just before: RFC 7296 §1.4.1)
            actions = self._pairs_changed(self.book.apply(ev, now), now)
            self._ikev2.note(now, f"IKE SA {ev.name} ended: {ev.reason}")
            mobile = self._ike_mobile(ev.peer_id)
            if mobile is not None:
                tl.record(self.timeline, now, self.name, "ike-ended",
                          home_address=mobile.home_address, ike_sa=ev.name,
                          reason=ev.reason)
            return actions + [Log("info", f"IKE SA {ev.name} with {ev.peer_id or '?'} "
                                          f"ended: {ev.reason}")]
        return []

    def _owner_of(self, ike_id: bytes, spi: int) -> Mobile | None:
        """The MN whose SA ``spi`` of the IKE SA ``ike_id`` is (None: not ours, e.g. an MN
        entry that was replaced meanwhile)."""
        mobile = self._by_spi.get(spi)
        return mobile if mobile is not None and mobile.ike_id == ike_id else None

    def _pairs_changed(self, changes: list[Change], now: float, *,
                       cfg: GatewayMobile | None = None, remote: tuple[str, int] | None = None,
                       rekeyed: Mobile | None = None) -> list[Action]:
        """Mirror what the shared child SA bookkeeping (``mipsec.ike.book``) changed into the
        MNs' entries and the SAD.  A new child (``cfg``: the MN its identity names, ``remote``:
        where its IKE_AUTH came from) becomes the MN's pair; a re-key (``rekeyed``: that MN)
        adds the new inbound SA at once and keeps the binding."""
        actions: list[Action] = []
        lane: dict[bytes, Mobile] = {}         # the MN of each IKE SA met in this batch
        for ch in changes:
            cls = ch.__class__
            if cls is PairInstalled:
                assert isinstance(ch, PairInstalled)
                if not ch.rekey and cfg is not None and remote is not None:
                    actions += self._install_child(ch, cfg, remote, now)
                    lane[ch.ike_id] = self.mobiles[cfg.home_address]
                elif ch.rekey and rekeyed is not None:
                    lane[ch.ike_id] = rekeyed
                    self._install_rekeyed(rekeyed, ch, now)
            elif cls is SendingSwitched:
                assert isinstance(ch, SendingSwitched)
                mobile = lane.get(ch.ike_id)
                if mobile is not None and ch.old is mobile.outbound:
                    # the binding's address (the book re-pointed it), not where IKE moved
                    mobile.lineage = (mobile.lineage + [ch.old.spi])[-LINEAGE_SPIS:]
                    mobile.outbound = ch.new
                    actions.append(RebindSa(ch.new.spi, ch.new.local, ch.new.remote))
            elif cls is PairRetired:
                assert isinstance(ch, PairRetired)
                owner = self._owner_of(ch.ike_id, ch.pair.inbound.spi)
                if owner is not None:
                    lane[ch.ike_id] = owner     # keeps decrypting for the grace period
            elif cls is FellBack:
                assert isinstance(ch, FellBack)
                mobile = lane.get(ch.ike_id)
                if mobile is not None:
                    mobile.inbound = ch.survivor.inbound
                    tl.record(self.timeline, now, self.name, "gw-rekey-collision",
                              home_address=mobile.home_address, deleted_spi=ch.deleted.inbound.spi,
                              inbound_spi=mobile.inbound.spi, outbound_spi=mobile.outbound.spi)
            elif cls is PairRemoved:
                assert isinstance(ch, PairRemoved)
                actions += self._pair_removed(ch, now)
            elif cls is InboundForgotten:
                assert isinstance(ch, InboundForgotten)
                # its grace period is over (or its IKE SA's last child went): SPI unknown
                spi = ch.inbound.spi
                if self._owner_of(ch.ike_id, spi) is not None and self.sad.get(spi) is ch.inbound:
                    self.sad.remove(spi)
                    del self._by_spi[spi]
            elif cls is PairRefused:
                assert isinstance(ch, PairRefused)
                # a child the peer negotiated that our SAD cannot take (values an authenticated
                # peer chose): refused and counted, never raised out of receive_from_net; the
                # peer is told (RFC 7296 §1.4.1) so that it sends no ESP we cannot decrypt
                self.drops[DropReason.IKE_CHILD_UNUSABLE] += 1
                actions.append(Log("warning", f"IKE child SA not installed: {ch.reason}"))
                actions += RoleIke.run(self._ikev2.endpoint.delete_child(
                    ch.ike_id, ch.child.spi_in, now))[0]
        return actions

    def _install_child(self, ch: PairInstalled, cfg: GatewayMobile, remote: tuple[str, int],
                       now: float) -> list[Action]:
        """A new child SA is the MN's pair, bound at once to where its IKE_AUTH came from."""
        child, sin, sout = ch.pair
        sout.rebind(remote=UNBOUND_ADDRESS)           # bound below, through the table
        actions = self.install_mobile(cfg.home_address, sin, sout, home_agent=cfg.home_agent,
                                      allowed_destinations=cfg.allowed_destinations, now=now,
                                      road_warrior=cfg.road_warrior)
        installed = self.mobiles[cfg.home_address]
        installed.ike_id = ch.ike_id
        self._ikev2.note(now, f"{cfg.ike_id}: child {child.spi_in:08x}/"
                           f"{child.spi_out:08x} installed")
        tl.record(self.timeline, now, self.name, "gw-sas-installed",
                  home_address=cfg.home_address, ike_id=cfg.ike_id, inbound_spi=sin.spi,
                  outbound_spi=sout.spi, peer=remote[0])
        return actions + self._bind_to_ike(installed, remote, now)

    def _install_rekeyed(self, mobile: Mobile, ch: PairInstalled, now: float) -> None:
        """A re-key (CREATE_CHILD_SA) keeps the binding.  The new inbound SA receives at once,
        the old one until its Delete and a grace period after it (RFC 7296 §2.8).  The new
        outbound SA carries the downlink at once when we initiated the re-key (the MN installed
        the pair before it answered); when we answered only once the MN deletes the old pair,
        which it does after installing the new one, so no downlink reaches it on an SPI it does
        not know (the book's ``SendingSwitched``)."""
        _child, sin, sout = ch.pair
        mobile.inbound = sin
        self.sad.add(sin)
        self._by_spi[sin.spi] = mobile
        tl.record(self.timeline, now, self.name, "gw-sas-rekeyed",
                  home_address=mobile.home_address, inbound_spi=sin.spi,
                  outbound_spi=sout.spi, old_outbound_spi=mobile.outbound.spi,
                  care_of=mobile.care_of, send_on_new=ch.send_on_new)

    def _pair_removed(self, ch: PairRemoved, now: float) -> list[Action]:
        """A pair gone at once.  The MN's last one takes its entry with it (no SA pair left:
        its downlink then finds no policy)."""
        spi = ch.pair.inbound.spi
        mobile = self._owner_of(ch.ike_id, spi)
        if mobile is None:
            return []
        if ch.last and mobile.inbound is ch.pair.inbound \
                and self.mobiles.get(mobile.home_address) is mobile:
            self.remove_mobile(mobile.home_address)
            tl.record(self.timeline, now, self.name, "mobile-removed",
                      home_address=mobile.home_address, spi=spi)
        elif self.sad.get(spi) is ch.pair.inbound:
            self.sad.remove(spi)
            del self._by_spi[spi]
        return []

    def _bind_to_ike(self, mobile: Mobile, remote: tuple[str, int], now: float) -> list[Action]:
        """IKE just installed the MN's pair (the table's IKE_INSTALLED): point its outbound SA
        at ``remote``, the address (and, with UDP encapsulation, the port) of the authenticated
        IKE peer: the IKE_AUTH response reached it.  The HA's SIU later moves it as usual."""
        address = remote[0]
        if ipip.unusable_care_of(address, self._own_addresses) or mobile.allows(a2b(address)):
            return self._drop(DropReason.MIP_BAD_CARE_OF)     # stays FRESH: the SIU binds it
        effect = mobile.fire(BindingEvent.IKE_INSTALLED)
        if effect is not Effect.BIND_IKE:
            return []
        sa = mobile.outbound
        if sa.udp_encap is not None:
            sa.rebind(remote=address, udp_encap=UdpEncap(sa.udp_encap.local_port, remote[1]))
        else:
            sa.rebind(remote=address)
        mobile.care_of = address
        tl.record(self.timeline, now, self.name, "gw-sa-bound-by-ike",
                  home_address=mobile.home_address, remote=address, spi=sa.spi)
        return [RebindSa(sa.spi, sa.local, address)]

    def _mobike_move(self, mobile: Mobile, remote: tuple[str, int], now: float) -> list[Action]:
        """MOBIKE (RFC 4555) moved the MN's IKE SA by an authenticated UPDATE_SA_ADDRESSES:
        move its outbound SA there now (the table's MOBIKE_MOVED).  The downlink is keyed by
        the home address, so the HA's IP-in-IP to the old CoA already goes to the new one; the
        HA's SIU then finds the SA "already there" (docs/protocol.md §2.4)."""
        new = remote[0]
        if mobile.care_of == new:
            return []
        if ipip.unusable_care_of(new, self._own_addresses) or mobile.allows(a2b(new)):
            return self._drop(DropReason.MIP_BAD_CARE_OF)
        effect = mobile.fire(BindingEvent.MOBIKE_MOVED)
        if effect is not Effect.MOBIKE:
            return []        # never bound: the SIU binds it (the HA has not heard of it yet)
        old = mobile.care_of
        sa = mobile.outbound
        if sa.udp_encap is not None:
            sa.rebind(remote=new, udp_encap=UdpEncap(sa.udp_encap.local_port, remote[1]))
        else:
            sa.rebind(remote=new)
        mobile.care_of = new
        mobile.mobike_moved = True
        tl.record(self.timeline, now, self.name, "gw-sa-moved-by-mobike",
                  home_address=mobile.home_address, old=old, new=new, spi=sa.spi)
        return [RebindSa(sa.spi, sa.local, new)]
