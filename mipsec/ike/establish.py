"""IKE_SA_INIT and IKE_AUTH (RFC 7296 §1.2, §2.15): setting an IKE SA up, on both sides.

Initiator: ``start`` sends IKE_SA_INIT (again with a COOKIE, §2.6, or the Diffie-Hellman group
an INVALID_KE_PAYLOAD asked for, §1.2); its answer derives the keys (§2.14), floats to port
4500 when a NAT was detected or MOBIKE is on (§2.23, RFC 4555 §3.4) and sends IKE_AUTH with the
first child's proposal; its answer authenticates the responder and makes the first child.
Responder: ``respond_init`` (called by the endpoint) answers IKE_SA_INIT and keeps a half-open
SA; ``_on_auth_request`` authenticates the initiator and negotiates the first child
(``_negotiate_child``).  Both sides end in ``_established``.  These two exchanges are sent
outside the queue of ``mipsec.ike.window`` (their message IDs are 0 and 1 by definition).
"""

from __future__ import annotations

import hmac
from collections import Counter
from typing import Any, Self

from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.ike import codec
from mipsec.ike import proposals as P
from mipsec.ike.child import ChildSa, split_keymat
from mipsec.ike.codec import (
    AuthPayload,
    Header,
    IdPayload,
    KePayload,
    Message,
    NoncePayload,
    NotifyPayload,
    SaPayload,
    TsPayload,
)
from mipsec.ike.config import (
    Address,
    IkeConfig,
    identity,
    identity_text,
)
from mipsec.ike.constants import (
    MAX_NONCE_LEN,
    MIN_NONCE_LEN,
    NAT_T_PORT,
    NONCE_LEN,
    AuthMethod,
    ExchangeType,
    Flag,
    NotifyType,
    PayloadType,
)
from mipsec.ike.crypto import DhPrivate, child_keymat, psk_auth, skeyseed
from mipsec.ike.events import IkeSaEstablished, IkeSaFailed, SendDatagram
from mipsec.ike.sa_state import (
    AuthState,
    CachedResponse,
    InitState,
    Kind,
    Refused,
    Request,
    State,
    marker,
    nat_hash,
    notify_name,
    within,
)
from mipsec.ike.window import MessageWindow, Random


