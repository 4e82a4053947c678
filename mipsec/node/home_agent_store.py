"""The home agent's use of the binding store (``mipsec.store``), sans-I/O.

``HomeAgent`` takes these methods from ``HomeAgentStore``: ``_persist`` is the store write a
binding change needs before its reply may leave (``PersistBinding``), ``_reserve`` the write that
reserves the next block of SIU numbers for a GW (``ReserveSiuSequence``), ``restore`` starts an
HA from what the store kept, and ``handle_event`` takes the runtime's report of a write that
failed (``BindingNotStored``, ``SiuSequenceNotReserved``).  The rules are in the "Persistence"
and "SIU sequence numbers" paragraphs of ``mipsec.node.home_agent``'s docstring.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mipsec.errors import UsageError
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.mip.siu import SiuSigner, SiuVerifier
from mipsec.mobility.ha_binding import Binding, BindingEvent
from mipsec.mobility.siu_exchange import SiuExchange
from mipsec.node.actions import (
    Action,
    BindingNotStored,
    Log,
    PersistBinding,
    ReserveSiuSequence,
    SiuSequenceNotReserved,
)
from mipsec.node.config import HomeAgentMobile
from mipsec.store.record import BindingRecord

META_MN_HA_ID = "mn-ha-id/"            # + home address: the last accepted identification
META_SIU_SEQUENCE = "siu-seq/"         # + GW address: SIU numbers below it may have been used
SIU_SEQUENCE_BLOCK = 1 << 12           # tunable: SIU numbers reserved per store write


class HomeAgentStore:
    """The binding-store half of ``HomeAgent`` (see the module docstring); the attributes below
    are the HA's, set by ``HomeAgent.__init__``."""

    name: str
    wallclock: Callable[[], float]
    bindings: dict[str, Binding]
    siu: SiuExchange
    counters: Counter[str]
    _mobiles: dict[str, HomeAgentMobile]
    _msa_by_spi: dict[int, tuple[MobilitySecurityAssociation, str]]
    _ack_verifier: SiuVerifier
    _signers: dict[str, SiuSigner]
    _seq_end: dict[str, int]
    _seq_stored: dict[str, bytes | None]
    _stored: dict[str, str | None]

    if TYPE_CHECKING:      # HomeAgent's own methods, used here
        def _record(self, now: float, kind: str, **detail: Any) -> None: ...

        def _event(self, home: str, event: BindingEvent, now: float,
                   **ctx: Any) -> list[Action]: ...

    def _persist(self, home: str, binding: Binding | None) -> PersistBinding:
        """The store write for ``home``'s binding now (``None``: deleted), with the MN-HA
        identification replay state; a compare-and-swap on what we last stored, when known."""
        meta: tuple[tuple[str, bytes], ...] = ()
        msa = self._msa_by_spi[self._mobiles[home].msa.spi][0]
        if msa.last_accepted_id is not None:
            meta = ((META_MN_HA_ID + home, msa.last_accepted_id.to_bytes(8, "big")),)
        conditional = home in self._stored
        expected = self._stored.get(home)
        self._stored[home] = binding.care_of_address if binding is not None else None
        return PersistBinding(home, binding.record() if binding is not None else None,
                              expected_care_of=expected, conditional=conditional, meta=meta)

    def restore(self, records: list[BindingRecord], meta: dict[str, bytes],
                now: float) -> list[Action]:
        """Start from what the binding store kept (a restart): the unexpired bindings of our
        mobile nodes and their identification replay state.  Returns a ``BindingChanged`` per
        binding, so the runtime re-installs its routes and proxy-ARP entries.  Call once,
        before any packet."""
        if self.bindings or self.siu.last:
            raise UsageError(f"HA {self.name}: restore() after the HA has started serving")
        wall = self.wallclock()
        # SIU numbering continues above every mark reserved before (by us or another HA)
        marks = {gw: meta.get(META_SIU_SEQUENCE + gw) for gw in self._signers}
        start = max([s.next_sequence for s in self._signers.values()]
                    + [int.from_bytes(v, "big") for v in marks.values() if v and len(v) == 8])
        for gw, signer in self._signers.items():
            signer.next_sequence = self._seq_end[gw] = start
            self._seq_stored[gw] = marks[gw]
        self._ack_verifier.floor = start
        for home, mobile in self._mobiles.items():
            value = meta.get(META_MN_HA_ID + home)
            if value is not None and len(value) == 8:
                msa = self._msa_by_spi[mobile.msa.spi][0]
                msa.last_accepted_id = int.from_bytes(value, "big")
        actions: list[Action] = []
        for rec in records:
            home = rec.home_address
            if home not in self._mobiles or not rec.care_of_address:
                self.counters["restore-skipped-unknown"] += 1
                continue
            if rec.expired(wall):
                self.counters["restore-skipped-expired"] += 1
                self._stored[home] = rec.care_of_address   # still on disk until deleted
                continue
            actions += self._event(home, BindingEvent.RESTORE, now, record=rec)
            self._stored[home] = rec.care_of_address
            self._record(now, "binding-restored", home_address=home, care_of=rec.care_of_address,
                         remaining_s=round(self.bindings[home].expires - now, 3))
        for home in self._mobiles:
            self._stored.setdefault(home, None)       # the store was read: nothing there
        return actions

    def _reserve(self, gateway: str, first: int) -> ReserveSiuSequence:
        """The store write that reserves the next block of SIU numbers for ``gateway``."""
        end = first + SIU_SEQUENCE_BLOCK
        action = ReserveSiuSequence(gateway, META_SIU_SEQUENCE + gateway,
                                    self._seq_stored[gateway], end)
        self._seq_end[gateway] = end
        self._seq_stored[gateway] = end.to_bytes(8, "big")
        self.counters["siu-sequence-reserved"] += 1
        return action

    def handle_event(self, event: object, now: float) -> list[Action]:
        """What the runtime reports back about a store write that did not happen."""
        if isinstance(event, SiuSequenceNotReserved):
            # the SIU that needed the block was not sent (its resend timer sends it again);
            # continue above what the store holds (another HA's reservation), reserving anew
            stored = event.stored if event.stored and len(event.stored) == 8 else None
            signer = self._signers[event.gateway]
            if stored is not None:
                signer.next_sequence = max(signer.next_sequence, int.from_bytes(stored, "big"))
            self._seq_stored[event.gateway] = stored
            self._seq_end[event.gateway] = signer.next_sequence
            self.counters["siu-sequence-not-reserved"] += 1
            self._record(now, "siu-sequence-not-reserved", gateway=event.gateway,
                         reason=event.reason)
            return [Log("error", f"SIU numbers for {event.gateway} not reserved "
                                 f"({event.reason}): the SIU waits for its next resend")]
        if isinstance(event, BindingNotStored):
            # the write failed or found another care-of address: what the store holds is
            # unknown now, so the next write for this home address is unconditional
            self._stored.pop(event.home_address, None)
            self.counters["binding-not-stored"] += 1
            self._record(now, "binding-not-stored", home_address=event.home_address,
                         reason=event.reason)
            return [Log("error", f"binding of {event.home_address} not stored ({event.reason}): "
                                 f"its reply was not sent; the mobile node will retransmit")]
        raise UsageError(f"HA {self.name}: unknown event {event!r}")
