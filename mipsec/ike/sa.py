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

The SA is assembled from one module per concern, each a class on ``MessageWindow``:

* ``mipsec.ike.window``: the SA's state, the message window and retransmission (§2.1-§2.3),
  the child SA bookkeeping the exchanges share;
* ``mipsec.ike.establish``: IKE_SA_INIT and IKE_AUTH (§1.2, §2.15);
* ``mipsec.ike.create_child``: CREATE_CHILD_SA, children and the IKE SA's re-key (§1.3, §2.8);
* ``mipsec.ike.informational``: INFORMATIONAL: liveness, Deletes, MOBIKE (§1.4, RFC 4555);
* ``mipsec.ike.sa_state``: the states, the request kinds and their typed state.

Dispatch is by two tables here: ``REQUEST_KINDS`` (each kind of our requests: its exchange, the
function that builds it, the one that takes its answer) and ``REQUEST_HANDLERS`` (the peer's
requests by exchange type).

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

import os
from collections.abc import Mapping
from typing import Any

from mipsec.ike.config import Address, IkeConfig
from mipsec.ike.constants import NAT_KEEPALIVE, ExchangeType
from mipsec.ike.create_child import CreateChild
from mipsec.ike.establish import Establish
from mipsec.ike.events import IkeSaDeleted, IkeSaFailed, SendDatagram
from mipsec.ike.informational import Informational
from mipsec.ike.sa_state import (
    ACCEPTS_REQUEST,
    MAY_REQUEST,
    TRANSITIONS,
    Kind,
    State,
    nat_hash,
)
from mipsec.ike.window import Random, RequestHandler, RequestKind

__all__ = ["ACCEPTS_REQUEST", "MAY_REQUEST", "REQUEST_HANDLERS", "REQUEST_KINDS", "TRANSITIONS",
           "IkeSa", "State", "nat_hash"]

# Our requests: kind -> its exchange, how it is built, how its answer is taken.
REQUEST_KINDS: Mapping[Kind, RequestKind] = {
    Kind.INIT: RequestKind(ExchangeType.IKE_SA_INIT,
                           on_setup_response=Establish._on_init_response),
    Kind.AUTH: RequestKind(ExchangeType.IKE_AUTH, on_setup_response=Establish._on_auth_response),
    Kind.CHILD: RequestKind(ExchangeType.CREATE_CHILD_SA, CreateChild._build_rekey_child,
                            CreateChild._on_rekey_child_response),
    Kind.REKEY_IKE: RequestKind(ExchangeType.CREATE_CHILD_SA, CreateChild._build_rekey_ike,
                                CreateChild._on_rekey_ike_response),
    Kind.DPD: RequestKind(ExchangeType.INFORMATIONAL, Informational._build_dpd,
                          Informational._on_dpd_response),
    Kind.DELETE_CHILD: RequestKind(ExchangeType.INFORMATIONAL, Informational._build_delete_child,
                                   Informational._on_delete_child_response),
    Kind.DELETE_IKE: RequestKind(ExchangeType.INFORMATIONAL, Informational._build_delete_ike,
                                 Informational._on_delete_ike_response),
    Kind.MOBIKE: RequestKind(ExchangeType.INFORMATIONAL, Informational._build_mobike,
                             Informational._on_mobike_response),
}
# The peer's requests, by exchange type (ACCEPTS_REQUEST says which ones each state takes;
# IKE_SA_INIT creates the SA: ``IkeSa.respond_init``, called by the endpoint).
REQUEST_HANDLERS: Mapping[int, RequestHandler] = {
    ExchangeType.IKE_AUTH: Establish._on_auth_request,
    ExchangeType.CREATE_CHILD_SA: CreateChild._on_create_child_request,
    ExchangeType.INFORMATIONAL: Informational._on_informational_request,
}


class IkeSa(Establish, CreateChild, Informational):
    """One IKE SA; see the module docstring.  Create with ``IkeSa.new_initiator(...)`` or let
    ``IkeEndpoint`` create responders (``IkeSa.respond_init``)."""

    REQUEST_KINDS = REQUEST_KINDS
    REQUEST_HANDLERS = REQUEST_HANDLERS

    @classmethod
    def new_initiator(cls, config: IkeConfig, local: Address, remote: Address, *, now: float,
                      random: Random = os.urandom, **kw) -> IkeSa:
        spi = b""
        while not any(spi):
            spi = random(8)
        return cls(config, initiator=True, local=local, remote=remote, spi_i=spi,
                   spi_r=bytes(8), random=random, now=now, **kw)

    def status(self) -> dict[str, Any]:
        return {"spi_i": self.spi_i.hex(), "spi_r": self.spi_r.hex(), "state": self.state.value,
                "initiator": self.initiator, "peer_id": self.peer_id,
                "local": f"{self.local[0]}:{self.local[1]}",
                "remote": f"{self.remote[0]}:{self.remote[1]}",
                "nat_local": self.nat_local, "nat_remote": self.nat_remote,
                "mobike": self.peer_mobike and self.config.mobike,
                "children": [c.describe() for c in self.children.values()],
                "established_time": self.established_at,
                "drops": {str(k): v for k, v in self.drops.items() if v}}

    # --- timers -----------------------------------------------------------------------------------

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
        if not self._retransmit(now):
            return self._flush()
        if self._closing_at is not None and now >= self._closing_at \
                and self.state == State.INIT_ANSWERED:     # (an initiator's retries end it)
            self._close(IkeSaFailed, "half-open IKE SA timed out")
            return self._flush()
        if self._closing_at is not None and now >= self._closing_at \
                and self.state == State.REKEYED and self._pending is None:
            # §2.18: the peer re-keyed but never deleted this one; it carries nothing any more
            self._close(IkeSaDeleted, "superseded by its re-key")
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
