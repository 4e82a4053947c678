"""The mobile node's registration machine (the MN's side of the patent's Fig. 3).

Theory of operation
-------------------
While away the MN registers its care-of address (CoA) with its home agent through the ESP tunnel
(RFC 5944 §3.6): a Registration Request inside the SA pair it re-pointed at the new CoA (keys,
sequence numbers and replay windows kept), retransmitted with a capped back-off and a new
identification each time (RFC 5944 §5.7) until the HA's reply arrives, forwarded by the GW.
Unanswered transmissions mean the tunnel itself may be what fails.  With IKEv2 the MN knows the
GW's outbound SA points at its CoA when IKE installed the pair from there (the GW binds a new
pair to where its IKE_AUTH came from) or the HA accepted that CoA (``gw_points_at``); after a
move it does not (the reply travels in the HA's SIU, and with that path down nothing re-points
the old pair).  So ``IKE_FALLBACK_ATTEMPTS`` (at most ``max_attempts``) unanswered transmissions
through a pair that may point elsewhere are ``NO_REPLY_ROUND``: the MN re-establishes
(``Do.REESTABLISH``, the patent's fallback: a new tunnel that does not rely on the SIU) and
registers again through it.  A round of ``max_attempts`` unanswered through a pair that points
here is ``NO_REPLY_HERE``: the MN checks the GW (``Do.CHECK_GW``, an IKE liveness check beside
the next request); a silent GW is ``PEER_SILENT`` (re-establish), an answering one means the HA's
reply is what is missing: logged once per CoA and backed off from, never a new IKE SA per round.
At home it deregisters directly with the HA, outside the tunnel (RFC 5944 §3.6.1.1), and only
the HA's authenticated reply takes traffic out of the tunnel.

``TRANSITIONS`` is the logic: ``Registration.fire`` looks ``(state, event)`` up, moves and
returns the one effect (``Do``) the role carries out (``MobileNode._effects``); any other pair is
refused (``IllegalTransition``) and changes nothing.  ``Registration`` owns every piece of state
the machine works on: the outstanding request (identifications sent and when, attempts, the
retransmission deadline, whether this round got any reply, the last refusal), the accepted
registration (lifetime, renewal time), the old CoA kept during make-before-break and the home
link of a deregistration.  The role owns the SAs, IKE and the timers' other users.
"""

from __future__ import annotations

import enum
from typing import Any

from mipsec.errors import UsageError
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.mobility.machine import Machine
from mipsec.wire.mip import RegistrationReply, RegistrationRequest, ReplyCode, RequestFlags

SENT_IDS_KEPT = 16           # transmissions of one request whose reply we still accept
IKE_FALLBACK_ATTEMPTS = 3    # IKEv2: unanswered through SAs the GW may point elsewhere (at most
                             # max_attempts, 1.4 s at the timer's 0.2 s floor), then a new tunnel


def reply_code_name(code: int | None) -> str:
    if code is None:
        return "no code"
    try:
        return ReplyCode(code).name.lower().replace("_", " ")
    except ValueError:
        return "unknown code"



class RegState(enum.Enum):
    IDLE = "idle"                      # no care-of address, not known to be at home
    AWAITING_SAS = "awaiting-sas"      # away, no usable SA pair: IKEv2 is (re)negotiating one
    REGISTERING = "registering"        # an RRQ is outstanding (new CoA, renewal, retry)
    REGISTERED = "registered"          # the HA accepted our current CoA
    DETACHED = "detached"              # away, but the care-of address is gone: nothing is sent
    DEREGISTERING = "deregistering"    # on the home link, waiting for the HA's direct reply
    AT_HOME = "at-home"                # the HA confirmed: deregistered, on the home link


class RegEvent(enum.Enum):
    MOVED = "moved"                    # a new care-of address, with an SA pair in hand
    MOVED_WITHOUT_SAS = "moved-without-sas"   # a new care-of address, no SA pair (IKEv2)
    LOST_ADDRESS = "lost-address"      # CareOfAddressChanged(None): the care-of address went
    RETURNED_HOME = "returned-home"    # ReturnedHome (from the home interface)
    ACCEPTED = "accepted"              # an authenticated accepting RRP for an outstanding RRQ
    DENIED = "denied"                  # an authenticated refusal (not 133): keep backing off
    RESYNC = "resync"                  # an authenticated 133: clock adopted, send again now
    TIMED_OUT = "timed-out"            # no reply within the retransmission timer
    NO_REPLY_ROUND = "no-reply-round"  # IKEv2: unanswered through SAs the GW may point elsewhere
    NO_REPLY_HERE = "no-reply-here"    # IKEv2: a round unanswered through SAs that point here
    RENEW_DUE = "renew-due"            # renew_fraction of the granted lifetime passed
    SAS_INSTALLED = "sas-installed"    # a new SA pair (IKEv2 child SA)
    SAS_LOST = "sas-lost"              # the IKE SA we used ended (its children with it)
    IKE_RETRY_DUE = "ike-retry-due"    # the back-off after a failed IKE SA ran out
    LIVENESS_DUE = "liveness-due"      # sending but nothing received: re-register (manual keys)
    PEER_SILENT = "peer-silent"        # IKEv2: the GW did not answer a liveness check


