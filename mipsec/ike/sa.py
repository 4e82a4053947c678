"""One IKE SA (RFC 7296): its state machine, message-ID windows, retransmissions and exchanges.

Theory of operation
-------------------
An ``IkeSa`` is driven by three calls, each returning the outputs of ``mipsec.ike.config``
(``SendDatagram`` and events) in order:

* ``receive(message, local, remote, now)`` with a message the endpoint already parsed and matched
  to this SA by SPI;
* ``handle_timer(now)`` when ``get_timer()`` has passed (retransmission, liveness check, NAT
  keepalive, re-key deadlines, half-open timeout);
* local requests: ``start(now)`` (initiator), ``rekey_child``, ``rekey``, ``delete``,
  ``delete_child``, ``check_liveness``, ``update_addresses`` (MOBIKE).  Requests are queued and
  sent one at a time: our window size is 1 (§2.3), so at most one request of ours is in flight.

Message IDs (§2.2).  ``_mid_out`` is the ID of our next request; a response is accepted only for
the request in flight, with the same exchange type.  ``_mid_in`` is the ID we expect of the
peer's next request; the request just before it is answered from the cached response when it is
byte-for-byte the request we answered (a retransmission, §2.1), anything else outside the window
is dropped (IKE_BAD_MESSAGE_ID).

Bad remote input never changes the SA.  Every check that can refuse a message (SPI, flags,
window, exchange allowed in this state, ICV, payload syntax, proposal, KE, AUTH) runs before
any field of the SA is written; a refused message is counted in ``drops`` under its
``DropReason``.  An authenticated request whose content we refuse is still answered (with an
error notification, §2.21) so that the peer's window moves on.

States (the literal table is ``TRANSITIONS``)::

    initiator:  IDLE -> INIT_SENT -> AUTH_SENT -> ESTABLISHED
    responder:  IDLE -> INIT_ANSWERED -> ESTABLISHED
    ESTABLISHED -> REKEYED (a new IKE SA took over its children, §2.18) -> CLOSED
    ESTABLISHED / REKEYED -> DELETING (we sent Delete) -> CLOSED;   any -> CLOSED on failure
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.ike import codec
from mipsec.ike import proposals as P
from mipsec.ike.child import ChildSa, split_keymat
from mipsec.ike.codec import (
    AuthPayload,
    DeletePayload,
    Header,
    IdPayload,
    KePayload,
    Message,
    NoncePayload,
    NotifyPayload,
    SaPayload,
    TrafficSelector,
    TsPayload,
)
from mipsec.ike.config import (
    Address,
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeConfig,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
    PeerAddressChanged,
    SendDatagram,
    identity,
    identity_text,
)
from mipsec.ike.constants import (
    HALF_OPEN_TIMEOUT_S,
    MAX_NONCE_LEN,
    MIN_NONCE_LEN,
    NAT_KEEPALIVE,
    NAT_T_PORT,
    NON_ESP_MARKER,
    NONCE_LEN,
    RETRANSMIT_INITIAL_S,
    RETRANSMIT_TRIES,
    SETUP_RETRANSMIT_MAX_S,
    AuthMethod,
    ExchangeType,
    Flag,
    NotifyType,
    PayloadType,
    ProtocolId,
)
from mipsec.ike.crypto import (
    DhPrivate,
    IkeKeys,
    IkeSuite,
    SkCipher,
    child_keymat,
    derive_ike_keys,
    psk_auth,
    rekey_skeyseed,
    skeyseed,
)

Random = Callable[[int], bytes]


class State(enum.Enum):
    IDLE = "idle"
    INIT_SENT = "init-sent"
    AUTH_SENT = "auth-sent"
    INIT_ANSWERED = "init-answered"
    ESTABLISHED = "established"
    REKEYED = "rekeyed"
    DELETING = "deleting"
    CLOSED = "closed"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.IDLE: frozenset({S.INIT_SENT, S.INIT_ANSWERED, S.ESTABLISHED, S.CLOSED}),
    S.INIT_SENT: frozenset({S.INIT_SENT, S.AUTH_SENT, S.CLOSED}),
    S.AUTH_SENT: frozenset({S.ESTABLISHED, S.CLOSED}),
    S.INIT_ANSWERED: frozenset({S.ESTABLISHED, S.CLOSED}),
    S.ESTABLISHED: frozenset({S.REKEYED, S.DELETING, S.CLOSED}),
    S.REKEYED: frozenset({S.DELETING, S.CLOSED}),
    S.DELETING: frozenset({S.CLOSED}),
    S.CLOSED: frozenset(),
}
# The peer's requests we answer in each state (anything else: IKE_UNEXPECTED_EXCHANGE).
ACCEPTS_REQUEST: dict[State, frozenset[int]] = {
    S.INIT_ANSWERED: frozenset({ExchangeType.IKE_AUTH}),
    S.ESTABLISHED: frozenset({ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL}),
    S.REKEYED: frozenset({ExchangeType.INFORMATIONAL}),
    S.DELETING: frozenset({ExchangeType.INFORMATIONAL}),
}
# The exchanges we may start in each state.
MAY_REQUEST: dict[State, frozenset[int]] = {
    S.ESTABLISHED: frozenset({ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL}),
    S.REKEYED: frozenset({ExchangeType.INFORMATIONAL}),
    S.DELETING: frozenset({ExchangeType.INFORMATIONAL}),
}


def nat_hash(spi_i: bytes, spi_r: bytes, address: Address) -> bytes:
    """§2.23: SHA-1(SPIi | SPIr | IP | Port)."""
    import ipaddress
    return hashlib.sha1(spi_i + spi_r + ipaddress.IPv4Address(address[0]).packed
                        + address[1].to_bytes(2, "big")).digest()


class _Refused(Exception):
    """An authenticated request we answer with an error notification."""

    def __init__(self, notify: int, reason: DropReason, data: bytes = b""):
        super().__init__(notify)
        self.notify, self.reason, self.data = notify, reason, data


@dataclass
class _Request:
    """One of our requests, queued or in flight."""
    kind: str
    exchange: int
    ctx: dict
    mid: int = -1
    raw: bytes = b""
    local: Address = ("", 0)
    remote: Address = ("", 0)
    tries: int = 0
    next_at: float = 0.0


class IkeSa:
    """One IKE SA; see the module docstring.  Create with ``IkeSa.initiator(...)`` or let
    ``IkeEndpoint`` create responders."""

    def __init__(self, config: IkeConfig, *, initiator: bool, local: Address, remote: Address,
                 spi_i: bytes, spi_r: bytes, random: Random = os.urandom,
                 alloc_esp_spi: Callable[[], int] | None = None, drops: Counter | None = None,
                 now: float = 0.0, release_esp_spi: Callable[[int], None] | None = None):
        self.config = config
        self.initiator = initiator
        self.local, self.remote = local, remote
        self.spi_i, self.spi_r = spi_i, spi_r
        self.state = State.IDLE
        self._random = random
        self._alloc_esp_spi = alloc_esp_spi or self._random_esp_spi
        # gives back an SPI allocated for a child that was never made
        self._release_esp_spi = release_esp_spi or (lambda spi: None)
        self.drops: Counter[DropReason] = drops if drops is not None else Counter()
        self.suite: IkeSuite | None = None
        self.keys: IkeKeys | None = None
        self._sk_in_cipher: SkCipher | None = None      # from IKE_SA_INIT on (_set_keys)
        self._sk_out_cipher: SkCipher | None = None
        self.ni = self.nr = b""
        self._dh: DhPrivate | None = None
        self._init_request = b""          # RealMessage1 (§2.15), as last sent / received
        self._init_response = b""         # RealMessage2
        self.peer_id: str | None = None
        self.peer_mobike = False
        self.nat_local = False            # we are behind a NAT (§2.23)
        self.nat_remote = False           # the peer is behind a NAT
        self.children: dict[int, ChildSa] = {}     # by our inbound SPI
        self._child_rekey_at: dict[int, float] = {}
        # §2.8.1 collisions: old child SPI -> {"ours"/"theirs": (Ni, Nr, new child SPI)}
        self._collisions: dict[int, dict] = {}
        self._mid_out = 0
        self._mid_in = 0
        self._pending: _Request | None = None
        self._queue: deque[_Request] = deque()
        self._cached: tuple[int, bytes, bytes, Address] | None = None  # mid, req, resp
        self._out: list = []
        self.created = now
        self.established_at: float | None = None
        self.last_heard = now
        self._last_sent = now
        self._rekey_at: float | None = None
        self._closing_at: float | None = None if initiator else now + HALF_OPEN_TIMEOUT_S
        self.successor: IkeSa | None = None
        self.initial_contact = False      # the peer said it has no other IKE SA with us (§2.4)

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def new_initiator(cls, config: IkeConfig, local: Address, remote: Address, *, now: float,
                      random: Random = os.urandom, **kw) -> IkeSa:
        spi = b""
        while not any(spi):
            spi = random(8)
        return cls(config, initiator=True, local=local, remote=remote, spi_i=spi,
                   spi_r=bytes(8), random=random, now=now, **kw)

    def _random_esp_spi(self) -> int:
        while True:
            spi = int.from_bytes(self._random(4), "big")
            if spi >= 256:                       # RFC 4303 §2.1: 1..255 reserved
                return spi

    # --- bookkeeping ----------------------------------------------------------------------------

    def _goto(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise UsageError(f"IKE SA {self.name}: illegal transition {self.state} -> {new}")
        self.state = new

    @property
    def name(self) -> str:
        return f"{self.spi_i.hex()}_i {self.spi_r.hex()}_r"

    @property
    def is_established(self) -> bool:
        return self.state == State.ESTABLISHED

    @property
    def encap(self) -> bool:
        """UDP-encapsulate ESP (RFC 3948): a NAT on either side, or forced by configuration."""
        return self.nat_local or self.nat_remote or self.config.force_encap

    def _drop(self, reason: DropReason) -> list:
        self.drops[reason] += 1
        return self._flush()

    def _flush(self) -> list:
        out, self._out = self._out, []
        return out

    def _emit_datagram(self, msg: bytes, local: Address, remote: Address, now: float) -> None:
        data = _marker(local) + msg
        self._out.append(SendDatagram(data, local, remote))
        self._last_sent = now

    def _close(self, event) -> None:
        if self.children:
            # §1.4.1: child SAs never outlive their IKE SA, however it ends (a failed liveness
            # check or exchange too): each is reported deleted before the IKE SA's own event
            self._delete_all_children()
        if self.state != State.CLOSED:
            self._goto(State.CLOSED)
        if self._pending is not None and self._pending.kind == "rekey_child" \
                and "spi_in" in self._pending.ctx:
            self._release_esp_spi(self._pending.ctx["spi_in"])   # that child never came
        self._pending = None
        self._queue.clear()
        self._out.append(event)

    def status(self) -> dict[str, Any]:
        return {"spi_i": self.spi_i.hex(), "spi_r": self.spi_r.hex(), "state": self.state.value,
                "initiator": self.initiator, "peer_id": self.peer_id,
                "local": f"{self.local[0]}:{self.local[1]}",
                "remote": f"{self.remote[0]}:{self.remote[1]}",
                "nat_local": self.nat_local, "nat_remote": self.nat_remote,
                "mobike": self.peer_mobike and self.config.mobike,
                "children": [c.describe() for c in self.children.values()],
                "drops": {str(k): v for k, v in self.drops.items() if v}}

    # --- message building ------------------------------------------------------------------------

    def _header(self, exchange: int, mid: int, response: bool) -> Header:
        flags = (Flag.INITIATOR if self.initiator else 0) | (Flag.RESPONSE if response else 0)
        return Header(self.spi_i, self.spi_r, exchange, flags, mid)

    def _queue_request(self, kind: str, exchange: int, now: float, **ctx) -> None:
        self._queue.append(_Request(kind, exchange, ctx))
        self._pump(now)

    def _pump(self, now: float) -> None:
        """Send the next queued request if none is in flight (window size 1, §2.3)."""
        while self._pending is None and self._queue:
            req = self._queue.popleft()
            if req.exchange not in MAY_REQUEST.get(self.state, ()):
                continue                               # e.g. a re-key queued before a Delete
            payloads = getattr(self, f"_build_{req.kind}")(req, now)
            if payloads is None:
                continue
            req.mid = self._mid_out
            req.raw = self._sk_out.protect(self._header(req.exchange, req.mid, False), payloads)
            self._send_pending(req, now)

    def _send_pending(self, req: _Request, now: float) -> None:
        req.local, req.remote = self.local, self.remote
        req.tries = 0
        req.next_at = now + RETRANSMIT_INITIAL_S
        self._pending = req
        self._emit_datagram(req.raw, req.local, req.remote, now)

    def _respond(self, request: Message, payloads, local: Address, remote: Address,
                 now: float) -> None:
        h = self._header(request.header.exchange, request.header.message_id, True)
        raw = self._sk_out.protect(h, list(payloads))
        self._cached = (request.header.message_id, request.raw, raw, remote)
        self._emit_datagram(raw, local, remote, now)

    # --- timers ------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        times = []
        if self.state == State.CLOSED:
            return None
        if self._pending is not None:
            times.append(self._pending.next_at)
        if self._closing_at is not None:
            times.append(self._closing_at)
        if self.state == State.ESTABLISHED:
            c = self.config
            if c.dpd_interval_s and self._pending is None:
                times.append(self.last_heard + c.dpd_interval_s)     # §2.4: silence from the peer
            if self.encap and (self.nat_local or c.force_encap):
                times.append(self._last_sent + c.nat_keepalive_s)
            if self._rekey_at is not None:
                times.append(self._rekey_at)
            times.extend(self._child_rekey_at.values())
        return min(times) if times else None

    def handle_timer(self, now: float) -> list:
        if self.state == State.CLOSED:
            return []
        p = self._pending
        if p is not None and now >= p.next_at:
            if p.tries + 1 >= RETRANSMIT_TRIES:
                why = (f"IKE_SA_INIT refused: {p.ctx['refused']}" if p.ctx.get("refused")
                       else f"no response to {p.kind} after {p.tries + 1} tries")
                self._close(IkeSaFailed(self, why))
                return self._flush()
            p.tries += 1
            interval = RETRANSMIT_INITIAL_S * (2 ** p.tries)             # §2.1: back off
            if self.state in (State.INIT_SENT, State.AUTH_SENT):
                # setting up: the peer is probably coming back (a restart); the caller backs
                # off between whole attempts instead
                interval = min(interval, SETUP_RETRANSMIT_MAX_S)
            p.next_at = now + interval
            self._emit_datagram(p.raw, p.local, p.remote, now)
        if self._closing_at is not None and now >= self._closing_at \
                and self.state == State.INIT_ANSWERED:     # (an initiator's retries end it)
            self._close(IkeSaFailed(self, "half-open IKE SA timed out"))
            return self._flush()
        if self._closing_at is not None and now >= self._closing_at \
                and self.state == State.REKEYED and self._pending is None:
            # §2.18: the peer re-keyed but never deleted this one; it carries nothing any more
            self._close(IkeSaDeleted(self, "superseded by its re-key"))
            return self._flush()
        if self.state == State.ESTABLISHED:
            # the requests below return (flush) what they send at once: keep it, in order
            c = self.config
            sent: list = []
            if self._rekey_at is not None and now >= self._rekey_at:
                self._rekey_at = None
                sent += self.rekey(now)
            for spi, at in list(self._child_rekey_at.items()):
                if now >= at and spi in self.children:
                    del self._child_rekey_at[spi]
                    sent += self.rekey_child(spi, now)
            if (c.dpd_interval_s and self._pending is None and not self._queue
                    and now >= self.last_heard + c.dpd_interval_s):
                sent += self.check_liveness(now)
            self._out[:0] = sent
            if self.encap and (self.nat_local or c.force_encap) \
                    and now >= self._last_sent + c.nat_keepalive_s:
                self._out.append(SendDatagram(NAT_KEEPALIVE, self.local, self.remote, True))
                self._last_sent = now                                   # RFC 3948 §4
        return self._flush()

    # --- IKE_SA_INIT (§1.2) as initiator ----------------------------------------------------------

    def start(self, now: float, cookie: bytes | None = None, group: int | None = None) -> list:
        """Send (or re-send, with a cookie or another KE group) the IKE_SA_INIT request."""
        if self.state not in (State.IDLE, State.INIT_SENT) or not self.initiator:
            raise UsageError(f"IKE SA {self.name}: start() in state {self.state.value}")
        c = self.config
        group = group or c.ike_suites[0].dh
        if self._dh is None or self._dh.group != group:
            self._dh = DhPrivate.generate(group, self._random)
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
        payloads += [SaPayload(P.ike_proposals(suites)), KePayload(group, self._dh.public),
                     NoncePayload(self.ni),
                     NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, src_hash),
                     NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                                   nat_hash(self.spi_i, bytes(8), self.remote))]
        self._offered_ike = tuple(suites)
        h = self._header(ExchangeType.IKE_SA_INIT, 0, False)
        raw = codec.build_message(h, payloads)
        self._init_request = raw
        if self.state == State.IDLE:
            self._goto(State.INIT_SENT)
        self._mid_out = 0
        self._send_pending(_Request("init", ExchangeType.IKE_SA_INIT, {"cookies": 0}, 0, raw), now)
        return self._flush()

    def _on_init_response(self, m: Message, req: _Request, local, remote, now) -> list:
        errors = [n for n in m.notifies() if n.type < 16384]
        cookie = m.notifies(NotifyType.COOKIE)
        if cookie and not m.find(SaPayload):
            if req.ctx["cookies"] >= 2 or not 1 <= len(cookie[0].data) <= 64:
                return self._drop(DropReason.IKE_INVALID_COOKIE)
            n = req.ctx["cookies"] + 1
            self._pending = None
            out = self.start(now, cookie=cookie[0].data, group=self._own_dh().group)
            self._in_flight().ctx["cookies"] = n
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
            req.ctx["refused"] = _notify_name(e.type)
            return self._drop(DropReason.IKE_NO_PROPOSAL_CHOSEN
                              if e.type == NotifyType.NO_PROPOSAL_CHOSEN else DropReason.MALFORMED)
        sa, ke, nonce = m.find(SaPayload), m.find(KePayload), m.find(NoncePayload)
        if sa is None or ke is None or nonce is None or not any(m.header.spi_r):
            return self._drop(DropReason.MALFORMED)
        suite = P.accept_ike_answer(sa.proposals, self._offered_ike)
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
        self._init_response = m.raw
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

    def _nat_detect(self, m: Message, local: Address, remote: Address, request: bool) -> None:
        src = [n.data for n in m.notifies(NotifyType.NAT_DETECTION_SOURCE_IP)]
        dst = [n.data for n in m.notifies(NotifyType.NAT_DETECTION_DESTINATION_IP)]
        spi_r = bytes(8) if request else self.spi_r
        if src:
            self.nat_remote = nat_hash(self.spi_i, spi_r, remote) not in src
        if dst:
            self.nat_local = nat_hash(self.spi_i, spi_r, local) not in dst

    # --- what exists only once IKE_SA_INIT has run (the state machine guarantees it) -----------

    def _keyed(self) -> tuple[IkeSuite, IkeKeys]:
        """The negotiated suite and keys."""
        if self.suite is None or self.keys is None:
            raise UsageError(f"IKE SA in state {self.state}: no keys yet")
        return self.suite, self.keys

    def _prf_sk_d(self) -> tuple[int, bytes]:
        """(PRF, SK_d): what child keys and a re-keyed IKE SA derive from (§2.17, §2.18)."""
        suite, keys = self._keyed()
        return suite.prf, keys.sk_d

    @property
    def _sk_in(self) -> SkCipher:
        if self._sk_in_cipher is None:
            raise UsageError(f"IKE SA in state {self.state}: no SK cipher yet")
        return self._sk_in_cipher

    @property
    def _sk_out(self) -> SkCipher:
        if self._sk_out_cipher is None:
            raise UsageError(f"IKE SA in state {self.state}: no SK cipher yet")
        return self._sk_out_cipher

    def _own_dh(self) -> DhPrivate:
        """Our Diffie-Hellman value of the IKE_SA_INIT we sent."""
        if self._dh is None:
            raise UsageError(f"IKE SA in state {self.state}: no DH value")
        return self._dh

    def _in_flight(self) -> _Request:
        if self._pending is None:
            raise UsageError("no IKE request in flight")
        return self._pending

    def _set_keys(self, suite: IkeSuite, seed: bytes) -> None:
        self.suite = suite
        self.keys = k = derive_ike_keys(suite, seed, self.ni, self.nr, self.spi_i, self.spi_r)
        if self.initiator:
            self._sk_out_cipher = SkCipher(suite, k.sk_ei, k.sk_ai, self._random)
            self._sk_in_cipher = SkCipher(suite, k.sk_er, k.sk_ar, self._random)
        else:
            self._sk_out_cipher = SkCipher(suite, k.sk_er, k.sk_ar, self._random)
            self._sk_in_cipher = SkCipher(suite, k.sk_ei, k.sk_ai, self._random)

    # --- IKE_AUTH (§1.2, §2.15) -------------------------------------------------------------------

    def _id_payload(self, ptype: PayloadType) -> IdPayload:
        t, data = identity(self.config.local_id)
        return IdPayload(ptype, t, data)

    def _auth_data(self, psk: bytes, ours: bool, id_body: bytes) -> bytes:
        """§2.15: we sign our own INIT message with the peer's nonce and our ID."""
        suite, k = self._keyed()
        if ours == self.initiator:          # the initiator's AUTH
            return psk_auth(suite.prf, psk, self._init_request, self.nr, k.sk_pi, id_body)
        return psk_auth(suite.prf, psk, self._init_response, self.ni, k.sk_pr, id_body)

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
        self._send_pending(_Request("auth", ExchangeType.IKE_AUTH, {"spi_in": spi_in}, 1, raw), now)

    def _on_auth_response(self, m: Message, req: _Request, local, remote, now) -> list:
        c = self.config
        errors = [n for n in m.notifies() if n.type < 16384]
        idr, auth = m.find(IdPayload, PayloadType.IDr), m.find(AuthPayload)
        if idr is None or auth is None:
            reason = (DropReason.IKE_AUTH_FAILED if any(
                e.type == NotifyType.AUTHENTICATION_FAILED for e in errors) else DropReason.MALFORMED)
            self.drops[reason] += 1
            self._close(IkeSaFailed(self, "IKE_AUTH refused: " + ", ".join(
                _notify_name(e.type) for e in errors) if errors else "IKE_AUTH without IDr/AUTH"))
            return self._flush()
        peer_id = identity_text(idr.id_type, idr.data)
        psk = c.psk_for(peer_id) if c.remote_id is None else (
            c.psk_for(peer_id) if peer_id == c.remote_id else None)
        if psk is None or auth.method != AuthMethod.SHARED_KEY_MIC or not hmac.compare_digest(
                auth.data, self._auth_data(psk, False, idr.body())):
            self.drops[DropReason.IKE_AUTH_FAILED] += 1
            self._close(IkeSaFailed(self, f"responder {peer_id!r} failed authentication"))
            return self._flush()
        child = None
        sa, tsi, tsr = m.find(SaPayload), m.find(TsPayload, PayloadType.TSi), \
            m.find(TsPayload, PayloadType.TSr)
        if sa is not None and tsi is not None and tsr is not None:
            suite = P.accept_esp_answer(sa.proposals, c.esp_suites, None)
            if suite is not None and _within(tsi.selectors, c.local_ts) \
                    and _within(tsr.selectors, c.remote_ts):
                keymat = child_keymat(*self._prf_sk_d(), self.ni, self.nr,
                                      2 * sum(suite.keymat_lengths()))
                child = self._make_child(req.ctx["spi_in"], sa.proposals[0].spi, suite,
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
        self._out.append(IkeSaEstablished(self, self.peer_id or "", self.remote))
        if child is not None:
            self._add_child(child, now)
            self._out.append(ChildSaEstablished(self, child))
        self._pump(now)
        return self._flush()

    def _retry_delay(self, lifetime: float) -> float:
        """When to try a refused re-key again: the original responder waits half as long
        again, so that two ends that collided (§2.25, TEMPORARY_FAILURE) do not collide again."""
        return min(60.0, lifetime / 10) * (1.0 if self.initiator else 1.5)

    def _make_child(self, spi_in: int, spi_out: bytes, suite, keys, local_ts, remote_ts,
                    now: float) -> ChildSa:
        return ChildSa(spi_in=spi_in, spi_out=int.from_bytes(spi_out, "big"), suite=suite,
                       keys=keys, local_ts=tuple(local_ts), remote_ts=tuple(remote_ts),
                       local_address=self.local[0], remote_address=self.remote[0],
                       udp_encap=self.encap, local_port=self.local[1] if self.encap else 4500,
                       remote_port=self.remote[1] if self.encap else 4500, created=now)

    def _add_child(self, child: ChildSa, now: float) -> None:
        self.children[child.spi_in] = child
        if self.config.child_lifetime_s:
            self._child_rekey_at[child.spi_in] = now + self.config.child_lifetime_s * (
                1.0 if self.initiator else 1.1)

    # --- responder: IKE_SA_INIT arrives (called by the endpoint) ----------------------------------

    @classmethod
    def respond_init(cls, config: IkeConfig, m: Message, local: Address, remote: Address,
                     now: float, *, spi_r: bytes, random: Random, drops: Counter,
                     alloc_esp_spi=None, release_esp_spi=None) -> tuple[IkeSa | None, list]:
        """Answer an IKE_SA_INIT request: a new half-open SA, or (None, [error response])."""
        sa_p, ke, nonce = m.find(SaPayload), m.find(KePayload), m.find(NoncePayload)
        h = m.header

        def refuse(ntype: int, data: bytes, reason: DropReason):
            drops[reason] += 1
            resp = codec.build_message(Header(h.spi_i, bytes(8), h.exchange, Flag.RESPONSE, 0),
                                       [NotifyPayload(ntype, data)])
            return None, [SendDatagram(_marker(local) + resp, local, remote)]

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
        self._dh = dh
        self.ni, self.nr = nonce.data, random(NONCE_LEN)
        self._init_request = m.raw
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
        self._init_response = raw
        self._set_keys(suite, skeyseed(suite.prf, self.ni, self.nr, shared))
        self._goto(State.INIT_ANSWERED)
        self._mid_in = 1
        self._cached = (0, m.raw, raw, remote)
        self._emit_datagram(raw, local, remote, now)
        return self, self._flush()

    def retransmitted_init(self, m: Message, local: Address, remote: Address, now: float) -> list:
        """An IKE_SA_INIT request for this half-open SA again: the same octets get the same
        answer (§2.1), anything else is dropped."""
        if self.state == State.INIT_ANSWERED and self._cached and self._cached[0] == 0 \
                and m.raw == self._cached[1]:
            self.drops[DropReason.IKE_RETRANSMISSION] += 1
            self._emit_datagram(self._cached[2], local, remote, now)
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
            self._close(IkeSaFailed(self, f"initiator {peer_id!r} failed authentication"))
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
        try:
            child, answer = self._negotiate_child(m, None, self.ni, self.nr, None, now)
            out += answer
        except _Refused as r:
            self.drops[r.reason] += 1
            out.append(NotifyPayload(r.notify, r.data))
        self.peer_id = peer_id
        self._respond(m, out, local, remote, now)
        self._mid_in += 1
        return self._established(now, child)

    def _negotiate_child(self, m: Message, dh_group: int | None, ni: bytes, nr: bytes,
                         shared: bytes | None, now: float) -> tuple[ChildSa, list]:
        """Responder side of child SA negotiation (IKE_AUTH or CREATE_CHILD_SA).  Raises
        _Refused before anything changes."""
        c = self.config
        sa, tsi, tsr = m.find(SaPayload), m.find(TsPayload, PayloadType.TSi), \
            m.find(TsPayload, PayloadType.TSr)
        if sa is None or tsi is None or tsr is None:
            raise _Refused(NotifyType.INVALID_SYNTAX, DropReason.MALFORMED)
        chosen = P.choose_esp(sa.proposals, c.esp_suites, dh_group)
        if chosen is None:
            raise _Refused(NotifyType.NO_PROPOSAL_CHOSEN, DropReason.IKE_NO_PROPOSAL_CHOSEN)
        peer_prop, suite = chosen
        # §2.9: narrow; the initiator's TSi is our remote side
        remote_ts = _narrow(tsi.selectors, c.remote_ts)
        local_ts = _narrow(tsr.selectors, c.local_ts)
        if remote_ts is None or local_ts is None:
            raise _Refused(NotifyType.TS_UNACCEPTABLE, DropReason.SELECTOR_MISMATCH)
        spi_in = self._alloc_esp_spi()
        keymat = child_keymat(*self._prf_sk_d(), ni, nr,
                              2 * sum(suite.keymat_lengths()), shared)
        child = self._make_child(spi_in, peer_prop.spi, suite, split_keymat(keymat, suite, False),
                                 local_ts, remote_ts, now)
        answer = [SaPayload((P.esp_answer(peer_prop, suite, spi_in.to_bytes(4, "big")),)),
                  TsPayload(PayloadType.TSi, remote_ts), TsPayload(PayloadType.TSr, local_ts)]
        return child, answer

    # --- receiving -------------------------------------------------------------------------------

    def receive(self, m: Message, local: Address, remote: Address, now: float) -> list:
        """A parsed message the endpoint matched to this SA."""
        h = m.header
        if self.state == State.CLOSED:
            return self._drop(DropReason.IKE_UNKNOWN_SA)
        if h.from_initiator == self.initiator:        # §3.1: I flag names the original initiator
            return self._drop(DropReason.IKE_UNKNOWN_SA)
        if h.is_response:
            return self._receive_response(m, local, remote, now)
        return self._receive_request(m, local, remote, now)

    def _receive_response(self, m: Message, local, remote, now) -> list:
        p, h = self._pending, m.header
        if p is None or h.message_id != p.mid:
            return self._drop(DropReason.IKE_BAD_MESSAGE_ID)
        if h.exchange != p.exchange:
            return self._drop(DropReason.IKE_UNEXPECTED_EXCHANGE)
        if p.kind == "init":
            if h.spi_i != self.spi_i:
                return self._drop(DropReason.IKE_UNKNOWN_SA)
            if m.encrypted is not None:
                return self._drop(DropReason.MALFORMED)
            return self._on_init_response(m, p, local, remote, now)
        if h.spi_r != self.spi_r:
            return self._drop(DropReason.IKE_UNKNOWN_SA)
        try:
            m = replace(m, payloads=m.payloads + self._sk_in.open(m))
        except ParseError as e:
            return self._drop(e.reason)
        self.last_heard = now
        if p.kind == "auth":
            return self._on_auth_response(m, p, local, remote, now)
        self._pending = None
        self._mid_out += 1
        getattr(self, f"_on_{p.kind}_response")(m, p, now)
        self._pump(now)
        return self._flush()

    def _receive_request(self, m: Message, local, remote, now) -> list:
        h = m.header
        if h.spi_r != self.spi_r:
            return self._drop(DropReason.IKE_UNKNOWN_SA)
        if self._cached is not None and h.message_id == self._cached[0]:
            if m.raw == self._cached[1]:
                # §2.1: a retransmitted request gets the same response again
                self.drops[DropReason.IKE_RETRANSMISSION] += 1
                self._emit_datagram(self._cached[2], local, remote, now)
                return self._flush()
            return self._drop(DropReason.IKE_BAD_MESSAGE_ID)
        if h.message_id != self._mid_in:
            return self._drop(DropReason.IKE_BAD_MESSAGE_ID)
        if h.exchange not in ACCEPTS_REQUEST.get(self.state, ()):
            return self._drop(DropReason.IKE_UNEXPECTED_EXCHANGE)
        try:
            inner = self._sk_in.open(m)
        except codec.UnknownCriticalPayload as e:
            # §2.5: authenticated, but a critical payload we do not know: refuse it
            self.drops[e.reason] += 1
            self._respond(m, [NotifyPayload(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,
                                            bytes([e.ptype]))], local, remote, now)
            self._mid_in += 1
            return self._flush()
        except ParseError as e:
            return self._drop(e.reason)
        m = replace(m, payloads=m.payloads + inner)
        self.last_heard = now
        if h.exchange == ExchangeType.IKE_AUTH:
            return self._on_auth_request(m, local, remote, now)
        if self.nat_remote and remote != self.remote \
                and not m.notifies(NotifyType.UPDATE_SA_ADDRESSES):
            # §2.23: the peer is behind a NAT whose mapping changed: follow the address of the
            # latest authenticated request, and move the children's ESP with it
            self.local, self.remote = local, remote
            self._rebind_children(now, explicit=False)
        if h.exchange == ExchangeType.CREATE_CHILD_SA:
            self._on_create_child_request(m, local, remote, now)
        else:
            self._on_informational_request(m, local, remote, now)
        self._pump(now)
        return self._flush()

    # --- CREATE_CHILD_SA (§1.3) ------------------------------------------------------------------

    def rekey_child(self, spi_in: int, now: float) -> list:
        """Re-key the child whose inbound SPI is ``spi_in`` (§1.3.3); the old one is deleted
        once the new one is up."""
        if spi_in not in self.children:
            raise UsageError(f"no child SA with inbound SPI {spi_in:08x}")
        self._queue_request("rekey_child", ExchangeType.CREATE_CHILD_SA, now, old=spi_in)
        return self._flush()

    def create_child(self, now: float, local_ts=None, remote_ts=None) -> list:
        """An additional child SA (§1.3.1)."""
        self._queue_request("rekey_child", ExchangeType.CREATE_CHILD_SA, now, old=None,
                            local_ts=local_ts, remote_ts=remote_ts)
        return self._flush()

    def _build_rekey_child(self, req: _Request, now: float):
        c = self.config
        old = self.children.get(req.ctx["old"]) if req.ctx["old"] is not None else None
        if req.ctx["old"] is not None and old is None:
            return None                                   # deleted meanwhile
        spi_in = self._alloc_esp_spi()
        ni = self._random(NONCE_LEN)
        dh = DhPrivate.generate(c.pfs_group, self._random) if c.pfs_group else None
        req.ctx.update(spi_in=spi_in, ni=ni, dh=dh)
        suites = [replace(s, dh=c.pfs_group) for s in c.esp_suites]
        payloads: list = []
        if old is not None:
            payloads.append(NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP,
                                          old.spi_in.to_bytes(4, "big")))
        payloads += [SaPayload(P.esp_proposals(suites, spi_in.to_bytes(4, "big"), bool(dh))),
                     NoncePayload(ni)]
        if dh:
            payloads.append(KePayload(dh.group, dh.public))
        lts = req.ctx.get("local_ts") or (old.local_ts if old else c.local_ts)
        rts = req.ctx.get("remote_ts") or (old.remote_ts if old else c.remote_ts)
        req.ctx.update(lts=lts, rts=rts)
        payloads += [TsPayload(PayloadType.TSi, tuple(lts)), TsPayload(PayloadType.TSr, tuple(rts))]
        return payloads

    def _on_rekey_child_response(self, m: Message, req: _Request, now: float) -> None:
        c = self.config
        errors = [n for n in m.notifies() if n.type < 16384]
        sa, nonce, ke = m.find(SaPayload), m.find(NoncePayload), m.find(KePayload)
        tsi, tsr = m.find(TsPayload, PayloadType.TSi), m.find(TsPayload, PayloadType.TSr)
        dh: DhPrivate | None = req.ctx["dh"]
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
            if suite is not None and not (_within(tsi.selectors, req.ctx["lts"])
                                          and _within(tsr.selectors, req.ctx["rts"])):
                suite = None
        if suite is None:
            self.drops[DropReason.IKE_NO_PROPOSAL_CHOSEN] += 1
            self._release_esp_spi(req.ctx["spi_in"])     # no child: the SPI is free again
            old = req.ctx["old"]
            if old in self.children and c.child_lifetime_s:
                self._child_rekey_at[old] = now + self._retry_delay(c.child_lifetime_s)
            return
        keymat = child_keymat(*self._prf_sk_d(), req.ctx["ni"], nonce.data,
                              2 * sum(suite.keymat_lengths()), shared)
        child = self._make_child(req.ctx["spi_in"], sa.proposals[0].spi, suite,
                                 split_keymat(keymat, suite, True), tsi.selectors,
                                 tsr.selectors, now)
        self._add_child(child, now)
        old = self.children.get(req.ctx["old"]) if req.ctx["old"] is not None else None
        if old is None:
            self._out.append(ChildSaEstablished(self, child))
            return
        self._out.append(ChildSaRekeyed(self, old, child))
        self._child_rekey_at.pop(old.spi_in, None)
        # §2.8: the initiator of the re-key deletes the old SA
        self._queue.appendleft(_Request("delete_child", ExchangeType.INFORMATIONAL,
                                        {"spis": [old.spi_in]}))
        self._collision(old.spi_in, "ours", (req.ctx["ni"], nonce.data, child.spi_in))

    def _collision(self, old_spi: int, side: str, nonces: tuple[bytes, bytes, int]) -> None:
        """§2.8.1: both ends re-keyed the same child.  Of the two new SAs, the one whose
        exchange used the lowest of the four nonces (octet by octet) is closed by whoever
        created it, so exactly one survives on both ends."""
        rec = self._collisions.setdefault(old_spi, {})
        rec[side] = nonces
        if "ours" in rec and "theirs" in rec:
            ours, theirs = rec["ours"], rec["theirs"]
            del self._collisions[old_spi]
            if min(ours[0], ours[1], theirs[0], theirs[1]) in (ours[0], ours[1]):
                self._child_rekey_at.pop(ours[2], None)
                self._queue.append(_Request("delete_child", ExchangeType.INFORMATIONAL,
                                            {"spis": [ours[2]]}))

    def _on_create_child_request(self, m: Message, local, remote, now) -> None:
        sa, nonce, ke = m.find(SaPayload), m.find(NoncePayload), m.find(KePayload)
        try:
            if sa is None or nonce is None or not MIN_NONCE_LEN <= len(nonce.data) <= MAX_NONCE_LEN:
                raise _Refused(NotifyType.INVALID_SYNTAX, DropReason.MALFORMED)
            if sa.proposals and sa.proposals[0].protocol == ProtocolId.IKE:
                return self._on_rekey_ike_request(m, sa, nonce, ke, local, remote, now)
            if self.state != State.ESTABLISHED:
                raise _Refused(NotifyType.TEMPORARY_FAILURE, DropReason.IKE_UNEXPECTED_EXCHANGE)
            rekey = [n for n in m.notifies(NotifyType.REKEY_SA) if n.protocol == ProtocolId.ESP]
            old = None
            if rekey:
                spi_out = int.from_bytes(rekey[0].spi, "big")
                old = next((ch for ch in self.children.values() if ch.spi_out == spi_out), None)
                if old is None:
                    raise _Refused(NotifyType.CHILD_SA_NOT_FOUND, DropReason.UNKNOWN_SPI)
            dh = shared = None
            if ke is not None:
                try:                            # any group we implement (DhGroup refuses others)
                    dh = DhPrivate.generate(ke.group, self._random)
                    shared = dh.shared_secret(ke.data)
                except (ParseError, ValueError):
                    raise _Refused(NotifyType.INVALID_KE_PAYLOAD,
                                   DropReason.IKE_NO_PROPOSAL_CHOSEN) from None
            nr = self._random(NONCE_LEN)
            child, answer = self._negotiate_child(m, ke.group if ke else 0, nonce.data, nr,
                                                  shared, now)
        except _Refused as r:
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
            self._out.append(ChildSaRekeyed(self, old, child, send_on_new=False))
            p = self._pending
            if (p is not None and p.kind == "rekey_child" and p.ctx.get("old") == old.spi_in) \
                    or old.spi_in in self._collisions:
                self._collision(old.spi_in, "theirs", (nonce.data, nr, child.spi_in))
        else:
            self._out.append(ChildSaEstablished(self, child))
        self._respond(m, out, local, remote, now)
        self._mid_in += 1

    # --- IKE SA re-key (§1.3.2, §2.18) -----------------------------------------------------------

    def rekey(self, now: float) -> list:
        """Re-key this IKE SA: a new one takes over the children, then this one is deleted."""
        self._queue_request("rekey_ike", ExchangeType.CREATE_CHILD_SA, now)
        return self._flush()

    def _build_rekey_ike(self, req: _Request, now: float):
        spi = b""
        while not any(spi):
            spi = self._random(8)
        ni = self._random(NONCE_LEN)
        suites = sorted(self.config.ike_suites, key=lambda s: s != self.suite)
        dh = DhPrivate.generate(suites[0].dh, self._random)
        req.ctx.update(spi=spi, ni=ni, dh=dh, suites=tuple(suites))
        return [SaPayload(P.ike_proposals(suites, spi)), NoncePayload(ni),
                KePayload(dh.group, dh.public)]

    def _on_rekey_ike_response(self, m: Message, req: _Request, now: float) -> None:
        sa, nonce, ke = m.find(SaPayload), m.find(NoncePayload), m.find(KePayload)
        dh: DhPrivate = req.ctx["dh"]
        suite = shared = None
        if sa and nonce and ke and not [n for n in m.notifies() if n.type < 16384] \
                and MIN_NONCE_LEN <= len(nonce.data) <= MAX_NONCE_LEN \
                and len(sa.proposals) == 1 and len(sa.proposals[0].spi) == 8 \
                and any(sa.proposals[0].spi):
            answer = replace(sa.proposals[0], spi=b"")
            suite = P.accept_ike_answer((answer,), req.ctx["suites"])
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
        new = self._successor(initiator=True, spi_i=req.ctx["spi"], spi_r=sa.proposals[0].spi,
                              ni=req.ctx["ni"], nr=nonce.data, suite=suite, shared=shared, now=now)
        self._out.append(IkeSaRekeyed(self, new))
        # §2.18: the initiator of the re-key deletes the old IKE SA
        self._queue.appendleft(_Request("delete_ike", ExchangeType.INFORMATIONAL, {}))

    def _on_rekey_ike_request(self, m, sa, nonce, ke, local, remote, now) -> None:
        if self.state != State.ESTABLISHED:
            raise _Refused(NotifyType.TEMPORARY_FAILURE, DropReason.IKE_UNEXPECTED_EXCHANGE)
        if self._pending is not None and self._pending.kind in ("rekey_ike", "rekey_child"):
            # §2.25: a collision; we answer TEMPORARY_FAILURE and keep our own re-key
            raise _Refused(NotifyType.TEMPORARY_FAILURE, DropReason.IKE_UNEXPECTED_EXCHANGE)
        chosen = P.choose_ike(sa.proposals, self.config.ike_suites)
        if chosen is None or ke is None:
            raise _Refused(NotifyType.NO_PROPOSAL_CHOSEN, DropReason.IKE_NO_PROPOSAL_CHOSEN)
        answer, suite = chosen
        peer_spi = answer.spi
        if len(peer_spi) != 8 or not any(peer_spi):
            raise _Refused(NotifyType.INVALID_SYNTAX, DropReason.MALFORMED)
        if ke.group != suite.dh:
            raise _Refused(NotifyType.INVALID_KE_PAYLOAD, DropReason.IKE_INVALID_KE_PAYLOAD,
                           suite.dh.to_bytes(2, "big"))
        dh = DhPrivate.generate(suite.dh, self._random)
        try:
            shared = dh.shared_secret(ke.data)
        except ParseError:
            raise _Refused(NotifyType.INVALID_KE_PAYLOAD, DropReason.MALFORMED,
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
        self._out.append(IkeSaRekeyed(self, new))

    def _successor(self, *, initiator: bool, spi_i: bytes, spi_r: bytes, ni: bytes, nr: bytes,
                   suite: IkeSuite, shared: bytes, now: float) -> IkeSa:
        new = IkeSa(self.config, initiator=initiator, local=self.local, remote=self.remote,
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

    # --- INFORMATIONAL (§1.4) --------------------------------------------------------------------

    def check_liveness(self, now: float) -> list:
        """§2.4: an empty INFORMATIONAL request; no answer after the retries fails the SA."""
        self._queue_request("dpd", ExchangeType.INFORMATIONAL, now)
        return self._flush()

    def _build_dpd(self, req, now):
        return []

    def _on_dpd_response(self, m, req, now) -> None:
        pass

    def delete_child(self, spi_in: int, now: float) -> list:
        if spi_in not in self.children:
            raise UsageError(f"no child SA with inbound SPI {spi_in:08x}")
        self._queue_request("delete_child", ExchangeType.INFORMATIONAL, now, spis=[spi_in])
        return self._flush()

    def _build_delete_child(self, req, now):
        spis = [s for s in req.ctx["spis"] if s in self.children]
        if not spis:
            return None
        req.ctx["spis"] = spis
        return [DeletePayload(ProtocolId.ESP, tuple(s.to_bytes(4, "big") for s in spis))]

    def _on_delete_child_response(self, m, req, now) -> None:
        for spi in req.ctx["spis"]:
            child = self.children.pop(spi, None)
            self._child_rekey_at.pop(spi, None)
            self._collisions.pop(spi, None)
            if child is not None:
                self._out.append(ChildSaDeleted(self, child))

    def delete(self, now: float) -> list:
        """Delete this IKE SA and its children (§1.4.1)."""
        if self.state in (State.ESTABLISHED, State.REKEYED):
            self._queue.clear()            # what is in flight completes first (message IDs)
            self._queue_request("delete_ike", ExchangeType.INFORMATIONAL, now)
        elif self.state != State.CLOSED:
            self._close(IkeSaDeleted(self, "deleted before it was established"))
        return self._flush()

    def _build_delete_ike(self, req, now):
        if self.state != State.DELETING:
            self._goto(State.DELETING)
        return [DeletePayload(ProtocolId.IKE)]

    def _on_delete_ike_response(self, m, req, now) -> None:
        self._delete_all_children()
        self._close(IkeSaDeleted(self, "deleted by us"))

    def abandon(self, reason: str) -> list:
        """Forget this SA and its children without telling the peer (it told us they are gone:
        INITIAL_CONTACT, §2.4; or the path is gone and a new IKE SA replaces it)."""
        if self.state != State.CLOSED:
            self._delete_all_children()
            self._close(IkeSaDeleted(self, reason))
        return self._flush()

    def _delete_all_children(self) -> None:
        for child in list(self.children.values()):
            self._out.append(ChildSaDeleted(self, child))
        self.children.clear()
        self._child_rekey_at.clear()

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
        self._queue_request("mobike", ExchangeType.INFORMATIONAL, now)
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

    def _build_mobike(self, req, now):
        req.ctx["local"], req.ctx["remote"] = self.local, self.remote
        return [NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES),
                NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP,
                              self._random(20) if self.config.force_encap
                              else nat_hash(self.spi_i, self.spi_r, self.local)),
                NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                              nat_hash(self.spi_i, self.spi_r, self.remote))]

    def _on_mobike_response(self, m, req, now) -> None:
        self._nat_detect(m, req.ctx["local"], req.ctx["remote"], request=False)
        self._rebind_children(now)

    def _rebind_children(self, now: float, explicit: bool = True) -> None:
        """The outer addresses moved (MOBIKE, a NAT re-mapping): children follow in place.  A
        child whose encapsulation must change (a NAT appeared or went away) cannot be moved
        (its ESP SAs keep their sequence and nonce state), so it is re-keyed instead, as
        strongSwan's kernel-libipsec does."""
        for spi, ch in list(self.children.items()):
            if ch.udp_encap != self.encap:
                self.children[spi] = replace(ch, local_address=self.local[0],
                                             remote_address=self.remote[0])
                self._queue.append(_Request("rekey_child", ExchangeType.CREATE_CHILD_SA,
                                            {"old": spi}))
                continue
            self.children[spi] = replace(ch, local_address=self.local[0],
                                         remote_address=self.remote[0],
                                         local_port=self.local[1] if self.encap else 4500,
                                         remote_port=self.remote[1] if self.encap else 4500)
        self._out.append(PeerAddressChanged(self, self.local, self.remote, explicit))

    def _on_informational_request(self, m: Message, local, remote, now) -> None:
        out: list = []
        deletes = [d for d in m.payloads if isinstance(d, DeletePayload)]
        if any(d.protocol == ProtocolId.IKE for d in deletes):
            self._respond(m, [], local, remote, now)          # §1.4.1: empty answer
            self._mid_in += 1
            self._delete_all_children()
            self._close(IkeSaDeleted(self, "deleted by the peer"))
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
            self._out.append(ChildSaDeleted(self, child))
        if moved:
            self._rebind_children(now)


# --- helpers ------------------------------------------------------------------------------------

def _marker(local: Address) -> bytes:
    """RFC 3948 §2.2: IKE from our NAT-T socket (anything but port 500) carries the marker."""
    return b"" if local[1] == 500 else NON_ESP_MARKER


def _narrow(offered: tuple[TrafficSelector, ...], ours: tuple[TrafficSelector, ...]
            ) -> tuple[TrafficSelector, ...] | None:
    """§2.9: the intersection of the peer's selectors with our policy (first one that fits)."""
    for want in offered:
        for have in ours:
            got = want.intersect(have)
            if got is not None:
                return (got,)
    return None


def _within(answer: tuple[TrafficSelector, ...], offered: tuple[TrafficSelector, ...]) -> bool:
    """Initiator: every narrowed selector lies within one we offered (§2.9)."""
    return bool(answer) and all(any(o.contains(a) for o in offered) for a in answer)


def _notify_name(t: int) -> str:
    try:
        return NotifyType(t).name
    except ValueError:
        return str(t)
