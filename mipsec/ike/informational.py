"""INFORMATIONAL (RFC 7296 §1.4): liveness checks, Deletes, and MOBIKE address updates.

Ours: ``check_liveness`` (an empty request, §2.4; no answer after the retries fails the SA),
``delete_child`` / ``delete`` (§1.4.1: the IKE SA's Delete takes its children), and
``update_addresses`` (RFC 4555 §3.5: UPDATE_SA_ADDRESSES from where we moved, NAT detection
again).  ``follow_addresses`` moves the SA's addresses without an exchange (the SIU handover)
and ``abandon`` forgets the SA without telling the peer.  The peer's requests are answered by
``_on_informational_request``: Deletes (we delete the children they name, and answer with ours),
an address update (the original responder follows it), COOKIE2 echoed (RFC 4555 §4.2.4).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mipsec.errors import UsageError
from mipsec.ike.codec import DeletePayload, Message, NotifyPayload
from mipsec.ike.config import Address
from mipsec.ike.constants import NotifyType, ProtocolId
from mipsec.ike.events import IkeSaDeleted
from mipsec.ike.sa_state import (
    DeleteChildState,
    DeleteIkeState,
    DpdState,
    Kind,
    MobikeState,
    Request,
    State,
    nat_hash,
)
from mipsec.ike.window import MessageWindow


class Informational(MessageWindow):
    """INFORMATIONAL, both sides; see the module docstring."""

    # --- liveness (§2.4) and Deletes (§1.4.1) -----------------------------------------------------

    def check_liveness(self, now: float) -> list:
        """§2.4: an empty INFORMATIONAL request; no answer after the retries fails the SA."""
        self._queue_request(Kind.DPD, DpdState(), now)
        return self._flush()

    def _build_dpd(self, req: Request, now: float) -> list[Any]:
        return []

    def _on_dpd_response(self, m: Message, req: Request, now: float) -> None:
        """An authenticated answer is all a liveness check asks for (``last_heard`` moved)."""

    def delete_child(self, spi_in: int, now: float) -> list:
        if spi_in not in self.children:
            raise UsageError(f"no child SA with inbound SPI {spi_in:08x}")
        self._queue_request(Kind.DELETE_CHILD, DeleteChildState([spi_in]), now)
        return self._flush()

    def _build_delete_child(self, req: Request, now: float) -> list[Any] | None:
        st = req.state
        if not isinstance(st, DeleteChildState):
            raise UsageError(f"a child Delete built for a {req.kind.value} request")
        spis = [s for s in st.spis if s in self.children]
        if not spis:
            return None
        st.spis = spis
        return [DeletePayload(ProtocolId.ESP, tuple(s.to_bytes(4, "big") for s in spis))]

    def _on_delete_child_response(self, m: Message, req: Request, now: float) -> None:
        spis = req.state.spis if isinstance(req.state, DeleteChildState) else []
        for spi in spis:
            child = self.children.pop(spi, None)
            self._child_rekey_at.pop(spi, None)
            self._collisions.pop(spi, None)
            if child is not None:
                self._child_deleted(child)

    def delete(self, now: float) -> list:
        """Delete this IKE SA and its children (§1.4.1)."""
        if self.state in (State.ESTABLISHED, State.REKEYED):
            self._queue.clear()            # what is in flight completes first (message IDs)
            self._queue_request(Kind.DELETE_IKE, DeleteIkeState(), now)
        elif self.state != State.CLOSED:
            self._close(IkeSaDeleted, "deleted before it was established")
        return self._flush()

    def _build_delete_ike(self, req: Request, now: float) -> list[Any]:
        if self.state != State.DELETING:
            self._goto(State.DELETING)
        return [DeletePayload(ProtocolId.IKE)]

    def _on_delete_ike_response(self, m: Message, req: Request, now: float) -> None:
        self._delete_all_children()
        self._close(IkeSaDeleted, "deleted by us")

    def abandon(self, reason: str) -> list:
        """Forget this SA and its children without telling the peer (it told us they are gone:
        INITIAL_CONTACT, §2.4; or the path is gone and a new IKE SA replaces it)."""
        if self.state != State.CLOSED:
            self._delete_all_children()
            self._close(IkeSaDeleted, reason)
        return self._flush()

    # --- addresses: MOBIKE (RFC 4555) and the SIU handover --------------------------------------

    def update_addresses(self, local: Address, now: float, remote: Address | None = None) -> list:
        """MOBIKE (RFC 4555 §3.5): we moved to ``local``; tell the peer from there."""
        if not (self.peer_mobike and self.config.mobike):
            raise UsageError("the peer did not agree to MOBIKE")
        if not self.initiator:
            raise UsageError("RFC 4555 §3.5: only the original initiator updates addresses")
        self.local = local
        if remote is not None:
            self.remote = remote
        if self._pending is not None:
            # re-send what is in flight from the new address (RFC 4555 §3.4)
            self._pending.local, self._pending.remote = self.local, self.remote
        self._queue_request(Kind.MOBIKE, MobikeState(), now)
        return self._flush()

    def follow_addresses(self, local: Address | None = None, remote: Address | None = None) -> None:
        """The outer addresses moved by other means than MOBIKE (mipsec's SIU handover: the MN
        knows its new care-of address, the GW learns it from an authenticated SIU): send what
        comes next (requests in flight, re-keys, liveness checks) from / to there, and create
        children with these addresses.  No exchange and no event: the runtime already moved
        its ESP SAs."""
        if local is not None:
            self.local = local
        if remote is not None:
            self.remote = remote
        if self._pending is not None:
            self._pending.local, self._pending.remote = self.local, self.remote
        for spi, ch in list(self.children.items()):
            self.children[spi] = replace(ch, local_address=self.local[0],
                                         remote_address=self.remote[0])

    def _build_mobike(self, req: Request, now: float) -> list[Any]:
        req.state = MobikeState(self.local, self.remote)
        return [NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES),
                NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP,
                              self._random(20) if self.config.force_encap
                              else nat_hash(self.spi_i, self.spi_r, self.local)),
                NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                              nat_hash(self.spi_i, self.spi_r, self.remote))]

    def _on_mobike_response(self, m: Message, req: Request, now: float) -> None:
        st = req.state
        if isinstance(st, MobikeState) and st.local is not None and st.remote is not None:
            self._nat_detect(m, st.local, st.remote, request=False)
        self._rebind_children(now)

    # --- the peer's INFORMATIONAL ---------------------------------------------------------------

    def _on_informational_request(self, m: Message, local, remote, now) -> None:
        out: list = []
        deletes = [d for d in m.payloads if isinstance(d, DeletePayload)]
        if any(d.protocol == ProtocolId.IKE for d in deletes):
            self._respond(m, [], local, remote, now)          # §1.4.1: empty answer
            self._mid_in += 1
            self._delete_all_children()
            self._close(IkeSaDeleted, "deleted by the peer")
            return
        ours = []
        for d in deletes:
            if d.protocol != ProtocolId.ESP:
                continue
            for spi in d.spis:
                n = int.from_bytes(spi, "big")
                child = next((c for c in self.children.values() if c.spi_out == n), None)
                if child is not None:
                    ours.append(child)
        if ours:
            out.append(DeletePayload(ProtocolId.ESP,
                                     tuple(c.spi_in.to_bytes(4, "big") for c in ours)))
        moved = False
        if m.notifies(NotifyType.UPDATE_SA_ADDRESSES) and self.peer_mobike and self.config.mobike:
            if not self.initiator:                 # RFC 4555 §3.5: responder follows
                self.local, self.remote = local, remote
                self._nat_detect(m, local, remote, request=False)
                moved = True
                out += [NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP,
                                      self._random(20) if self.config.force_encap
                                      else nat_hash(self.spi_i, self.spi_r, local)),
                        NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                                      nat_hash(self.spi_i, self.spi_r, remote))]
        for c2 in m.notifies(NotifyType.COOKIE2):                 # RFC 4555 §4.2.4: echo
            out.append(NotifyPayload(NotifyType.COOKIE2, c2.data))
        self._respond(m, out, local, remote, now)
        self._mid_in += 1
        for child in ours:
            del self.children[child.spi_in]
            self._child_rekey_at.pop(child.spi_in, None)
            self._collisions.pop(child.spi_in, None)
            self._child_deleted(child)
        if moved:
            self._rebind_children(now)
