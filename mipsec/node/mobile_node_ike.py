"""The mobile node's IKEv2 integration (docs/ikev2.md "Integration"), sans-I/O.

``MobileNode`` takes these methods from ``MobileNodeIke``: it negotiates its IKE SA and child
SAs with the GW from its care-of address (``_ike_start``), re-establishes them with
INITIAL_CONTACT when the registration machine says so (``_ike_reestablish``; with a list of GWs,
with the next one: ``_next_gateway``), installs each child SA pair (``install_sas``), swaps pairs
on a re-key and keeps a re-keyed inbound SA for a grace period after its Delete
(``_swap_sas``, ``_child_deleted``), tells the GW of a move in MOBIKE mode (``_ike_moved``) and
ends its IKE SAs when the HA confirms it is home (``_ike_at_home``).  A child the GW negotiated
that cannot be installed is counted (IKE_CHILD_UNUSABLE) and deleted at the GW, never raised.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

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
    IkeSaId,
    IkeSaInfo,
    IkeSaRekeyed,
    PeerAddressChanged,
    SendDatagram,
)
from mipsec.ipsec.sa import SecurityAssociation
from mipsec.mobility.registration import AWAY, RegEvent, Registration, RegState
from mipsec.node.actions import Action, Log, RebindSa
from mipsec.node.config import MobileNodeConfig
from mipsec.node.ike import IKE_PORT, RoleIke


class MobileNodeIke:
    """The IKEv2 half of ``MobileNode`` (see the module docstring); the attributes below are
    the MN's, set by ``MobileNode.__init__``."""

    name: str
    config: MobileNodeConfig
    ike: RoleIke | None
    reg: Registration
    care_of: str | None
    interface: str | None
    inbound: SecurityAssociation | None
    outbound: SecurityAssociation | None
    drops: Counter[DropReason]
    gateways: tuple[str, ...]
    _gw_index: int
    _ike_id: IkeSaId | None
    _pairs: dict[int, tuple[Any, SecurityAssociation, SecurityAssociation]]
    _inbound_sas: dict[int, SecurityAssociation]
    _grace: dict[int, float]
    _ike_backoff_s: float
    _liveness_at: float | None
    _probe_deadline: float | None

    if TYPE_CHECKING:      # MobileNode's own members, used here
        @property
        def state(self) -> RegState: ...
        def _record(self, now: float, kind: str, **detail: Any) -> None: ...
        def _drop(self, reason: DropReason) -> list[Action]: ...
        def _event(self, event: RegEvent, now: float) -> list[Action]: ...
        def install_sas(self, inbound: SecurityAssociation, outbound: SecurityAssociation,
                        now: float = 0.0) -> list[Action]: ...

    @property
    def gateway(self) -> str:
        """The outside address of the GW in use."""
        return self.gateways[self._gw_index]

    def _next_gateway(self, now: float, why: str) -> list[Action]:
        """The GW in use is gone: abandon our IKE SAs with it and use the next in the list
        (round; nothing changes with one GW).  The caller negotiates with the new one."""
        if len(self.gateways) < 2:
            return []
        old = self.gateway
        self._gw_index = (self._gw_index + 1) % len(self.gateways)
        self._record(now, "gateway-changed", old=old, new=self.gateway, reason=why)
        self._ikev2.note(now, f"GW {old} gone ({why}): next GW {self.gateway}")
        saved, self._ike_id = self._ike_id, None      # its deletion must not start another
        actions: list[Action] = [Log("warning", f"GW {old} is gone ({why}): re-establishing "
                                                f"with the next GW in the list, {self.gateway}")]
        actions += self._ike_outputs(self._ikev2.endpoint.abandon(old, f"GW gone: {why}"), now)
        kept = self._ikev2.endpoint.info(saved)
        if kept is not None and kept.remote[0] != old:
            self._ike_id = saved
        return actions

    def _first_gateway(self, now: float) -> None:
        """The deliberate way back to the preferred GW: a start from scratch (leaving home)."""
        if self._gw_index:
            self._record(now, "gateway-changed", old=self.gateway, new=self.gateways[0],
                         reason="a new start: back to the first GW in the list")
            self._gw_index = 0

    def _ike_packet(self, packet: bytes, now: float) -> list[Action]:
        outputs, reason = self._ikev2.receive(packet, now)
        if reason is not None:
            return self._drop(reason)
        return self._ike_outputs(outputs, now)

    def _ike_outputs(self, outputs: list, now: float) -> list[Action]:
        """Datagrams -> SendToNet (from our interface), events -> SA changes, in order."""
        actions: list[Action] = []
        for out in outputs:
            if out.__class__ is SendDatagram:
                actions += RoleIke.run([out], self.interface)[0]
                continue
            try:
                actions += self._ike_event(out, now)
            except (ConfigError, UsageError) as exc:
                # a child the GW negotiated that we cannot install: counted, never raised
                self.drops[DropReason.IKE_CHILD_UNUSABLE] += 1
                actions.append(Log("warning", f"IKE child SA not installed: {exc}"))
                child = out.child if out.__class__ is ChildSaEstablished else (
                    out.new if out.__class__ is ChildSaRekeyed else None)
                if child is not None:
                    actions += RoleIke.run(self._ikev2.endpoint.delete_child(
                        out.ike_id, child.spi_in, now), self.interface)[0]
        return actions

    @property
    def _ikev2(self) -> RoleIke:
        """The MN's IKEv2 side: only the IKE paths use it, and they run only with IKEv2."""
        if self.ike is None:
            raise UsageError(f"MN {self.name}: manual keys, no IKEv2")
        return self.ike

    def _coa(self) -> str:
        """The care-of address IKE runs from (IKE starts only once there is one)."""
        if self.care_of is None:
            raise UsageError(f"MN {self.name}: no care-of address")
        return self.care_of

    def _ike_alive(self) -> IkeSaInfo | None:
        """The IKE SA we use with the GW, if it is still there."""
        return self._ikev2.endpoint.info(self._ike_id) if self.ike is not None else None

    def _ike_start(self, now: float) -> list[Action]:
        """Negotiate from the current CoA: follow with the IKE SA we have (still setting up, or
        up but without children), else start one."""
        sa = self._ike_alive()
        local = (self._coa(), IKE_PORT)
        if sa is not None and (sa.children or not sa.established):
            self._ikev2.endpoint.follow_addresses(sa.ike_id, local=self.care_of)
            return []
        if sa is not None:
            # up but its child SAs are gone: a fresh IKE SA, whose INITIAL_CONTACT makes the GW
            # drop this one too (both ends then agree on what exists)
            return self._ike_reestablish(now)
        self._ikev2.note(now, f"initiate from {self.care_of}")
        self._record(now, "ike-initiated", care_of=self.care_of, gateway=self.gateway)
        out = self._ikev2.endpoint.initiate(local, (self.gateway, IKE_PORT), now)
        self._ike_id = self._newest_ike_sa()
        return self._ike_outputs(out, now)

    def _ike_reestablish(self, now: float) -> list[Action]:
        """After ``max_attempts`` failed registrations: a new IKE SA and child SAs from the
        current CoA (INITIAL_CONTACT makes the GW drop the old ones), then register again."""
        self._ikev2.note(now, f"re-establish from {self.care_of}")
        self._record(now, "ike-reestablish", care_of=self.care_of)
        self._ike_id = None                   # its deletion below must not start another
        out = self._ikev2.endpoint.reestablish((self._coa(), IKE_PORT),
                                               (self.gateway, IKE_PORT), now)
        new = self._newest_ike_sa()
        actions = self._ike_outputs(out, now)
        self._ike_id = new
        return actions

    def _newest_ike_sa(self) -> IkeSaId | None:
        live = self._ikev2.endpoint.infos()
        return max(live, key=lambda sa: sa.created).ike_id if live else None

    def _ike_moved(self, coa: str, now: float) -> list[Action]:
        """The CoA changed: MOBIKE mode tells the GW by UPDATE_SA_ADDRESSES (RFC 4555 §3.5);
        SIU mode just sends from there (the GW learns the CoA from the HA's SIU)."""
        sa = self._ike_alive()
        if sa is None:
            return []
        endpoint = self._ikev2.endpoint
        if self.config.handover_mode == "mobike" and sa.established and sa.mobike:
            self._record(now, "mobike-update-sent", care_of=coa)
            return self._ike_outputs(endpoint.update_addresses(sa.ike_id, (coa, sa.local[1]),
                                                               now), now)
        endpoint.follow_addresses(sa.ike_id, local=coa)
        return []

    def _ike_event(self, ev: Any, now: float) -> list[Action]:
        cls = ev.__class__
        if cls is IkeSaEstablished:
            self._ikev2.note(now, f"IKE SA {ev.name} up with {ev.peer_id}")
            self._record(now, "ike-established", peer=ev.peer_id, remote=ev.remote[0])
            self._ike_id = ev.ike_id
            return []
        if cls is ChildSaEstablished:
            sin, sout = self._child_sas(ev.child, now)
            self._ikev2.note(now, f"child {ev.child.spi_in:08x}/{ev.child.spi_out:08x} up")
            installed = self.install_sas(sin, sout, now)
            # the GW bound the new pair to where the IKE_AUTH came from (docs/protocol.md §2.2)
            self.reg.gw_points_at = ev.local[0]
            return installed
        if cls is ChildSaRekeyed:
            sin, sout = self._child_sas(ev.new, now)
            self._ikev2.note(now, f"child re-keyed -> {ev.new.spi_in:08x}/{ev.new.spi_out:08x}",
                          rekey=True)
            return self._swap_sas(sin, sout, now, ev.send_on_new)
        if cls is ChildSaDeleted:
            return self._child_deleted(ev.child.spi_in, now)
        if cls is IkeSaRekeyed:
            if ev.ike_id == self._ike_id:
                self._ike_id = ev.new_id
            self._ikev2.note(now, "IKE SA re-keyed", rekey=True)
            self._record(now, "ike-rekeyed", care_of=self.care_of, local=ev.local[0])
            return []
        if cls is IkeSaDeleted or cls is IkeSaFailed:
            # its child SAs were reported deleted just before (RFC 7296 §1.4.1: they never
            # outlive it), so nothing of it is left in use here
            self._ikev2.note(now, f"IKE SA {ev.name} ended: {ev.reason}")
            self._record(now, "ike-ended", reason=ev.reason, ike_sa=ev.name)
            actions: list[Action] = [Log("info", f"IKE SA {ev.name} with the GW ended: "
                                                 f"{ev.reason}")]
            if ev.ike_id == self._ike_id:
                self._ike_id = None
                if cls is IkeSaFailed:
                    self._ike_backoff_s = max(self._ike_backoff_s,
                                              self.config.retransmit_initial_s)
                    if ev.remote[0] == self.gateway:
                        actions += self._next_gateway(now, f"IKE SA failed: {ev.reason}")
                if self.care_of is not None and self.state in AWAY:
                    actions += self._event(RegEvent.SAS_LOST, now)
            return actions
        if cls is PeerAddressChanged:
            return []        # our own MOBIKE update completed: the SAs moved already
        return []

    def _child_sas(self, child: Any, now: float) -> tuple[SecurityAssociation, SecurityAssociation]:
        sin, sout = child.make_sas(now=now)
        self._pairs[child.spi_in] = (child, sin, sout)
        self._inbound_sas[sin.spi] = sin
        return sin, sout

    def _swap_sas(self, inbound: SecurityAssociation, outbound: SecurityAssociation,
                  now: float, send_on_new: bool = True) -> list[Action]:
        """A re-key, at the current CoA; the GW's binding does not change, so there is nothing
        to register.  The new inbound SA receives at once (the old one until its Delete and a
        grace period after it).  We send on the new outbound SA at once if we initiated the
        re-key (the GW installed the pair before it answered); if we answered, only once the
        GW deletes the old pair (``_child_deleted``): it installs the new one on our answer."""
        old_in = self.inbound
        self.inbound = inbound
        if send_on_new or self.outbound is None:
            self.outbound = outbound
        actions: list[Action] = []
        if self.care_of is not None:
            inbound.rebind(local=None if self.reg.old_care_of_b is not None else self.care_of)
            outbound.rebind(local=self.care_of)
            actions += [RebindSa(outbound.spi, self.care_of, outbound.remote),
                        RebindSa(inbound.spi, inbound.local, inbound.remote)]
        self._record(now, "sas-rekeyed", inbound_spi=inbound.spi, outbound_spi=outbound.spi,
                     old_inbound_spi=old_in.spi if old_in is not None else None,
                     care_of=self.care_of, send_on_new=send_on_new)
        return actions

    def _child_deleted(self, spi_in: int, now: float) -> list[Action]:
        entry = self._pairs.pop(spi_in, None)
        if entry is None:
            return []
        _child, sin, sout = entry
        replaced = self.inbound is not sin             # a re-key put a newer pair in its place
        actions: list[Action] = []
        if self.inbound is sin or self.outbound is sout:
            newest = next(reversed(self._pairs.values()), None)
            if newest is None:
                self.inbound = self.outbound = None
                self.reg.gw_points_at = None
            else:
                if self.outbound is not newest[2] and self.care_of is not None:
                    # a re-key we answered: the GW has the new pair now (it deletes the old
                    # one after installing), send on it from where we are
                    newest[2].rebind(local=self.care_of)
                    actions.append(RebindSa(newest[2].spi, self.care_of, newest[2].remote))
                self.inbound, self.outbound = newest[1], newest[2]
        if replaced and self._pairs:
            # ESP the GW sent on it may still be queued behind the Delete: it keeps
            # decrypting for a grace period (handle_timer forgets it)
            self._grace.setdefault(sin.spi, now + CHILD_SA_DELETE_GRACE_S)
        else:
            self._inbound_sas.pop(sin.spi, None)
        if not self._pairs:
            # no child left (its IKE SA ended): the ones in their grace period go too
            for spi in self._grace:
                self._inbound_sas.pop(spi, None)
            self._grace.clear()
        self._record(now, "sas-deleted", inbound_spi=sin.spi, outbound_spi=sout.spi)
        return actions

    def _ike_at_home(self, now: float) -> list[Action]:
        """Home confirmed: our IKE SAs end here, deliberately.  They speak from a care-of
        address we no longer have, so they can neither be re-keyed nor checked (no exchange is
        ever sent from an address we do not have); their child SAs end with them (RFC 7296
        §1.4.1).  Leaving again starts a new IKE SA at once, whose INITIAL_CONTACT makes the GW
        drop the old ones: both ends then agree on what exists."""
        self._liveness_at = self._probe_deadline = None
        if self.ike is None:
            return []
        out: list[Any] = []
        for gw in self.gateways:
            out += self._ikev2.endpoint.abandon(gw, "at home: no care-of address to speak from; "
                                                    "a new IKE SA when the MN leaves")
        actions = self._ike_outputs(out, now)
        self._first_gateway(now)
        return actions
