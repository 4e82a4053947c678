"""The VPN gateway's IKEv2 integration (docs/ikev2.md "Integration"), sans-I/O.

``VpnGateway`` takes these methods from ``GatewayIke``: a child SA IKEv2 installs becomes the
MN's SA pair (``install_mobile``) and is bound at once to where its IKE_AUTH came from (the
binding machine's IKE_INSTALLED, ``_bind_to_ike``); a re-key installs the new pair and keeps the
binding (``rekey_mobile``); a Delete retires an inbound SA after a grace period
(``retire_inbound``); in MOBIKE mode an authenticated UPDATE_SA_ADDRESSES moves the SA
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
from mipsec.errors import ConfigError, UsageError
from mipsec.ike.constants import CHILD_SA_DELETE_GRACE_S
from mipsec.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
    PeerAddressChanged,
    SendDatagram,
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
    _grace: dict[int, float]
    _own_addresses: frozenset[str]

    if TYPE_CHECKING:      # VpnGateway's own methods, used here
        def _drop(self, reason: DropReason) -> list[Action]: ...
        def install_mobile(self, home_address: str, inbound_sa: SecurityAssociation,
                           outbound_sa: SecurityAssociation, *, home_agent: str,
                           allowed_destinations: Iterable[str],
                           now: float = 0.0, road_warrior: bool = False) -> list[Action]: ...
        def remove_mobile(self, home_address: str) -> None: ...

    def rekey_mobile(self, home_address: str, inbound_sa: SecurityAssociation,
                     outbound_sa: SecurityAssociation, now: float = 0.0,
                     send_on_new: bool = True) -> list[Action]:
        """A re-key (IKEv2 CREATE_CHILD_SA) keeps the binding.  The new inbound SA is installed
        at once; the old one keeps receiving until its Delete and a grace period after it
        (``retire_inbound``, RFC 7296 §2.8).  The new outbound SA carries the downlink at once
        when we initiated the re-key (the MN installed the pair before it answered); when we
        answered (``send_on_new`` false) only once the MN deletes the old pair, which it does
        after installing the new one, so no downlink reaches it on an SPI it does not know."""
        mobile = self.mobiles[home_address]
        if inbound_sa.remote is not None:
            raise UsageError("rekey_mobile: the inbound SA must have a wildcard source")
        old_in = mobile.inbound
        mobile.old_inbound[old_in.spi] = old_in
        mobile.inbound = inbound_sa
        mobile.pair_outbound[inbound_sa.spi] = outbound_sa
        self.sad.add(inbound_sa)
        self._by_spi[inbound_sa.spi] = mobile
        old_out = mobile.outbound
        tl.record(self.timeline, now, self.name, "gw-sas-rekeyed", home_address=home_address,
                  inbound_spi=inbound_sa.spi, outbound_spi=outbound_sa.spi,
                  old_outbound_spi=old_out.spi, care_of=mobile.care_of, send_on_new=send_on_new)
        mobile.next_outbound = outbound_sa
        if send_on_new:
            return self._send_on_next(mobile)
        return []

    def _send_on_next(self, mobile: Mobile) -> list[Action]:
        """Switch the MN's downlink to the re-key's new outbound SA, at the current binding."""
        new, mobile.next_outbound = mobile.next_outbound, None
        if new is None:
            return []
        current = mobile.outbound
        # where the current SA points (the binding's registration), not where IKE moved
        if new.udp_encap is not None and current.udp_encap is not None:
            new.rebind(remote=current.remote or UNBOUND_ADDRESS, udp_encap=UdpEncap(
                new.udp_encap.local_port, current.udp_encap.remote_port))
        else:
            new.rebind(remote=current.remote or UNBOUND_ADDRESS)
        mobile.lineage = (mobile.lineage + [mobile.outbound.spi])[-LINEAGE_SPIS:]
        mobile.outbound = new
        return [RebindSa(new.spi, new.local, new.remote)]

    def retire_inbound(self, spi: int, now: float = 0.0) -> list[Action]:
        """An inbound SA deleted by IKE.  A re-keyed one keeps decrypting for
        ``CHILD_SA_DELETE_GRACE_S`` (ESP the MN sent on it may still be queued behind the
        Delete), then it is forgotten (``handle_timer``); its Delete also shows that the MN
        has the new pair, so a re-key we answered now carries the downlink.  If it was the
        MN's current one, the MN's entry goes with it (no SA pair left: its downlink then
        finds no policy)."""
        mobile = self._by_spi.get(spi)
        if mobile is None:
            return []
        deleted_out = mobile.pair_outbound.pop(spi, None)
        if spi in mobile.old_inbound:
            if spi not in self._grace:
                self._grace[spi] = now + CHILD_SA_DELETE_GRACE_S
            if deleted_out is not None and mobile.next_outbound is deleted_out:
                mobile.next_outbound = None        # a pair that lost a re-key collision
            return self._send_on_next(mobile)
        if mobile.inbound.spi != spi or self.mobiles.get(mobile.home_address) is not mobile:
            return []
        survivor = next((s for s in reversed(mobile.old_inbound)
                         if s in mobile.pair_outbound and s not in self._grace), None)
        if survivor is not None:
            return self._fall_back(mobile, survivor, deleted_out, now)
        self.remove_mobile(mobile.home_address)
        tl.record(self.timeline, now, self.name, "mobile-removed",
                  home_address=mobile.home_address, spi=spi)
        return []

    def _fall_back(self, mobile: Mobile, survivor: int,
                   deleted_out: SecurityAssociation | None, now: float) -> list[Action]:
        """Both ends re-keyed the same child (RFC 7296 §2.8.1) and the pair the later re-key
        made here is the one deleted: the pair the other re-key made, not deleted, carries the
        MN's traffic again.  The deleted inbound SA keeps its grace period."""
        deleted = mobile.inbound
        mobile.old_inbound[deleted.spi] = deleted
        self._grace[deleted.spi] = now + CHILD_SA_DELETE_GRACE_S
        mobile.inbound = mobile.old_inbound.pop(survivor)
        out = mobile.pair_outbound[survivor]
        if mobile.next_outbound is deleted_out:
            mobile.next_outbound = None
        actions: list[Action] = []
        if mobile.outbound is not out:
            mobile.next_outbound = out
            actions = self._send_on_next(mobile)
        tl.record(self.timeline, now, self.name, "gw-rekey-collision",
                  home_address=mobile.home_address, deleted_spi=deleted.spi,
                  inbound_spi=mobile.inbound.spi, outbound_spi=mobile.outbound.spi)
        return actions

    def _ike_outputs(self, outputs: list, now: float) -> list[Action]:
        actions: list[Action] = []
        for out in outputs:
            if out.__class__ is SendDatagram:
                actions += RoleIke.run([out])[0]
                continue
            try:
                actions += self._ike_event(out, now)
            except (ConfigError, UsageError) as exc:
                # a child the peer negotiated that our SAD cannot take (values an authenticated
                # peer chose): refused and counted, never raised out of receive_from_net
                actions += self._unusable_child(out, exc, now)
        return actions

    def _unusable_child(self, ev: Any, exc: Exception, now: float) -> list[Action]:
        self.drops[DropReason.IKE_CHILD_UNUSABLE] += 1
        child = ev.child if ev.__class__ is ChildSaEstablished else (
            ev.new if ev.__class__ is ChildSaRekeyed else None)
        actions: list[Action] = [Log("warning", f"IKE child SA not installed: {exc}")]
        if child is not None:
            # tell the peer (RFC 7296 §1.4.1) so it does not send ESP we cannot decrypt
            actions += RoleIke.run(self._ikev2.endpoint.delete_child(ev.ike_id, child.spi_in,
                                                                      now))[0]
        return actions

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
            sin, sout = ev.child.make_sas(now=now, inbound_any_source=True)
            sout.rebind(remote=UNBOUND_ADDRESS)           # bound below, through the table
            actions = self.install_mobile(cfg.home_address, sin, sout, home_agent=cfg.home_agent,
                                          allowed_destinations=cfg.allowed_destinations, now=now,
                                          road_warrior=cfg.road_warrior)
            installed = self.mobiles[cfg.home_address]
            installed.ike_id = ev.ike_id
            self._ikev2.note(now, f"{cfg.ike_id}: child {ev.child.spi_in:08x}/"
                               f"{ev.child.spi_out:08x} installed")
            tl.record(self.timeline, now, self.name, "gw-sas-installed",
                      home_address=cfg.home_address, ike_id=cfg.ike_id, inbound_spi=sin.spi,
                      outbound_spi=sout.spi, peer=ev.remote[0])
            return actions + self._bind_to_ike(installed, ev.remote, now)
        if cls is ChildSaRekeyed:
            mobile = self._ike_mobile(ev.peer_id)
            if mobile is None or mobile.ike_id != ev.ike_id:
                return []
            sin, sout = ev.new.make_sas(now=now, inbound_any_source=True)
            self._ikev2.note(now, f"{ev.peer_id}: child re-keyed -> {ev.new.spi_in:08x}/"
                               f"{ev.new.spi_out:08x}", rekey=True)
            return self.rekey_mobile(mobile.home_address, sin, sout, now,
                                     send_on_new=ev.send_on_new)
        if cls is ChildSaDeleted:
            owner = self._by_spi.get(ev.child.spi_in)
            if owner is None or owner is not self._ike_mobile(ev.peer_id):
                return []     # not this peer's SA (e.g. a child we refused to install)
            return self.retire_inbound(ev.child.spi_in, now)
        if cls is IkeSaRekeyed:
            for m in self.mobiles.values():
                if m.ike_id == ev.ike_id:
                    m.ike_id = ev.new_id
            self._ikev2.note(now, f"IKE SA {ev.name} re-keyed", rekey=True)
            return []
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
            self._ikev2.note(now, f"IKE SA {ev.name} ended: {ev.reason}")
            mobile = self._ike_mobile(ev.peer_id)
            if mobile is not None:
                tl.record(self.timeline, now, self.name, "ike-ended",
                          home_address=mobile.home_address, ike_sa=ev.name,
                          reason=ev.reason)
            return [Log("info", f"IKE SA {ev.name} with {ev.peer_id or '?'} "
                                f"ended: {ev.reason}")]
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

    def _forget_inbound(self, spi: int) -> None:
        """The grace period of a deleted inbound SA is over: its SPI is unknown from now on."""
        mobile = self._by_spi.get(spi)
        if mobile is not None and mobile.old_inbound.pop(spi, None) is not None:
            mobile.pair_outbound.pop(spi, None)
            self.sad.remove(spi)
            del self._by_spi[spi]