class Do(enum.Enum):
    """What a transition does (``MobileNode._effects``); the table names one per transition."""
    NOTHING = "nothing"
    SEND_NEW = "send-new"              # a new request: fresh back-off, send now
    SEND_AGAIN = "send-again"          # the same request again, now (back-off continues)
    HOLD = "hold"                      # a refusal: log it, the back-off timer stays armed
    CONFIRM = "confirm"                # registered: renewal timer, pin make-before-break
    CHECK_GW = "check-gw"              # IKEv2: a liveness check of the GW, and send again
    LEAVE_TUNNEL = "leave-tunnel"      # home confirmed: UseHomeLink
    NEGOTIATE = "negotiate"            # IKEv2 from the current CoA (a move: fresh back-off)
    REESTABLISH = "reestablish"        # IKEv2 anew (INITIAL_CONTACT), back-off continues
    RETRY_IKE = "retry-ike"            # arm the IKEv2 back-off timer (the IKE SA ended)
    START_IKE = "start-ike"            # IKEv2 from the current CoA, back-off continues
    FORGET = "forget"                  # no address: no request, no timers
    PAUSE = "pause"                    # the CoA went: stop sending, keep SAs and registration


# The table is the logic (h11 style): ``Registration.fire`` looks (state, event) up and takes the
# transition; the role runs the one effect it names (``MobileNode._effects``); a pair that is not
# here is refused with IllegalTransition and changes nothing (tests/unit/test_mn_table.py enumerates
# both).  No state is terminal while the configuration is valid: from every state a move or a return home
# leads on, and an unanswered request is retried for ever with a capped back-off.
S, E = RegState, RegEvent
_AWAY_MOVES = {
    (E.MOVED, S.REGISTERING, Do.SEND_NEW),
    (E.MOVED_WITHOUT_SAS, S.AWAITING_SAS, Do.NEGOTIATE),
    (E.RETURNED_HOME, S.DEREGISTERING, Do.SEND_NEW),
}
TRANSITIONS: dict[tuple[RegState, RegEvent], tuple[RegState, Do]] = {
    **{(st, ev): (new, do) for st in (S.IDLE, S.AWAITING_SAS, S.REGISTERING, S.REGISTERED,
                                      S.DETACHED, S.DEREGISTERING, S.AT_HOME)
       for ev, new, do in _AWAY_MOVES},
    (S.AT_HOME, E.RETURNED_HOME): (S.AT_HOME, Do.NOTHING),
    # losing the address: nothing can be sent from it (no request, no IKE, no liveness check)
    # until an address is usable again; the binding and the SAs stay (the same or a new CoA
    # registers at once)
    (S.IDLE, E.LOST_ADDRESS): (S.IDLE, Do.NOTHING),
    (S.AWAITING_SAS, E.LOST_ADDRESS): (S.DETACHED, Do.PAUSE),
    (S.REGISTERING, E.LOST_ADDRESS): (S.DETACHED, Do.PAUSE),
    (S.REGISTERED, E.LOST_ADDRESS): (S.DETACHED, Do.PAUSE),
    (S.DETACHED, E.LOST_ADDRESS): (S.DETACHED, Do.NOTHING),
    (S.DETACHED, E.SAS_INSTALLED): (S.DETACHED, Do.NOTHING),
    (S.DETACHED, E.SAS_LOST): (S.DETACHED, Do.NOTHING),
    (S.DEREGISTERING, E.LOST_ADDRESS): (S.DEREGISTERING, Do.NOTHING),  # on the home link
    (S.AT_HOME, E.LOST_ADDRESS): (S.AT_HOME, Do.NOTHING),
    # replies to an outstanding request
    (S.REGISTERING, E.ACCEPTED): (S.REGISTERED, Do.CONFIRM),
    (S.REGISTERING, E.DENIED): (S.REGISTERING, Do.HOLD),
    (S.REGISTERING, E.RESYNC): (S.REGISTERING, Do.SEND_AGAIN),
    (S.DEREGISTERING, E.ACCEPTED): (S.AT_HOME, Do.LEAVE_TUNNEL),
    (S.DEREGISTERING, E.DENIED): (S.DEREGISTERING, Do.HOLD),
    (S.DEREGISTERING, E.RESYNC): (S.DEREGISTERING, Do.SEND_AGAIN),
    # no reply: retransmit for ever with a capped back-off; IKEv2 also renews the tunnel
    (S.REGISTERING, E.TIMED_OUT): (S.REGISTERING, Do.SEND_AGAIN),
    (S.REGISTERING, E.NO_REPLY_ROUND): (S.AWAITING_SAS, Do.REESTABLISH),
    (S.REGISTERING, E.NO_REPLY_HERE): (S.REGISTERING, Do.CHECK_GW),
    (S.DEREGISTERING, E.TIMED_OUT): (S.DEREGISTERING, Do.SEND_AGAIN),
    (S.DEREGISTERING, E.NO_REPLY_ROUND): (S.DEREGISTERING, Do.SEND_AGAIN),  # never a guess
    (S.REGISTERED, E.RENEW_DUE): (S.REGISTERING, Do.SEND_NEW),
    # SA pairs come and go (IKEv2)
    (S.IDLE, E.SAS_INSTALLED): (S.IDLE, Do.NOTHING),
    (S.AWAITING_SAS, E.SAS_INSTALLED): (S.REGISTERING, Do.SEND_AGAIN),
    (S.REGISTERING, E.SAS_INSTALLED): (S.REGISTERING, Do.SEND_AGAIN),
    (S.REGISTERED, E.SAS_INSTALLED): (S.REGISTERING, Do.SEND_NEW),
    (S.DEREGISTERING, E.SAS_INSTALLED): (S.DEREGISTERING, Do.NOTHING),
    (S.AT_HOME, E.SAS_INSTALLED): (S.AT_HOME, Do.NOTHING),
    (S.IDLE, E.SAS_LOST): (S.IDLE, Do.NOTHING),
    (S.AWAITING_SAS, E.SAS_LOST): (S.AWAITING_SAS, Do.RETRY_IKE),
    (S.REGISTERING, E.SAS_LOST): (S.AWAITING_SAS, Do.RETRY_IKE),
    (S.REGISTERED, E.SAS_LOST): (S.AWAITING_SAS, Do.RETRY_IKE),
    (S.DEREGISTERING, E.SAS_LOST): (S.DEREGISTERING, Do.NOTHING),
    (S.AT_HOME, E.SAS_LOST): (S.AT_HOME, Do.NOTHING),
    (S.AWAITING_SAS, E.IKE_RETRY_DUE): (S.AWAITING_SAS, Do.START_IKE),
    # our traffic gets no answer: a GW that restarted lost our binding (manual keys: the
    # registration re-binds it) or our SAs (IKEv2: a fresh IKE SA with INITIAL_CONTACT)
    (S.REGISTERED, E.LIVENESS_DUE): (S.REGISTERING, Do.SEND_NEW),
    (S.REGISTERED, E.PEER_SILENT): (S.AWAITING_SAS, Do.REESTABLISH),
    (S.REGISTERING, E.PEER_SILENT): (S.AWAITING_SAS, Do.REESTABLISH),
}
AWAY = frozenset({S.AWAITING_SAS, S.REGISTERING, S.REGISTERED})
del S, E


