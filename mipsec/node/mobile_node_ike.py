"""The mobile node's IKEv2 integration (docs/ikev2.md "Integration"), sans-I/O.

``MobileNode`` takes these methods from ``MobileNodeIke``: it negotiates its IKE SA and child
SAs with the GW from its care-of address (``_ike_start``), re-establishes them with
INITIAL_CONTACT when the registration machine says so (``_ike_reestablish``; with a list of GWs,
with the next one: ``_next_gateway``), installs each child SA pair (``install_sas``), takes a
re-key's new pair at the current CoA (``_rekeyed``), tells the GW of a move in MOBIKE mode
(``_ike_moved``) and
ends its IKE SAs when the HA confirms it is home (``_ike_at_home``).  The pairs themselves (which
is installed, which sends, which inbound SA keeps its grace period after a re-key) are the
shared ``mipsec.ike.book.ChildSaBook``'s; ``_pairs_changed`` mirrors what it reports into the
MN's current pair.  A child the GW negotiated that cannot be installed is counted
(IKE_CHILD_UNUSABLE) and deleted at the GW, never raised.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.ike.book import (
    Change,
    ChildSaBook,
    FellBack,
    PairInstalled,
    PairRefused,
    PairRemoved,
    PairRetired,
    SendingSwitched,
)
from mipsec.ike.events import (
    ChildSaEstablished,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaId,
    IkeSaInfo,
    IkeSaRekeyed,
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
    book: ChildSaBook
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
        try:
            outputs = self._ikev2.receive(packet, now)
        except ParseError as exc:
            return self._drop(exc.reason)
        return self._ike_outputs(outputs, now)

    def _ike_outputs(self, outputs: list, now: float) -> list[Action]:
        """Datagrams -> SendToNet (from our interface), events -> SA changes, in order."""
        return RoleIke.actions(outputs, lambda event: self._ike_event(event, now), self.interface)

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
        # the child SA pairs first: the shared bookkeeping (mipsec.ike.book) says what changed
        actions = self._pairs_changed(self.book.apply(ev, now), now)
        if cls is IkeSaEstablished:
            self._ikev2.note(now, f"IKE SA {ev.name} up with {ev.peer_id}")
            self._record(now, "ike-established", peer=ev.peer_id, remote=ev.remote[0])
            self._ike_id = ev.ike_id
        elif cls is ChildSaEstablished and self.inbound is not None \
                and self.inbound.spi == ev.child.spi_in:
            # the GW bound the new pair to where the IKE_AUTH came from (docs/protocol.md §2.2)
            self.reg.gw_points_at = ev.local[0]
        elif cls is IkeSaRekeyed:
            if ev.ike_id == self._ike_id:
                self._ike_id = ev.new_id
            self._ikev2.note(now, "IKE SA re-keyed", rekey=True)
            self._record(now, "ike-rekeyed", care_of=self.care_of, local=ev.local[0])
        elif cls is IkeSaDeleted or cls is IkeSaFailed:
            # its child SAs were reported deleted just before (RFC 7296 §1.4.1: they never
            # outlive it), so nothing of it is left in use here
            self._ikev2.note(now, f"IKE SA {ev.name} ended: {ev.reason}")
            self._record(now, "ike-ended", reason=ev.reason, ike_sa=ev.name)
            actions.append(Log("info", f"IKE SA {ev.name} with the GW ended: {ev.reason}"))
            if ev.ike_id == self._ike_id:
                self._ike_id = None
                if cls is IkeSaFailed:
                    self._ike_backoff_s = max(self._ike_backoff_s,
                                              self.config.retransmit_initial_s)
                    if ev.remote[0] == self.gateway:
                        actions += self._next_gateway(now, f"IKE SA failed: {ev.reason}")
                if self.care_of is not None and self.state in AWAY:
                    actions += self._event(RegEvent.SAS_LOST, now)
        # PeerAddressChanged: our own MOBIKE update completed: the SAs moved already
        return actions

    def _pairs_changed(self, changes: list[Change], now: float) -> list[Action]:
        """Mirror what the book changed into the MN's current pair (``inbound``, ``outbound``:
        the data path's) and its registration."""
        actions: list[Action] = []
        for ch in changes:
            cls = ch.__class__
            if cls is PairInstalled:
                assert isinstance(ch, PairInstalled)
                sin, sout = ch.pair.inbound, ch.pair.outbound
                if ch.rekey:
                    self._ikev2.note(now, f"child re-keyed -> {sin.spi:08x}/{sout.spi:08x}",
                                     rekey=True)
                    actions += self._rekeyed(sin, sout, now, ch.send_on_new)
                else:
                    self._ikev2.note(now, f"child {sin.spi:08x}/{sout.spi:08x} up")
                    actions += self.install_sas(sin, sout, now)
            elif cls is SendingSwitched:
                assert isinstance(ch, SendingSwitched)
                # a re-key: the book re-pointed the new SA where the old one sent from
                self.outbound = ch.new
                if self.care_of is not None:
                    actions.append(RebindSa(ch.new.spi, ch.new.local, ch.new.remote))
            elif cls is FellBack:
                assert isinstance(ch, FellBack)
                self.inbound = ch.survivor.inbound
            elif cls is PairRetired or cls is PairRemoved:
                assert isinstance(ch, (PairRetired, PairRemoved))
                if isinstance(ch, PairRemoved) and ch.last and (
                        ch.pair.inbound is self.inbound or ch.pair.outbound is self.outbound):
                    # no child left of the IKE SA in use (it ended)
                    self.inbound = self.outbound = None
                    self.reg.gw_points_at = None
                self._record(now, "sas-deleted", inbound_spi=ch.pair.inbound.spi,
                             outbound_spi=ch.pair.outbound.spi)
            elif cls is PairRefused:
                assert isinstance(ch, PairRefused)
                # a child the GW negotiated that we cannot install: counted, deleted at the GW
                self.drops[DropReason.IKE_CHILD_UNUSABLE] += 1
                actions.append(Log("warning", f"IKE child SA not installed: {ch.reason}"))
                actions += RoleIke.run(self._ikev2.endpoint.delete_child(
                    ch.ike_id, ch.child.spi_in, now), self.interface)[0]
        return actions

    def _rekeyed(self, inbound: SecurityAssociation, outbound: SecurityAssociation,
                 now: float, send_on_new: bool) -> list[Action]:
        """A re-key, at the current CoA; the GW's binding does not change, so there is nothing
        to register.  The new inbound SA receives at once (the old one until its Delete and a
        grace period after it); the book switched the uplink to the new outbound SA at once if
        we initiated the re-key, else it does when the GW deletes the old pair."""
        old_in = self.inbound
        self.inbound = inbound
        actions: list[Action] = []
        if self.care_of is not None:
            inbound.rebind(local=None if self.reg.old_care_of_b is not None else self.care_of)
            actions.append(RebindSa(inbound.spi, inbound.local, inbound.remote))
        self._record(now, "sas-rekeyed", inbound_spi=inbound.spi, outbound_spi=outbound.spi,
                     old_inbound_spi=old_in.spi if old_in is not None else None,
                     care_of=self.care_of, send_on_new=send_on_new)
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
