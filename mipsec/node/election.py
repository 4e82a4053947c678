"""Which of several home agents serves a home network: leader election on a lease, sans-I/O.

Theory of operation
-------------------
Two or more HA daemons share one binding store (etcd) and one HA service address.  Exactly one
of them, the *active*, holds the service address on its home interface, answers registrations,
sends SIUs and tunnels; the others are *standbys* that keep warm copies of the bindings by
watching the store.  Who is active is a key in the store, ``<prefix>/leader``, created only if
absent (a transaction comparing its create revision with 0) and attached to a lease of
``ttl_s`` seconds that the active renews every ``renew_every_s``.  When the active dies (kill -9,
machine gone, network cut) it stops renewing; etcd deletes the key when the lease expires, the
standbys see the deletion (or their next campaign finds the key absent) and one of them wins.

Fencing.  An active that cannot renew must stop serving *before* etcd can expire its lease,
or two HAs would answer for the same home addresses.  etcd counts a lease's TTL from when it
*received* the grant or keep-alive, which is after we sent it; so the lease lives at least until
``sent_at + ttl_s`` measured on our clock (clock rates, not clocks, must agree; etcd only ever
lengthens a lease: a leader change resets every lease to its full TTL).  The active serves
until ``serve_until = sent_at_of_last_successful_renewal + ttl_s - fence_margin_s`` and fences
itself (``StopServing``: the service address removed, nothing answered) when that passes without
a newer renewal.  ``fence_margin_s`` covers the time the runtime needs to carry that out plus
clock-rate drift.  Every store write of an active also compares the leader key with its identity
(``mipsec.store.etcd``: ``fence``), so a deposed active that is still running writes nothing and
therefore acknowledges nothing.

The table ``ELECTION_TRANSITIONS`` is the logic: ``(state, event) -> (new state, effect)``;
``HaElection._event`` refuses a pair that is not in it.  Timers and results are inputs with the
time as an argument (``now``), the requests to make are returned actions; the I/O (etcd calls,
addresses, ARP) lives in ``mipsec.io.hagroup``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from mipsec.errors import ConfigError, UsageError

HA_LEASE_TTL_S = 2.0            # tunable: the leader key's lease (etcd's minimum: ~1.5 x its
#                                 election timeout); a dead active is replaced after about this
HA_RENEW_EVERY_S = 0.4          # tunable: keep-alive period of the active
HA_FENCE_MARGIN_S = 0.6         # tunable: the active stops serving this long before its lease
#                                 can expire at the earliest
HISTORY_MAX = 64                # election events kept for status
HA_CAMPAIGN_EVERY_S = 0.5       # tunable: a standby's campaign period (it also campaigns at once
#                                 when it sees the leader key deleted)


class ElectionState(enum.Enum):
    STANDBY = "standby"
    ACTIVE = "active"
    STOPPED = "stopped"


class ElectionEvent(enum.Enum):
    WON = "won"                       # our create-if-absent transaction succeeded
    LOST = "lost"                     # the key exists (another HA is active), or no answer
    LEADER_GONE = "leader-gone"       # the watch saw the key deleted, or holding another value
    RENEWED = "renewed"               # a keep-alive answered with a live lease
    RENEW_FAILED = "renew-failed"     # a keep-alive got no answer (keep trying until the deadline)
    LEASE_LOST = "lease-lost"         # a keep-alive said the lease is gone
    SERVE_DEADLINE = "serve-deadline" # serve_until passed without a newer renewal
    STOP = "stop"                     # the daemon stops


class ElectionEffect(enum.Enum):
    SERVE = "serve"                   # become active: StartServing
    CAMPAIGN_LATER = "campaign-later"
    CAMPAIGN_NOW = "campaign-now"
    EXTEND = "extend"                 # serve_until moves on
    RETRY_RENEW = "retry-renew"
    FENCE = "fence"                   # StopServing, back to standby
    RESIGN = "resign"                 # StopServing and give the lease back (a clean stop)
    NOTHING = "nothing"


S, E, F = ElectionState, ElectionEvent, ElectionEffect
ELECTION_TRANSITIONS: dict[tuple[ElectionState, ElectionEvent],
                           tuple[ElectionState, ElectionEffect]] = {
    (S.STANDBY, E.WON): (S.ACTIVE, F.SERVE),
    (S.STANDBY, E.LOST): (S.STANDBY, F.CAMPAIGN_LATER),
    (S.STANDBY, E.LEADER_GONE): (S.STANDBY, F.CAMPAIGN_NOW),
    (S.STANDBY, E.STOP): (S.STOPPED, F.NOTHING),
    (S.ACTIVE, E.RENEWED): (S.ACTIVE, F.EXTEND),
    (S.ACTIVE, E.RENEW_FAILED): (S.ACTIVE, F.RETRY_RENEW),
    (S.ACTIVE, E.LEASE_LOST): (S.STANDBY, F.FENCE),
    (S.ACTIVE, E.SERVE_DEADLINE): (S.STANDBY, F.FENCE),
    (S.ACTIVE, E.LEADER_GONE): (S.STANDBY, F.FENCE),
    (S.ACTIVE, E.STOP): (S.STOPPED, F.RESIGN),
}
del S, E, F


# --- actions for the runtime ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Campaign:
    """Grant a lease of ``ttl_s`` and create the leader key with ``identity`` on it, only if
    the key is absent; report with ``campaign_result`` (the time read before the grant)."""
    identity: str
    ttl_s: float


@dataclass(frozen=True, slots=True)
class RenewLease:
    """Send one keep-alive for our lease; report with ``renew_result``."""


@dataclass(frozen=True, slots=True)
class StartServing:
    """Become the active HA: service address, gratuitous ARP, the bindings' routes and
    proxy-ARP entries from the store, then answer registrations and send SIUs."""


@dataclass(frozen=True, slots=True)
class StopServing:
    """Fence: remove the service address and the bindings' proxy-ARP entries and routes, and
    answer nothing, at once.  ``resign``: also revoke our lease (a clean stop: a standby takes
    over without waiting for the TTL)."""
    reason: str
    resign: bool = False


class HaElection:
    """One HA's side of the election (see the module doc)."""

    def __init__(self, identity: str, *, ttl_s: float = HA_LEASE_TTL_S,
                 renew_every_s: float = HA_RENEW_EVERY_S,
                 fence_margin_s: float = HA_FENCE_MARGIN_S,
                 campaign_every_s: float = HA_CAMPAIGN_EVERY_S, now: float = 0.0):
        if not identity:
            raise ConfigError("election: an empty identity")
        if not 0 < fence_margin_s < ttl_s:
            raise ConfigError(f"ha_fence_margin_s {fence_margin_s} must be in (0, ha_lease_ttl_s "
                              f"{ttl_s})")
        if not 0 < renew_every_s < ttl_s - fence_margin_s:
            raise ConfigError(f"ha_renew_every_s {renew_every_s} must be positive and below "
                              f"ha_lease_ttl_s - ha_fence_margin_s ({ttl_s - fence_margin_s:g}): "
                              f"else the active fences itself between two renewals")
        if campaign_every_s <= 0:
            raise ConfigError(f"ha_campaign_every_s {campaign_every_s} must be positive")
        self.identity = identity
        self.ttl_s = ttl_s
        self.renew_every_s = renew_every_s
        self.fence_margin_s = fence_margin_s
        self.campaign_every_s = campaign_every_s
        self.state = ElectionState.STANDBY
        self.campaign_at = now                 # standby: next campaign (inf: one in flight)
        self.renew_at = math.inf               # active: next keep-alive (inf: one in flight)
        self.serve_until = -math.inf           # active: fence at this instant
        self.won_revision = 0                  # the store revision at which we became active
        self.history: list[tuple[float, str, str]] = []     # (now, event, new state)

    # --- the machine --------------------------------------------------------------------------

    def _event(self, event: ElectionEvent, now: float, sent_at: float = 0.0,
               reason: str = "") -> list[object]:
        entry = ELECTION_TRANSITIONS.get((self.state, event))
        if entry is None:
            raise UsageError(f"election: {event.value} is not allowed in state "
                             f"{self.state.value}")
        new, effect = entry
        self.state = new
        # a standby's lost campaigns (two a second) are recorded once per run
        if not (self.history and event is ElectionEvent.LOST
                and self.history[-1][1:] == (event.value, new.value)):
            self.history.append((now, event.value, new.value))
            del self.history[:-HISTORY_MAX]
        return self._effects[effect](self, now, sent_at, reason or event.value)

    def _serve(self, now: float, sent_at: float, reason: str) -> list[object]:
        self.serve_until = sent_at + self.ttl_s - self.fence_margin_s
        self.renew_at = now + self.renew_every_s
        self.campaign_at = math.inf
        return [StartServing()]

    def _campaign_later(self, now: float, sent_at: float, reason: str) -> list[object]:
        self.campaign_at = now + self.campaign_every_s
        return []

    def _campaign_now(self, now: float, sent_at: float, reason: str) -> list[object]:
        if self.campaign_at == math.inf:
            return []                          # one is in flight already
        self.campaign_at = math.inf
        return [Campaign(self.identity, self.ttl_s)]

    def _extend(self, now: float, sent_at: float, reason: str) -> list[object]:
        # a late answer to an older keep-alive never moves the deadline back
        self.serve_until = max(self.serve_until, sent_at + self.ttl_s - self.fence_margin_s)
        self.renew_at = now + self.renew_every_s
        return []

    def _retry_renew(self, now: float, sent_at: float, reason: str) -> list[object]:
        self.renew_at = now + min(self.renew_every_s, 0.1)
        return []

    def _fence(self, now: float, sent_at: float, reason: str) -> list[object]:
        self.renew_at = math.inf
        self.serve_until = -math.inf
        self.campaign_at = now + self.campaign_every_s
        return [StopServing(reason)]

    def _resign(self, now: float, sent_at: float, reason: str) -> list[object]:
        self.renew_at = self.campaign_at = math.inf
        self.serve_until = -math.inf
        return [StopServing(reason, resign=True)]

    def _nothing(self, now: float, sent_at: float, reason: str) -> list[object]:
        self.campaign_at = math.inf
        return []

    _effects = {ElectionEffect.SERVE: _serve, ElectionEffect.CAMPAIGN_LATER: _campaign_later,
                ElectionEffect.CAMPAIGN_NOW: _campaign_now, ElectionEffect.EXTEND: _extend,
                ElectionEffect.RETRY_RENEW: _retry_renew, ElectionEffect.FENCE: _fence,
                ElectionEffect.RESIGN: _resign, ElectionEffect.NOTHING: _nothing}

    # --- inputs ---------------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return self.state is ElectionState.ACTIVE

    def may_serve(self, now: float) -> bool:
        """True only while active and before the fence deadline (the runtime asks this before
        it answers anything, so a loop that was late to its timer still answers nothing)."""
        return self.state is ElectionState.ACTIVE and now < self.serve_until

    def campaign_result(self, won: bool, sent_at: float, now: float,
                        revision: int = 0) -> list[object]:
        """``revision``: the store's revision of our leader key when we won."""
        if self.state is not ElectionState.STANDBY:
            return []                          # stopped meanwhile: nothing to do
        self.campaign_at = 0.0                 # no campaign in flight any more
        if won:
            self.won_revision = revision
        return self._event(ElectionEvent.WON if won else ElectionEvent.LOST, now, sent_at)

    def renew_result(self, alive: bool | None, sent_at: float, now: float) -> list[object]:
        """``alive``: True the lease lives, False etcd says it is gone, None no answer."""
        if self.state is not ElectionState.ACTIVE:
            return []
        if alive is None:
            return self._event(ElectionEvent.RENEW_FAILED, now) + self.handle_timer(now)
        return self._event(ElectionEvent.RENEWED if alive else ElectionEvent.LEASE_LOST, now,
                           sent_at, "the lease is gone" if not alive else "")

    def leader_seen(self, holder: str | None, now: float, revision: int = 0) -> list[object]:
        """The watch saw the leader key change: ``holder`` is its value (None: deleted) as of
        store ``revision``.  What it saw before our own win (a watch that lags) is no news."""
        if self.state is ElectionState.ACTIVE and revision < self.won_revision:
            return []
        if self.state is ElectionState.STANDBY and holder is None:
            return self._event(ElectionEvent.LEADER_GONE, now)
        if self.state is ElectionState.ACTIVE and holder != self.identity:
            return self._event(ElectionEvent.LEADER_GONE, now,
                               reason=f"the leader key names {holder!r}" if holder
                               else "the leader key was deleted")
        return []

    def stop(self, now: float) -> list[object]:
        if self.state is ElectionState.STOPPED:
            return []
        return self._event(ElectionEvent.STOP, now)

    # --- timers ---------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        if self.state is ElectionState.ACTIVE:
            return min(self.renew_at, self.serve_until)
        if self.state is ElectionState.STANDBY and self.campaign_at != math.inf:
            return self.campaign_at
        return None

    def handle_timer(self, now: float) -> list[object]:
        if self.state is ElectionState.ACTIVE:
            if now >= self.serve_until:
                return self._event(ElectionEvent.SERVE_DEADLINE, now,
                                   reason=f"no renewal of the lease for "
                                          f"{self.ttl_s - self.fence_margin_s:g} s")
            if now >= self.renew_at:
                self.renew_at = math.inf
                return [RenewLease()]
        elif self.state is ElectionState.STANDBY and now >= self.campaign_at:
            self.campaign_at = math.inf
            return [Campaign(self.identity, self.ttl_s)]
        return []


__all__ = ["HaElection", "ElectionState", "ElectionEvent", "ElectionEffect",
           "ELECTION_TRANSITIONS", "Campaign", "RenewLease", "StartServing", "StopServing",
           "HA_LEASE_TTL_S", "HA_RENEW_EVERY_S", "HA_FENCE_MARGIN_S", "HA_CAMPAIGN_EVERY_S"]