class Registration(Machine[RegState, RegEvent, Do]):
    """The MN's registration machine and all of its state (see the module docstring)."""

    __slots__ = ("pending_id", "sent", "attempts", "deadline", "replied", "refused",
                 "refusal_logged", "accepted_reply", "lifetime_granted", "registered_until",
                 "renew_at", "old_care_of_b", "home_link", "gw_points_at", "unanswered_logged")

    def __init__(self, who: str):
        super().__init__(TRANSITIONS, RegState.IDLE, who)
        # the outstanding request: its latest identification, every transmission's send time,
        # how many, the retransmission deadline, whether this round got any reply
        self.pending_id: int | None = None
        self.sent: dict[int, float] = {}
        self.attempts = 0
        self.deadline: float | None = None
        self.replied = False
        self.refused: int | None = None            # the code of the last authenticated refusal
        self.refusal_logged: int | None = None     # ... and the last one logged (once per code)
        self.accepted_reply: RegistrationReply | None = None
        # the accepted registration
        self.lifetime_granted: int | None = None
        self.registered_until: float | None = None
        self.renew_at: float | None = None
        # make-before-break: the old CoA still accepted until the registration is confirmed
        self.old_care_of_b: bytes | None = None
        self.home_link: str | None = None          # where ReturnedHome said the home link is
        # IKEv2: the CoA the GW's outbound SA is known to point at (IKE installed the pair from
        # there, or the HA accepted it); None after a move until one of them happens
        self.gw_points_at: str | None = None
        self.unanswered_logged: str | None = None  # the CoA "the HA's reply is missing" was for

    @property
    def away(self) -> bool:
        return self.state in AWAY

    def new_request(self) -> None:
        """A new request (a move, a renewal): a fresh back-off."""
        self.attempts = 0
        self.sent.clear()
        self.replied = False
        self.refused = None
        self.renew_at = None

    def clear(self) -> None:
        """No request outstanding any more."""
        self.pending_id = self.deadline = None
        self.sent.clear()
        self.attempts = 0
        self.replied = False
        self.refused = self.refusal_logged = None

    def stop_sending(self) -> None:
        """Nothing is sent until the machine moves on (the request stays counted)."""
        self.pending_id = self.deadline = None

    def note_sent(self, ident: int, now: float) -> None:
        self.pending_id = ident
        self.sent[ident] = now
        if len(self.sent) > SENT_IDS_KEPT:
            del self.sent[next(iter(self.sent))]

    def round_over(self, max_attempts: int) -> bool:
        """``max_attempts`` transmissions of this request so far, or a multiple of it."""
        return self.attempts % max_attempts == 0

    def no_reply_event(self, care_of: str, max_attempts: int) -> RegEvent | None:
        """IKEv2, the retransmission timer ran out with no reply this round: the event that
        is (None: just send again).  Through SAs the GW may point elsewhere, give up after
        ``IKE_FALLBACK_ATTEMPTS``; through SAs that point at ``care_of``, check the GW after
        each round of ``max_attempts``."""
        if self.state is not RegState.REGISTERING or self.replied:
            return None
        if (self.gw_points_at != care_of
                and self.attempts >= min(IKE_FALLBACK_ATTEMPTS, max_attempts)):
            return RegEvent.NO_REPLY_ROUND
        if self.round_over(max_attempts):
            return RegEvent.NO_REPLY_HERE
        return None

    def answered_by(self, msa: MobilitySecurityAssociation, reply: RegistrationReply) -> int | None:
        """The identification of the transmission ``reply`` answers (each has its own), or None."""
        if self.pending_id is None:
            return None
        return next((i for i in (self.pending_id, *self.sent) if msa.reply_matches(i, reply)),
                    None)

    def confirm(self, reply: RegistrationReply, now: float, renew_fraction: float,
                care_of: str | None = None) -> None:
        """The HA accepted: the request is done, the renewal is due at ``renew_fraction``; the
        reply came through the GW's SA, which the HA's SIU pointed at ``care_of``."""
        self.clear()
        self.gw_points_at = care_of
        self.unanswered_logged = None
        self.lifetime_granted = reply.lifetime
        self.registered_until = now + reply.lifetime
        # a zero lifetime (never granted by our HA to a request with one) must not spin renewals
        self.renew_at = (now + reply.lifetime * renew_fraction) if reply.lifetime else None

    def forget_registration(self) -> None:
        self.lifetime_granted = self.registered_until = self.renew_at = None

    def request(self, *, home_address: str, home_agent: str, care_of: str | None, ident: int,
                lifetime: int) -> RegistrationRequest:
        """The request the current state sends: at home a deregistration (RFC 5944 §3.6.1.1:
        lifetime 0, care-of address = home address), away a registration of ``care_of`` with a
        co-located CoA (D) and reverse tunnelling (T)."""
        if self.state is RegState.DEREGISTERING or care_of is None:
            if self.state is not RegState.DEREGISTERING:
                raise UsageError(f"{self.who}: a registration needs a care-of address")
            return RegistrationRequest(home_address=home_address, home_agent=home_agent,
                                       care_of_address=home_address, identification=ident,
                                       lifetime=0)
        return RegistrationRequest(home_address=home_address, home_agent=home_agent,
                                   care_of_address=care_of, identification=ident,
                                   lifetime=lifetime, flags=RequestFlags.D | RequestFlags.T)

    def status(self) -> dict[str, Any]:
        return {"lifetime_granted": self.lifetime_granted,
                "registered_until": self.registered_until, "attempts": self.attempts,
                "pending": self.pending_id is not None, "next_try": self.deadline,
                "last_refusal": self.refused}
