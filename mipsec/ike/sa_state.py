"""What every part of an IKE SA shares: its states, the request kinds and their typed state.

``State`` and its tables are the IKE SA's state machine (``IkeSa`` moves only along
``TRANSITIONS`` and answers / starts only the exchanges ``ACCEPTS_REQUEST`` / ``MAY_REQUEST``
name for its state).  Each of our requests is a ``Request`` of one ``Kind``; what that exchange
needs to remember between sending and the answer is the request's ``state``, one dataclass per
kind (``InitState`` ... ``MobikeState``).  ``mipsec.ike.sa.REQUEST_KINDS`` maps each kind to its
exchange type, the function that builds it and the one that takes its response.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
from dataclasses import dataclass

from mipsec.drops import DropReason
from mipsec.ike.codec import TrafficSelector
from mipsec.ike.config import Address
from mipsec.ike.constants import NON_ESP_MARKER, ExchangeType, NotifyType
from mipsec.ike.crypto import DhPrivate, IkeSuite


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
del S


# --- our requests ---------------------------------------------------------------------------

class Kind(enum.Enum):
    """The kinds of request we send (the value names it in logs and failure reasons)."""
    INIT = "init"                   # IKE_SA_INIT (§1.2)
    AUTH = "auth"                   # IKE_AUTH (§1.2)
    CHILD = "rekey_child"           # CREATE_CHILD_SA: a new child or a child re-key (§1.3)
    REKEY_IKE = "rekey_ike"         # CREATE_CHILD_SA: an IKE SA re-key (§1.3.2)
    DPD = "dpd"                     # INFORMATIONAL, empty: a liveness check (§2.4)
    DELETE_CHILD = "delete_child"   # INFORMATIONAL, Delete ESP (§1.4.1)
    DELETE_IKE = "delete_ike"       # INFORMATIONAL, Delete IKE (§1.4.1)
    MOBIKE = "mobike"               # INFORMATIONAL, UPDATE_SA_ADDRESSES (RFC 4555 §3.5)


@dataclass
class InitState:
    cookies: int = 0                 # COOKIE rounds so far (§2.6: at most 2)
    refused: str | None = None       # an unprotected error notification seen meanwhile


@dataclass
class AuthState:
    spi_in: int                      # the inbound ESP SPI offered for the first child


@dataclass
class ChildState:
    old: int | None                  # inbound SPI of the child re-keyed (None: a new child)
    local_ts: tuple[TrafficSelector, ...] | None = None    # asked for (None: policy / old)
    remote_ts: tuple[TrafficSelector, ...] | None = None
    spi_in: int | None = None        # set when built: our new inbound SPI ...
    ni: bytes = b""                  # ... our nonce, our PFS value, the selectors offered
    dh: DhPrivate | None = None
    lts: tuple[TrafficSelector, ...] = ()
    rts: tuple[TrafficSelector, ...] = ()


@dataclass
class RekeyIkeState:
    spi: bytes = b""                 # set when built: the new IKE SA's SPI, nonce, DH value
    ni: bytes = b""
    dh: DhPrivate | None = None
    suites: tuple[IkeSuite, ...] = ()


@dataclass
class DpdState:
    pass


@dataclass
class DeleteChildState:
    spis: list[int]                  # our inbound SPIs of the children to delete


@dataclass
class DeleteIkeState:
    pass


@dataclass
class MobikeState:
    local: Address | None = None     # set when built: the addresses the update was sent from/to
    remote: Address | None = None


RequestState = (InitState | AuthState | ChildState | RekeyIkeState | DpdState | DeleteChildState
                | DeleteIkeState | MobikeState)


@dataclass
class Request:
    """One of our requests, queued or in flight."""
    kind: Kind
    exchange: int
    state: RequestState
    mid: int = -1
    raw: bytes = b""
    local: Address = ("", 0)
    remote: Address = ("", 0)
    tries: int = 0
    next_at: float = 0.0


@dataclass
class Handshake:
    """What IKE_SA_INIT leaves for IKE_AUTH (§2.15 signs both INIT messages) and for its own
    retries: our Diffie-Hellman value, the suites we offered, the two messages."""
    dh: DhPrivate | None = None
    offered: tuple[IkeSuite, ...] = ()
    init_request: bytes = b""        # RealMessage1, as last sent / received
    init_response: bytes = b""       # RealMessage2


@dataclass(frozen=True)
class CachedResponse:
    """The peer's last request we answered and our answer (§2.1: a retransmission of that
    request, byte for byte, gets the same answer again)."""
    mid: int
    request: bytes
    response: bytes
    remote: Address


@dataclass
class Collision:
    """§2.8.1: both ends re-keyed one child: (Ni, Nr, new child's inbound SPI) of each side's
    exchange, until both are known."""
    ours: tuple[bytes, bytes, int] | None = None
    theirs: tuple[bytes, bytes, int] | None = None


class Refused(Exception):
    """An authenticated request we answer with an error notification."""

    def __init__(self, notify: int, reason: DropReason, data: bytes = b""):
        super().__init__(notify)
        self.notify, self.reason, self.data = notify, reason, data


# --- helpers ------------------------------------------------------------------------------------

def nat_hash(spi_i: bytes, spi_r: bytes, address: Address) -> bytes:
    """§2.23: SHA-1(SPIi | SPIr | IP | Port)."""
    return hashlib.sha1(spi_i + spi_r + ipaddress.IPv4Address(address[0]).packed
                        + address[1].to_bytes(2, "big")).digest()


def marker(local: Address) -> bytes:
    """RFC 3948 §2.2: IKE from our NAT-T socket (anything but port 500) carries the marker."""
    return b"" if local[1] == 500 else NON_ESP_MARKER


def narrow(offered: tuple[TrafficSelector, ...], ours: tuple[TrafficSelector, ...]
           ) -> tuple[TrafficSelector, ...] | None:
    """§2.9: the intersection of the peer's selectors with our policy (first one that fits)."""
    for want in offered:
        for have in ours:
            got = want.intersect(have)
            if got is not None:
                return (got,)
    return None


def within(answer: tuple[TrafficSelector, ...], offered: tuple[TrafficSelector, ...]) -> bool:
    """Initiator: every narrowed selector lies within one we offered (§2.9)."""
    return bool(answer) and all(any(o.contains(a) for o in offered) for a in answer)


def notify_name(t: int) -> str:
    try:
        return NotifyType(t).name
    except ValueError:
        return str(t)
