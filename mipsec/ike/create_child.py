"""CREATE_CHILD_SA (RFC 7296 §1.3): new and re-keyed child SAs, and the IKE SA's own re-key.

Child SAs (§1.3.1, §1.3.3): ``rekey_child`` / ``create_child`` queue a ``Kind.CHILD`` request
(``ChildState``: the child it replaces, and once built our SPI, nonce, PFS value and selectors);
the answer makes the new child, and a re-key's initiator then deletes the old one (§2.8).  The
peer's request is answered by ``_on_create_child_request``.  When both ends re-key one child at
once (§2.8.1) the new pair made in the exchange with the lowest nonce is deleted by whoever made
it (``_collision``).

The IKE SA (§1.3.2, §2.18): ``rekey`` queues a ``Kind.REKEY_IKE`` request; either end's success
makes the successor IKE SA (``_successor``), which takes the children over, and this one becomes
REKEYED until its Delete.  A re-key that crosses one of ours is refused with TEMPORARY_FAILURE
(§2.25), and a refused re-key is tried again later (``_retry_delay``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Self

from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.ike import proposals as P
from mipsec.ike.child import split_keymat
from mipsec.ike.codec import KePayload, Message, NoncePayload, NotifyPayload, SaPayload, TsPayload
from mipsec.ike.constants import (
    HALF_OPEN_TIMEOUT_S,
    MAX_NONCE_LEN,
    MIN_NONCE_LEN,
    NONCE_LEN,
    NotifyType,
    PayloadType,
    ProtocolId,
)
from mipsec.ike.crypto import DhPrivate, IkeSuite, child_keymat, rekey_skeyseed
from mipsec.ike.events import IkeSaRekeyed
from mipsec.ike.sa_state import (
    ChildState,
    Collision,
    DeleteChildState,
    DeleteIkeState,
    Kind,
    Refused,
    RekeyIkeState,
    Request,
    State,
    within,
)
from mipsec.ike.window import MessageWindow


class CreateChild(MessageWindow):
    """CREATE_CHILD_SA, both sides; see the module docstring."""

    # --- child SAs (§1.3.1, §1.3.3) ---------------------------------------------------------------

    def rekey_child(self, spi_in: int, now: float) -> list:
        """Re-key the child whose inbound SPI is ``spi_in`` (§1.3.3); the old one is deleted
        once the new one is up."""
        if spi_in not in self.children:
            raise UsageError(f"no child SA with inbound SPI {spi_in:08x}")
        self._queue_request(Kind.CHILD, ChildState(old=spi_in), now)
        return self._flush()

    def create_child(self, now: float, local_ts=None, remote_ts=None) -> list:
        """An additional child SA (§1.3.1)."""
        self._queue_request(Kind.CHILD, ChildState(old=None, local_ts=local_ts,
                                                   remote_ts=remote_ts), now)
        return self._flush()

    def _build_rekey_child(self, req: Request, now: float) -> list[Any] | None:
        c = self.config
        st = _child_state(req)
        old = self.children.get(st.old) if st.old is not None else None
        if st.old is not None and old is None:
            return None                                   # deleted meanwhile
        spi_in = self._alloc_esp_spi()
        ni = self._random(NONCE_LEN)
        dh = DhPrivate.generate(c.pfs_group, self._random) if c.pfs_group else None
        st.spi_in, st.ni, st.dh = spi_in, ni, dh
        suites = [replace(s, dh=c.pfs_group) for s in c.esp_suites]
        payloads: list = []
        if old is not None:
            payloads.append(NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP,
                                          old.spi_in.to_bytes(4, "big")))
        payloads += [SaPayload(P.esp_proposals(suites, spi_in.to_bytes(4, "big"), bool(dh))),
                     NoncePayload(ni)]
        if dh:
            payloads.append(KePayload(dh.group, dh.public))
        lts = st.local_ts or (old.local_ts if old else c.local_ts)
        rts = st.remote_ts or (old.remote_ts if old else c.remote_ts)
        st.lts, st.rts = tuple(lts), tuple(rts)
        payloads += [TsPayload(PayloadType.TSi, tuple(lts)), TsPayload(PayloadType.TSr, tuple(rts))]
        return payloads

    def _on_rekey_child_response(self, m: Message, req: Request, now: float) -> None:
        c = self.config
        st = _child_state(req)
        errors = [n for n in m.notifies() if n.type < 16384]
        sa, nonce, ke = m.find(SaPayload), m.find(NoncePayload), m.find(KePayload)
        tsi, tsr = m.find(TsPayload, PayloadType.TSi), m.find(TsPayload, PayloadType.TSr)
        dh = st.dh
        suite = shared = None
        if not errors and sa and nonce and tsi and tsr \
                and MIN_NONCE_LEN <= len(nonce.data) <= MAX_NONCE_LEN:
            suite = P.accept_esp_answer(sa.proposals, c.esp_suites, dh.group if dh else None)
            if suite is not None and dh is not None:
                try:
                    shared = dh.shared_secret(ke.data) if ke and ke.group == dh.group else None
                except ParseError:
                    shared = None
                if shared is None:
                    suite = None
            if suite is not None and not (within(tsi.selectors, st.lts)
                                          and within(tsr.selectors, st.rts)):
                suite = None
        if suite is None:
            self.drops[DropReason.IKE_NO_PROPOSAL_CHOSEN] += 1
            if st.spi_in is not None:
                self._release_esp_spi(st.spi_in)         # no child: the SPI is free again
            if st.old in self.children and c.child_lifetime_s:
                self._child_rekey_at[st.old] = now + self._retry_delay(c.child_lifetime_s)
            return
        if st.spi_in is None:
            raise UsageError("a CREATE_CHILD_SA response for a request never built")
        keymat = child_keymat(*self._prf_sk_d(), st.ni, nonce.data,
                              2 * sum(suite.keymat_lengths()), shared)
        child = self._make_child(st.spi_in, sa.proposals[0].spi, suite,
                                 split_keymat(keymat, suite, True), tsi.selectors,
                                 tsr.selectors, now)
        self._add_child(child, now)
        old = self.children.get(st.old) if st.old is not None else None
        if old is None:
            self._child_established(child)
            return
        self._child_rekeyed(old, child)
        self._child_rekey_at.pop(old.spi_in, None)
        # §2.8: the initiator of the re-key deletes the old SA
        self._queue.appendleft(self._new_request(Kind.DELETE_CHILD, DeleteChildState([old.spi_in])))
        self._collision(old.spi_in, "ours", (st.ni, nonce.data, child.spi_in))

    def _collision(self, old_spi: int, side: str, nonces: tuple[bytes, bytes, int]) -> None:
        """§2.8.1: both ends re-keyed the same child.  Of the two new SAs, the one whose
        exchange used the lowest of the four nonces (octet by octet) is closed by whoever
        created it, so exactly one survives on both ends."""
        rec = self._collisions.setdefault(old_spi, Collision())
        if side == "ours":
            rec.ours = nonces
        else:
            rec.theirs = nonces
        ours, theirs = rec.ours, rec.theirs
        if ours is not None and theirs is not None:
            del self._collisions[old_spi]
            if min(ours[0], ours[1], theirs[0], theirs[1]) in (ours[0], ours[1]):
                self._child_rekey_at.pop(ours[2], None)
                self._queue.append(self._new_request(Kind.DELETE_CHILD,
                                                     DeleteChildState([ours[2]])))

    def _on_create_child_request(self, m: Message, local, remote, now) -> None:
        sa, nonce, ke = m.find(SaPayload), m.find(NoncePayload), m.find(KePayload)
        try:
            if sa is None or nonce is None or not MIN_NONCE_LEN <= len(nonce.data) <= MAX_NONCE_LEN:
                raise Refused(NotifyType.INVALID_SYNTAX, DropReason.MALFORMED)
            if sa.proposals and sa.proposals[0].protocol == ProtocolId.IKE:
                return self._on_rekey_ike_request(m, sa, nonce, ke, local, remote, now)
            if self.state != State.ESTABLISHED:
                raise Refused(NotifyType.TEMPORARY_FAILURE, DropReason.IKE_UNEXPECTED_EXCHANGE)
            rekey = [n for n in m.notifies(NotifyType.REKEY_SA) if n.protocol == ProtocolId.ESP]
            old = None
            if rekey:
                spi_out = int.from_bytes(rekey[0].spi, "big")
                old = next((ch for ch in self.children.values() if ch.spi_out == spi_out), None)
                if old is None:
                    raise Refused(NotifyType.CHILD_SA_NOT_FOUND, DropReason.UNKNOWN_SPI)
            dh = shared = None
            if ke is not None:
                try:                            # any group we implement (DhGroup refuses others)
                    dh = DhPrivate.generate(ke.group, self._random)
                    shared = dh.shared_secret(ke.data)
                except (ParseError, ValueError):
                    raise Refused(NotifyType.INVALID_KE_PAYLOAD,
                                   DropReason.IKE_NO_PROPOSAL_CHOSEN) from None
            nr = self._random(NONCE_LEN)
            child, answer = self._negotiate_child(m, ke.group if ke else 0, nonce.data, nr,
                                                  shared, now)
        except Refused as r:
            self.drops[r.reason] += 1
            self._respond(m, [NotifyPayload(r.notify, r.data)], local, remote, now)
            self._mid_in += 1
            return
        out = [answer[0], NoncePayload(nr)]
        if dh is not None:
            out.append(KePayload(dh.group, dh.public))
        out += answer[1:]
        self._add_child(child, now)
        # the event before the answer: a runtime that carries out the outputs in order has the
        # new inbound SA installed before the answer that lets the peer send on it leaves (§2.8)
        if old is not None:
            self._child_rekey_at.pop(old.spi_in, None)    # the peer will delete it
            # the peer installs the new SA only when our answer arrives: not sending on it yet
            self._child_rekeyed(old, child, send_on_new=False)
            p = self._pending
            if (p is not None and isinstance(p.state, ChildState) and p.state.old == old.spi_in) \
                    or old.spi_in in self._collisions:
                self._collision(old.spi_in, "theirs", (nonce.data, nr, child.spi_in))
        else:
            self._child_established(child)
        self._respond(m, out, local, remote, now)
        self._mid_in += 1

    # --- the IKE SA (§1.3.2, §2.18) --------------------------------------------------------------

    def rekey(self, now: float) -> list:
        """Re-key this IKE SA: a new one takes over the children, then this one is deleted."""
        self._queue_request(Kind.REKEY_IKE, RekeyIkeState(), now)
        return self._flush()

    def _build_rekey_ike(self, req: Request, now: float) -> list[Any]:
        spi = b""
        while not any(spi):
            spi = self._random(8)
        ni = self._random(NONCE_LEN)
        suites = sorted(self.config.ike_suites, key=lambda s: s != self.suite)
        dh = DhPrivate.generate(suites[0].dh, self._random)
        req.state = RekeyIkeState(spi=spi, ni=ni, dh=dh, suites=tuple(suites))
        return [SaPayload(P.ike_proposals(suites, spi)), NoncePayload(ni),
                KePayload(dh.group, dh.public)]

    def _on_rekey_ike_response(self, m: Message, req: Request, now: float) -> None:
        sa, nonce, ke = m.find(SaPayload), m.find(NoncePayload), m.find(KePayload)
        st = req.state
        if not isinstance(st, RekeyIkeState) or st.dh is None:
            raise UsageError("an IKE re-key response for a request never built")
        dh = st.dh
        suite = shared = None
        if sa and nonce and ke and not [n for n in m.notifies() if n.type < 16384] \
                and MIN_NONCE_LEN <= len(nonce.data) <= MAX_NONCE_LEN \
                and len(sa.proposals) == 1 and len(sa.proposals[0].spi) == 8 \
                and any(sa.proposals[0].spi):
            answer = replace(sa.proposals[0], spi=b"")
            suite = P.accept_ike_answer((answer,), st.suites)
            if suite is not None and ke.group == dh.group == suite.dh:
                try:
                    shared = dh.shared_secret(ke.data)
                except ParseError:
                    suite = None
            else:
                suite = None
        if suite is None or shared is None:
            self.drops[DropReason.IKE_NO_PROPOSAL_CHOSEN] += 1
            if self.config.ike_lifetime_s:
                self._rekey_at = now + self._retry_delay(self.config.ike_lifetime_s)
            return
        new = self._successor(initiator=True, spi_i=st.spi, spi_r=sa.proposals[0].spi,
                              ni=st.ni, nr=nonce.data, suite=suite, shared=shared, now=now)
        self._out.append(IkeSaRekeyed(self.ike_id, self.name, new.ike_id, self.peer_id or "",
                                     new.local, new.remote))
        # §2.18: the initiator of the re-key deletes the old IKE SA
        self._queue.appendleft(self._new_request(Kind.DELETE_IKE, DeleteIkeState()))

    def _on_rekey_ike_request(self, m, sa, nonce, ke, local, remote, now) -> None:
        if self.state != State.ESTABLISHED:
            raise Refused(NotifyType.TEMPORARY_FAILURE, DropReason.IKE_UNEXPECTED_EXCHANGE)
        if self._pending is not None and self._pending.kind in (Kind.REKEY_IKE, Kind.CHILD):
            # §2.25: a collision; we answer TEMPORARY_FAILURE and keep our own re-key
            raise Refused(NotifyType.TEMPORARY_FAILURE, DropReason.IKE_UNEXPECTED_EXCHANGE)
        chosen = P.choose_ike(sa.proposals, self.config.ike_suites)
        if chosen is None or ke is None:
            raise Refused(NotifyType.NO_PROPOSAL_CHOSEN, DropReason.IKE_NO_PROPOSAL_CHOSEN)
        answer, suite = chosen
        peer_spi = answer.spi
        if len(peer_spi) != 8 or not any(peer_spi):
            raise Refused(NotifyType.INVALID_SYNTAX, DropReason.MALFORMED)
        if ke.group != suite.dh:
            raise Refused(NotifyType.INVALID_KE_PAYLOAD, DropReason.IKE_INVALID_KE_PAYLOAD,
                           suite.dh.to_bytes(2, "big"))
        dh = DhPrivate.generate(suite.dh, self._random)
        try:
            shared = dh.shared_secret(ke.data)
        except ParseError:
            raise Refused(NotifyType.INVALID_KE_PAYLOAD, DropReason.MALFORMED,
                           suite.dh.to_bytes(2, "big")) from None
        spi = b""
        while not any(spi):
            spi = self._random(8)
        nr = self._random(NONCE_LEN)
        self._respond(m, [SaPayload((replace(answer, spi=spi),)), NoncePayload(nr),
                          KePayload(dh.group, dh.public)], local, remote, now)
        self._mid_in += 1
        new = self._successor(initiator=False, spi_i=peer_spi, spi_r=spi, ni=nonce.data, nr=nr,
                              suite=suite, shared=shared, now=now)
        self._out.append(IkeSaRekeyed(self.ike_id, self.name, new.ike_id, self.peer_id or "",
                                     new.local, new.remote))

    def _successor(self, *, initiator: bool, spi_i: bytes, spi_r: bytes, ni: bytes, nr: bytes,
                   suite: IkeSuite, shared: bytes, now: float) -> Self:
        new = type(self)(self.config, initiator=initiator, local=self.local, remote=self.remote,
                    spi_i=spi_i, spi_r=spi_r, random=self._random,
                    alloc_esp_spi=self._alloc_esp_spi, drops=self.drops, now=now,
                    release_esp_spi=self._release_esp_spi)
        new.ni, new.nr = ni, nr
        new._set_keys(suite, rekey_skeyseed(*self._prf_sk_d(), shared, ni, nr))
        new.peer_id, new.peer_mobike = self.peer_id, self.peer_mobike
        new.nat_local, new.nat_remote = self.nat_local, self.nat_remote
        new.children, new._child_rekey_at = self.children, self._child_rekey_at
        self.children, self._child_rekey_at = {}, {}
        new._goto(State.ESTABLISHED)
        new.established_at = now
        new._closing_at = None
        if self.config.ike_lifetime_s:
            new._rekey_at = now + self.config.ike_lifetime_s * (1.0 if initiator else 1.1)
        new.last_heard = now
        self.successor = new
        self._rekey_at = None
        self._closing_at = now + HALF_OPEN_TIMEOUT_S
        self._goto(State.REKEYED)
        return new


def _child_state(req: Request) -> ChildState:
    if not isinstance(req.state, ChildState):
        raise UsageError(f"a CREATE_CHILD_SA step for a {req.kind.value} request")
    return req.state
