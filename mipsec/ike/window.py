"""The part of an IKE SA every exchange builds on: its state, the message window and the
retransmission of our requests (RFC 7296 §2.1-§2.3), and the child SA bookkeeping the exchanges
share.

``MessageWindow`` holds everything an ``IkeSa`` knows (the exchange modules add behaviour, not
state) and:

* sends our requests one at a time (our window size is 1, §2.3): ``_queue_request`` queues a
  ``Request`` of one ``Kind`` with its typed state, ``_pump`` builds the next one with the
  function ``REQUEST_KINDS`` names for its kind and protects it, ``_retransmit`` re-sends the
  one in flight with a back-off and fails the SA after ``RETRANSMIT_TRIES``;
* takes responses: only for the request in flight, same message ID and exchange type, then the
  kind's response function (``_receive_response``);
* takes requests: the next message ID only (the one before is answered from the cached
  response when it is byte-for-byte a retransmission, §2.1), only exchanges ``ACCEPTS_REQUEST``
  allows in the state, then the exchange's handler from ``REQUEST_HANDLERS``
  (``_receive_request``).

Messages are decrypted and checked here before any handler runs; a refused message is counted
in ``drops`` and changes nothing.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.ike import codec
from mipsec.ike import proposals as P
from mipsec.ike.child import ChildSa, split_keymat
from mipsec.ike.codec import Header, Message, NotifyPayload, SaPayload, TsPayload
from mipsec.ike.config import Address, IkeConfig
from mipsec.ike.constants import (
    HALF_OPEN_TIMEOUT_S,
    RETRANSMIT_INITIAL_S,
    RETRANSMIT_TRIES,
    SETUP_RETRANSMIT_MAX_S,
    ExchangeType,
    Flag,
    NotifyType,
    PayloadType,
)
from mipsec.ike.crypto import DhPrivate, IkeKeys, IkeSuite, SkCipher, child_keymat, derive_ike_keys
from mipsec.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    IkeSaFailed,
    IkeSaId,
    PeerAddressChanged,
    SendDatagram,
)
from mipsec.ike.sa_state import (
    ACCEPTS_REQUEST,
    MAY_REQUEST,
    TRANSITIONS,
    CachedResponse,
    ChildState,
    Collision,
    Handshake,
    InitState,
    Kind,
    Refused,
    Request,
    RequestState,
    State,
    marker,
    narrow,
    nat_hash,
)

Random = Callable[[int], bytes]
# a peer's request of one exchange type: (sa, message, local, remote, now); IKE_AUTH's returns
# the outputs itself, the others leave them in the SA's output list
RequestHandler = Callable[[Any, Message, Address, Address, float], "list[Any] | None"]


@dataclass(frozen=True)
class RequestKind:
    """How one kind of our requests is sent and answered (``mipsec.ike.sa.REQUEST_KINDS``).

    ``build(sa, request, now)`` returns its payloads (None: nothing to send any more, e.g. the
    child was deleted meanwhile); ``on_response(sa, message, request, now)`` takes the
    decrypted answer after the window moved on.  IKE_SA_INIT and IKE_AUTH are sent by the
    set-up code itself (``build`` None) and ``on_setup_response(sa, message, request, local,
    remote, now)`` returns the outputs (the window moves as the set-up decides)."""
    exchange: int
    build: Callable[[Any, Request, float], list[Any] | None] | None = None
    on_response: Callable[[Any, Message, Request, float], None] | None = None
    on_setup_response: Callable[[Any, Message, Request, Address, Address, float],
                                list[Any]] | None = None


class MessageWindow:
    """An IKE SA's state, message window and retransmission; see the module docstring."""

    REQUEST_KINDS: ClassVar[Mapping[Kind, RequestKind]] = {}
    REQUEST_HANDLERS: ClassVar[Mapping[int, RequestHandler]] = {}


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
        self.handshake = Handshake()      # IKE_SA_INIT's DH value, offer and messages
        self.peer_id: str | None = None
        self.peer_mobike = False
        self.nat_local = False            # we are behind a NAT (§2.23)
        self.nat_remote = False           # the peer is behind a NAT
        self.children: dict[int, ChildSa] = {}     # by our inbound SPI
        self._child_rekey_at: dict[int, float] = {}
        # §2.8.1 collisions: old child SPI -> both sides' (Ni, Nr, new child SPI)
        self._collisions: dict[int, Collision] = {}
        self._mid_out = 0
        self._mid_in = 0
        self._pending: Request | None = None
        self._queue: deque[Request] = deque()
        self._cached: CachedResponse | None = None
        self._out: list = []
        self.created = now
        self.established_at: float | None = None
        self.last_heard = now
        self._last_sent = now
        self._rekey_at: float | None = None
        self._closing_at: float | None = None if initiator else now + HALF_OPEN_TIMEOUT_S
        self.successor: MessageWindow | None = None
        self.initial_contact = False      # the peer said it has no other IKE SA with us (§2.4)

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
        data = marker(local) + msg
        self._out.append(SendDatagram(data, local, remote))
        self._last_sent = now

    @property
    def ike_id(self) -> IkeSaId:
        """The SPI we chose: what the endpoint and the events name this SA by (§2.1)."""
        return self.spi_i if self.initiator else self.spi_r

    # --- events: plain data, never this object (``mipsec.ike.events``) -------------------------

    def _child_established(self, child: ChildSa) -> None:
        self._out.append(ChildSaEstablished(self.ike_id, self.peer_id or "", self.local,
                                            self.remote, child))

    def _child_rekeyed(self, old: ChildSa | None, new: ChildSa, send_on_new: bool = True) -> None:
        self._out.append(ChildSaRekeyed(self.ike_id, self.peer_id or "", self.local, self.remote,
                                        old, new, send_on_new))

    def _child_deleted(self, child: ChildSa) -> None:
        self._out.append(ChildSaDeleted(self.ike_id, self.peer_id or "", child))

    def _close(self, ended: type[IkeSaDeleted] | type[IkeSaFailed], reason: str) -> None:
        if self.children:
            # §1.4.1: child SAs never outlive their IKE SA, however it ends (a failed liveness
            # check or exchange too): each is reported deleted before the IKE SA's own event
            self._delete_all_children()
        if self.state != State.CLOSED:
            self._goto(State.CLOSED)
        p = self._pending
        if p is not None and isinstance(p.state, ChildState) and p.state.spi_in is not None:
            self._release_esp_spi(p.state.spi_in)   # that child never came
        self._pending = None
        self._queue.clear()
        self._out.append(ended(self.ike_id, self.name, self.peer_id or "", self.remote, reason))

    # --- keys: what exists only once IKE_SA_INIT has run (the state machine guarantees it) ---

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
        if self.handshake.dh is None:
            raise UsageError(f"IKE SA in state {self.state}: no DH value")
        return self.handshake.dh

    def _in_flight(self) -> Request:
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

    # --- NAT detection (§2.23): IKE_SA_INIT and MOBIKE updates carry it --------------------------

    def _nat_detect(self, m: Message, local: Address, remote: Address, request: bool) -> None:
        src = [n.data for n in m.notifies(NotifyType.NAT_DETECTION_SOURCE_IP)]
        dst = [n.data for n in m.notifies(NotifyType.NAT_DETECTION_DESTINATION_IP)]
        spi_r = bytes(8) if request else self.spi_r
        if src:
            self.nat_remote = nat_hash(self.spi_i, spi_r, remote) not in src
        if dst:
            self.nat_local = nat_hash(self.spi_i, spi_r, local) not in dst

    # --- IKE_AUTH (§1.2, §2.15) as initiator ----------------------------------------------------


    # --- child SAs (IKE_AUTH and CREATE_CHILD_SA make them, INFORMATIONAL ends or moves them) ---

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

    def _negotiate_child(self, m: Message, dh_group: int | None, ni: bytes, nr: bytes,
                         shared: bytes | None, now: float) -> tuple[ChildSa, list]:
        """Responder side of child SA negotiation (IKE_AUTH or CREATE_CHILD_SA).  Raises
        _Refused before anything changes."""
        c = self.config
        sa, tsi, tsr = m.find(SaPayload), m.find(TsPayload, PayloadType.TSi), \
            m.find(TsPayload, PayloadType.TSr)
        if sa is None or tsi is None or tsr is None:
            raise Refused(NotifyType.INVALID_SYNTAX, DropReason.MALFORMED)
        chosen = P.choose_esp(sa.proposals, c.esp_suites, dh_group)
        if chosen is None:
            raise Refused(NotifyType.NO_PROPOSAL_CHOSEN, DropReason.IKE_NO_PROPOSAL_CHOSEN)
        peer_prop, suite = chosen
        # §2.9: narrow; the initiator's TSi is our remote side
        remote_ts = narrow(tsi.selectors, c.remote_ts)
        local_ts = narrow(tsr.selectors, c.local_ts)
        if remote_ts is None or local_ts is None:
            raise Refused(NotifyType.TS_UNACCEPTABLE, DropReason.SELECTOR_MISMATCH)
        spi_in = self._alloc_esp_spi()
        keymat = child_keymat(*self._prf_sk_d(), ni, nr,
                              2 * sum(suite.keymat_lengths()), shared)
        child = self._make_child(spi_in, peer_prop.spi, suite, split_keymat(keymat, suite, False),
                                 local_ts, remote_ts, now)
        answer = [SaPayload((P.esp_answer(peer_prop, suite, spi_in.to_bytes(4, "big")),)),
                  TsPayload(PayloadType.TSi, remote_ts), TsPayload(PayloadType.TSr, local_ts)]
        return child, answer

    def _delete_all_children(self) -> None:
        for child in list(self.children.values()):
            self._child_deleted(child)
        self.children.clear()
        self._child_rekey_at.clear()

    def _rebind_children(self, now: float, explicit: bool = True) -> None:
        """The outer addresses moved (MOBIKE, a NAT re-mapping): children follow in place.  A
        child whose encapsulation must change (a NAT appeared or went away) cannot be moved
        (its ESP SAs keep their sequence and nonce state), so it is re-keyed instead, as
        strongSwan's kernel-libipsec does."""
        for spi, ch in list(self.children.items()):
            if ch.udp_encap != self.encap:
                self.children[spi] = replace(ch, local_address=self.local[0],
                                             remote_address=self.remote[0])
                self._queue.append(self._new_request(Kind.CHILD, ChildState(old=spi)))
                continue
            self.children[spi] = replace(ch, local_address=self.local[0],
                                         remote_address=self.remote[0],
                                         local_port=self.local[1] if self.encap else 4500,
                                         remote_port=self.remote[1] if self.encap else 4500)
        self._out.append(PeerAddressChanged(self.ike_id, self.peer_id or "", self.local, self.remote,
                                             explicit))

    # --- our requests: one in flight (§2.3), retransmitted (§2.1) -------------------------------

    def _header(self, exchange: int, mid: int, response: bool) -> Header:
        flags = (Flag.INITIATOR if self.initiator else 0) | (Flag.RESPONSE if response else 0)
        return Header(self.spi_i, self.spi_r, exchange, flags, mid)

    def _new_request(self, kind: Kind, state: RequestState) -> Request:
        return Request(kind, self.REQUEST_KINDS[kind].exchange, state)

    def _queue_request(self, kind: Kind, state: RequestState, now: float) -> None:
        self._queue.append(self._new_request(kind, state))
        self._pump(now)

    def _pump(self, now: float) -> None:
        """Send the next queued request if none is in flight (window size 1, §2.3)."""
        while self._pending is None and self._queue:
            req = self._queue.popleft()
            if req.exchange not in MAY_REQUEST.get(self.state, ()):
                continue                               # e.g. a re-key queued before a Delete
            build = self.REQUEST_KINDS[req.kind].build
            payloads = build(self, req, now) if build is not None else None
            if payloads is None:
                continue
            req.mid = self._mid_out
            req.raw = self._sk_out.protect(self._header(req.exchange, req.mid, False), payloads)
            self._send_pending(req, now)

    def _send_pending(self, req: Request, now: float) -> None:
        req.local, req.remote = self.local, self.remote
        req.tries = 0
        req.next_at = now + RETRANSMIT_INITIAL_S
        self._pending = req
        self._emit_datagram(req.raw, req.local, req.remote, now)

    def _retransmit(self, now: float) -> bool:
        """Re-send the request in flight if its time came (§2.1: backing off); False when it
        was tried ``RETRANSMIT_TRIES`` times: the SA failed (closed, event queued)."""
        p = self._pending
        if p is None or now < p.next_at:
            return True
        if p.tries + 1 >= RETRANSMIT_TRIES:
            refused = p.state.refused if isinstance(p.state, InitState) else None
            why = (f"IKE_SA_INIT refused: {refused}" if refused
                   else f"no response to {p.kind.value} after {p.tries + 1} tries")
            self._close(IkeSaFailed, why)
            return False
        p.tries += 1
        interval = RETRANSMIT_INITIAL_S * (2 ** p.tries)             # §2.1: back off
        if self.state in (State.INIT_SENT, State.AUTH_SENT):
            # setting up: the peer is probably coming back (a restart); the caller backs
            # off between whole attempts instead
            interval = min(interval, SETUP_RETRANSMIT_MAX_S)
        p.next_at = now + interval
        self._emit_datagram(p.raw, p.local, p.remote, now)
        return True

    def _respond(self, request: Message, payloads, local: Address, remote: Address,
                 now: float) -> None:
        h = self._header(request.header.exchange, request.header.message_id, True)
        raw = self._sk_out.protect(h, list(payloads))
        self._cached = CachedResponse(request.header.message_id, request.raw, raw, remote)
        self._emit_datagram(raw, local, remote, now)

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
        kind = self.REQUEST_KINDS[p.kind]
        if p.kind is Kind.INIT:
            if h.spi_i != self.spi_i:
                return self._drop(DropReason.IKE_UNKNOWN_SA)
            if m.encrypted is not None:
                return self._drop(DropReason.MALFORMED)
            assert kind.on_setup_response is not None
            return kind.on_setup_response(self, m, p, local, remote, now)
        if h.spi_r != self.spi_r:
            return self._drop(DropReason.IKE_UNKNOWN_SA)
        try:
            m = replace(m, payloads=m.payloads + self._sk_in.open(m))
        except ParseError as e:
            return self._drop(e.reason)
        self.last_heard = now
        if kind.on_setup_response is not None:
            return kind.on_setup_response(self, m, p, local, remote, now)
        self._pending = None
        self._mid_out += 1
        if kind.on_response is not None:
            kind.on_response(self, m, p, now)
        self._pump(now)
        return self._flush()

    def _receive_request(self, m: Message, local, remote, now) -> list:
        h = m.header
        if h.spi_r != self.spi_r:
            return self._drop(DropReason.IKE_UNKNOWN_SA)
        if self._cached is not None and h.message_id == self._cached.mid:
            if m.raw == self._cached.request:
                # §2.1: a retransmitted request gets the same response again
                self.drops[DropReason.IKE_RETRANSMISSION] += 1
                self._emit_datagram(self._cached.response, local, remote, now)
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
        handler = self.REQUEST_HANDLERS[h.exchange]
        if h.exchange == ExchangeType.IKE_AUTH:
            out = handler(self, m, local, remote, now)
            return out if out is not None else self._flush()
        if self.nat_remote and remote != self.remote \
                and not m.notifies(NotifyType.UPDATE_SA_ADDRESSES):
            # §2.23: the peer is behind a NAT whose mapping changed: follow the address of the
            # latest authenticated request, and move the children's ESP with it
            self.local, self.remote = local, remote
            self._rebind_children(now, explicit=False)
        handler(self, m, local, remote, now)
        self._pump(now)
        return self._flush()