class Establish(MessageWindow):
    """IKE_SA_INIT and IKE_AUTH, initiator and responder; see the module docstring."""

    # --- IKE_SA_INIT (§1.2) as initiator ----------------------------------------------------------

    def start(self, now: float, cookie: bytes | None = None, group: int | None = None) -> list:
        """Send (or re-send, with a cookie or another KE group) the IKE_SA_INIT request."""
        if self.state not in (State.IDLE, State.INIT_SENT) or not self.initiator:
            raise UsageError(f"IKE SA {self.name}: start() in state {self.state.value}")
        c = self.config
        group = group or c.ike_suites[0].dh
        hs = self.handshake
        if hs.dh is None or hs.dh.group != group:
            hs.dh = DhPrivate.generate(group, self._random)
        if not self.ni:
            self.ni = self._random(NONCE_LEN)
        # Offer the suites with the KE group first (§1.2: KE must match the first choice...)
        suites = sorted(c.ike_suites, key=lambda s: s.dh != group)
        payloads: list = []
        if cookie is not None:
            payloads.append(NotifyPayload(NotifyType.COOKIE, cookie))     # §2.6: first
        src_hash = nat_hash(self.spi_i, bytes(8), self.local)
        if c.force_encap:
            src_hash = self._random(20)       # RFC 3948 trick: make the peer see a NAT on us
        payloads += [SaPayload(P.ike_proposals(suites)), KePayload(group, hs.dh.public),
                     NoncePayload(self.ni),
                     NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, src_hash),
                     NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                                   nat_hash(self.spi_i, bytes(8), self.remote))]
        hs.offered = tuple(suites)
        h = self._header(ExchangeType.IKE_SA_INIT, 0, False)
        raw = codec.build_message(h, payloads)
        hs.init_request = raw
        if self.state == State.IDLE:
            self._goto(State.INIT_SENT)
        self._mid_out = 0
        self._send_pending(Request(Kind.INIT, ExchangeType.IKE_SA_INIT, InitState(), 0, raw), now)
        return self._flush()

    def _on_init_response(self, m: Message, req: Request, local: Address, remote: Address,
                          now: float) -> list[Any]:
        st = req.state
        if not isinstance(st, InitState):
            raise UsageError(f"IKE_SA_INIT response for a {req.kind.value} request")
        errors = [n for n in m.notifies() if n.type < 16384]
        cookie = m.notifies(NotifyType.COOKIE)
        if cookie and not m.find(SaPayload):
            if st.cookies >= 2 or not 1 <= len(cookie[0].data) <= 64:
                return self._drop(DropReason.IKE_INVALID_COOKIE)
            self._pending = None
            out = self.start(now, cookie=cookie[0].data, group=self._own_dh().group)
            self._in_flight().state = InitState(cookies=st.cookies + 1)
            return out
        if errors:
            e = errors[0]
            if e.type == NotifyType.INVALID_KE_PAYLOAD and len(e.data) == 2:
                group = int.from_bytes(e.data, "big")
                if group != self._own_dh().group and any(s.dh == group for s in self.config.ike_suites):
                    self._pending = None
                    return self.start(now, group=group)                # §1.2: retry
            # §2.21.1: an unprotected error may be forged; note it and keep waiting for a valid
            # answer to our retransmissions, which give up with this reason
            st.refused = notify_name(e.type)
            return self._drop(DropReason.IKE_NO_PROPOSAL_CHOSEN
                              if e.type == NotifyType.NO_PROPOSAL_CHOSEN else DropReason.MALFORMED)
        sa, ke, nonce = m.find(SaPayload), m.find(KePayload), m.find(NoncePayload)
        if sa is None or ke is None or nonce is None or not any(m.header.spi_r):
            return self._drop(DropReason.MALFORMED)
        suite = P.accept_ike_answer(sa.proposals, self.handshake.offered)
        if suite is None:
            return self._drop(DropReason.IKE_NO_PROPOSAL_CHOSEN)
        own_dh = self._own_dh()
        if ke.group != suite.dh or ke.group != own_dh.group \
                or not MIN_NONCE_LEN <= len(nonce.data) <= MAX_NONCE_LEN:
            return self._drop(DropReason.MALFORMED)
        try:
            shared = own_dh.shared_secret(ke.data)
        except ParseError as e:
            return self._drop(e.reason)
        # accepted: from here on the SA changes
        self._pending = None
        self.spi_r = m.header.spi_r
        self.nr = nonce.data
        self.handshake.init_response = m.raw
        self._nat_detect(m, local, remote, request=False)
        self._set_keys(suite, skeyseed(suite.prf, self.ni, self.nr, shared))
        self._mid_out = 1
        if self.encap or self.config.mobike:          # §2.23; RFC 4555 §3.4 (MOBIKE)
            self._float_to_4500()
        self._goto(State.AUTH_SENT)
        self._send_auth(now)
        return self._flush()

    def _float_to_4500(self) -> None:
        """§2.23: switch to port 4500 (non-ESP marker from now on)."""
        if self.local[1] == 500:
            self.local = (self.local[0], NAT_T_PORT)
        if self.remote[1] == 500:
            self.remote = (self.remote[0], NAT_T_PORT)

    def _id_payload(self, ptype: PayloadType) -> IdPayload:
        t, data = identity(self.config.local_id)
        return IdPayload(ptype, t, data)

    def _auth_data(self, psk: bytes, ours: bool, id_body: bytes) -> bytes:
        """§2.15: we sign our own INIT message with the peer's nonce and our ID."""
        suite, k = self._keyed()
        if ours == self.initiator:          # the initiator's AUTH
            return psk_auth(suite.prf, psk, self.handshake.init_request, self.nr, k.sk_pi,
                            id_body)
        return psk_auth(suite.prf, psk, self.handshake.init_response, self.ni, k.sk_pr, id_body)

    def _send_auth(self, now: float) -> None:
        c = self.config
        idi = self._id_payload(PayloadType.IDi)
        psk = c.psk_for(c.remote_id or "*")
        if psk is None:
            raise UsageError(f"no pre-shared key for peer {c.remote_id!r}")
        spi_in = self._alloc_esp_spi()
        payloads: list = [idi]
        if c.initial_contact:
            payloads.append(NotifyPayload(NotifyType.INITIAL_CONTACT))
        if c.remote_id:
            t, data = identity(c.remote_id)
            payloads.append(IdPayload(PayloadType.IDr, t, data))
        payloads.append(AuthPayload(AuthMethod.SHARED_KEY_MIC, self._auth_data(psk, True, idi.body())))
        payloads += [SaPayload(P.esp_proposals(c.esp_suites, spi_in.to_bytes(4, "big"), False)),
                     TsPayload(PayloadType.TSi, c.local_ts), TsPayload(PayloadType.TSr, c.remote_ts)]
        if c.mobike:
            payloads.append(NotifyPayload(NotifyType.MOBIKE_SUPPORTED))
        raw = self._sk_out.protect(self._header(ExchangeType.IKE_AUTH, 1, False), payloads)
        self._send_pending(Request(Kind.AUTH, ExchangeType.IKE_AUTH, AuthState(spi_in), 1, raw), now)

    def _on_auth_response(self, m: Message, req: Request, local: Address, remote: Address,
                          now: float) -> list[Any]:
        c = self.config
        st = req.state
        if not isinstance(st, AuthState):
            raise UsageError(f"IKE_AUTH response for a {req.kind.value} request")
        errors = [n for n in m.notifies() if n.type < 16384]
        idr, auth = m.find(IdPayload, PayloadType.IDr), m.find(AuthPayload)
        if idr is None or auth is None:
            reason = (DropReason.IKE_AUTH_FAILED if any(
                e.type == NotifyType.AUTHENTICATION_FAILED for e in errors) else DropReason.MALFORMED)
            self.drops[reason] += 1
            self._close(IkeSaFailed, "IKE_AUTH refused: " + ", ".join(
                notify_name(e.type) for e in errors) if errors else "IKE_AUTH without IDr/AUTH")
            return self._flush()
        peer_id = identity_text(idr.id_type, idr.data)
        psk = c.psk_for(peer_id) if c.remote_id is None else (
            c.psk_for(peer_id) if peer_id == c.remote_id else None)
        if psk is None or auth.method != AuthMethod.SHARED_KEY_MIC or not hmac.compare_digest(
                auth.data, self._auth_data(psk, False, idr.body())):
            self.drops[DropReason.IKE_AUTH_FAILED] += 1
            self._close(IkeSaFailed, f"responder {peer_id!r} failed authentication")
            return self._flush()
        child = None
        sa, tsi, tsr = m.find(SaPayload), m.find(TsPayload, PayloadType.TSi), \
            m.find(TsPayload, PayloadType.TSr)
        if sa is not None and tsi is not None and tsr is not None:
            suite = P.accept_esp_answer(sa.proposals, c.esp_suites, None)
            if suite is not None and within(tsi.selectors, c.local_ts) \
                    and within(tsr.selectors, c.remote_ts):
                keymat = child_keymat(*self._prf_sk_d(), self.ni, self.nr,
                                      2 * sum(suite.keymat_lengths()))
                child = self._make_child(st.spi_in, sa.proposals[0].spi, suite,
                                         split_keymat(keymat, suite, True),
                                         tsi.selectors, tsr.selectors, now)
            else:
                self.drops[DropReason.IKE_NO_PROPOSAL_CHOSEN] += 1
        self.peer_id = peer_id
        self.peer_mobike = bool(m.notifies(NotifyType.MOBIKE_SUPPORTED))
        self._pending = None
        self._mid_out = 2
        return self._established(now, child)

    def _established(self, now: float, child: ChildSa | None) -> list:
        """IKE_AUTH done on either side: ESTABLISHED, the first child SA if it was agreed, then
        the requests the runtime queued meanwhile."""
        self._goto(State.ESTABLISHED)
        self.established_at = now
        self._closing_at = None
        if self.config.ike_lifetime_s:
            # the original responder waits 10 % longer so that the two rarely collide (§2.8.1)
            self._rekey_at = now + self.config.ike_lifetime_s * (1.0 if self.initiator else 1.1)
        self._out.append(IkeSaEstablished(self.ike_id, self.name, self.peer_id or "", self.local,
                                          self.remote, self.initial_contact))
        if child is not None:
            self._add_child(child, now)
            self._child_established(child)
        self._pump(now)
        return self._flush()

    # --- responder: IKE_SA_INIT arrives (called by the endpoint), then IKE_AUTH ----------------

    @classmethod
    def respond_init(cls, config: IkeConfig, m: Message, local: Address, remote: Address,
                     now: float, *, spi_r: bytes, random: Random, drops: Counter,
                     alloc_esp_spi=None, release_esp_spi=None) -> tuple[Self | None, list]:
        """Answer an IKE_SA_INIT request: a new half-open SA, or (None, [error response])."""
        sa_p, ke, nonce = m.find(SaPayload), m.find(KePayload), m.find(NoncePayload)
        h = m.header

        def refuse(ntype: int, data: bytes, reason: DropReason):
            drops[reason] += 1
            resp = codec.build_message(Header(h.spi_i, bytes(8), h.exchange, Flag.RESPONSE, 0),
                                       [NotifyPayload(ntype, data)])
            return None, [SendDatagram(marker(local) + resp, local, remote)]

        if sa_p is None or ke is None or nonce is None \
                or not MIN_NONCE_LEN <= len(nonce.data) <= MAX_NONCE_LEN or h.message_id != 0:
            drops[DropReason.MALFORMED] += 1
            return None, []
        chosen = P.choose_ike(sa_p.proposals, config.ike_suites)
        if chosen is None:
            return refuse(NotifyType.NO_PROPOSAL_CHOSEN, b"", DropReason.IKE_NO_PROPOSAL_CHOSEN)
        answer, suite = chosen
        if ke.group != suite.dh:
            # §1.2: tell the initiator which group we want; no state is kept
            return refuse(NotifyType.INVALID_KE_PAYLOAD, suite.dh.to_bytes(2, "big"),
                          DropReason.IKE_INVALID_KE_PAYLOAD)
        dh = DhPrivate.generate(suite.dh, random)
        try:
            shared = dh.shared_secret(ke.data)
        except ParseError as e:
            drops[e.reason] += 1
            return None, []
        self = cls(config, initiator=False, local=local, remote=remote, spi_i=h.spi_i,
                   spi_r=spi_r, random=random, drops=drops, alloc_esp_spi=alloc_esp_spi, now=now,
                   release_esp_spi=release_esp_spi)
        self.handshake.dh = dh
        self.ni, self.nr = nonce.data, random(NONCE_LEN)
        self.handshake.init_request = m.raw
        self._nat_detect(m, local, remote, request=True)
        src_hash = nat_hash(self.spi_i, self.spi_r, local)
        if config.force_encap:
            src_hash = random(20)
        payloads: list[codec.Payload] = [
            SaPayload((answer,)), KePayload(suite.dh, dh.public), NoncePayload(self.nr),
            NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, src_hash),
            NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                          nat_hash(self.spi_i, self.spi_r, remote))]
        raw = codec.build_message(self._header(ExchangeType.IKE_SA_INIT, 0, True), payloads)
        self.handshake.init_response = raw
        self._set_keys(suite, skeyseed(suite.prf, self.ni, self.nr, shared))
        self._goto(State.INIT_ANSWERED)
        self._mid_in = 1
        self._cached = CachedResponse(0, m.raw, raw, remote)
        self._emit_datagram(raw, local, remote, now)
        return self, self._flush()

    def retransmitted_init(self, m: Message, local: Address, remote: Address, now: float) -> list:
        """An IKE_SA_INIT request for this half-open SA again: the same octets get the same
        answer (§2.1), anything else is dropped."""
        cached = self._cached
        if self.state == State.INIT_ANSWERED and cached is not None and cached.mid == 0 \
                and m.raw == cached.request:
            self.drops[DropReason.IKE_RETRANSMISSION] += 1
            self._emit_datagram(cached.response, local, remote, now)
            return self._flush()
        return self._drop(DropReason.IKE_BAD_MESSAGE_ID)

    def _on_auth_request(self, m: Message, local, remote, now) -> list:
        c = self.config
        idi, auth = m.find(IdPayload, PayloadType.IDi), m.find(AuthPayload)
        peer_id = identity_text(idi.id_type, idi.data) if idi else None
        psk = c.psk_for(peer_id) if peer_id is not None else None
        if idi is None or auth is None or psk is None or auth.method != AuthMethod.SHARED_KEY_MIC \
                or not hmac.compare_digest(auth.data, self._auth_data(psk, False, idi.body())):
            # §2.21.2: answer AUTHENTICATION_FAILED and forget the SA
            self._respond(m, [NotifyPayload(NotifyType.AUTHENTICATION_FAILED)], local, remote, now)
            self.drops[DropReason.IKE_AUTH_FAILED] += 1
            self._close(IkeSaFailed, f"initiator {peer_id!r} failed authentication")
            return self._flush()
        # §2.23 / RFC 4555 §3.4: from IKE_AUTH on, use the ports the initiator floated to
        self.local, self.remote = local, remote
        idr = self._id_payload(PayloadType.IDr)
        out: list = [idr, AuthPayload(AuthMethod.SHARED_KEY_MIC, self._auth_data(psk, True, idr.body()))]
        self.peer_mobike = bool(m.notifies(NotifyType.MOBIKE_SUPPORTED))
        self.initial_contact = bool(m.notifies(NotifyType.INITIAL_CONTACT))
        if self.peer_mobike and c.mobike:
            out.append(NotifyPayload(NotifyType.MOBIKE_SUPPORTED))
        child = None
        self.peer_id = peer_id      # authenticated: its child SA's SPI may depend on it
        try:
            child, answer = self._negotiate_child(m, None, self.ni, self.nr, None, now)
            out += answer
        except Refused as r:
            self.drops[r.reason] += 1
            out.append(NotifyPayload(r.notify, r.data))
        self._respond(m, out, local, remote, now)
        self._mid_in += 1
        return self._established(now, child)
