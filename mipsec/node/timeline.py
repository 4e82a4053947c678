"""The handover timeline: what each role records, and how the pieces are put together.

Every role appends ``TimelineEvent(time, node, kind, detail)`` to its ``timeline`` list, stamped
with the ``now`` it was given.  The kinds, in the order a handover produces them
(docs/design.md "Timeline kinds"):

    coa-changed -> sa-repointed (MN) -> rrq-sent -> rrq-forwarded (GW) -> rrq-accepted (HA)
    -> siu-sent (HA) -> gw-sa-repointed -> rrp-forwarded (GW) -> rrp-received (MN)
    -> first-downlink-at-new-coa (MN)

plus ``rrq-rejected``, ``registration-failed``, ``reestablish-requested``, ``deregistered``,
``binding-expired``, ``siu-refused``.  This module merges the timelines of several roles,
splits them per handover and prints them; it never reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from mipsec.node.actions import TimelineEvent

HANDOVER_ORDER = (
    "coa-changed", "sa-repointed", "rrq-sent", "rrq-forwarded", "rrq-accepted", "siu-sent",
    "gw-sa-repointed", "rrp-forwarded", "rrp-received", "first-downlink-at-new-coa",
)
OTHER_KINDS = (
    "rrq-rejected", "registration-failed", "reestablish-requested", "deregistered",
    "binding-expired", "siu-refused", "rrq-retransmitted", "sas-installed", "mobile-installed",
    "binding-deregistered", "gw-binding-retired", "returned-home",
    "siu-correction-refused",       # HA: the GW refused our correcting SIU too; no more
    "binding-restored", "binding-not-stored",   # HA: its binding store (mipsec.store)
    "siu-retransmitted", "siu-unacknowledged",  # HA: an SIU resent / given up on
    "siu-sequence-not-reserved",    # HA: a block of SIU numbers could not be reserved
)
IKE_KINDS = (     # IKEv2 in the roles (docs/ikev2.md "Integration")
    "ike-initiated", "ike-established", "ike-rekeyed", "ike-ended", "ike-reestablish",
    "sas-rekeyed", "sas-deleted", "mobike-update-sent", "gw-sas-installed", "gw-sas-rekeyed",
    "gw-sa-moved-by-mobike", "gw-siu-confirms-mobike", "mobile-removed", "gateway-spi-learned",
    "gw-esp-not-moved",             # GW: an IKE address change that may not move an ESP SA
    "gw-sa-bound-by-ike",           # GW: a pair IKE installed points at the IKE peer
    "gw-rekey-collision",           # GW: simultaneous re-keys, the surviving pair carries on
)
MOBILE_KINDS = (  # the MN's robustness: where it is, what it waits for
    "home-prefix-address-ignored",  # a home-prefix address on a visited interface
    "liveness-check",               # sending, nothing received: is the GW still there?
    "registration-unanswered",      # the GW answers a check, the HA's reply does not come
)
POOL_KINDS = (    # several GWs (docs/scaling.md)
    "gateway-changed",              # MN: the next GW of its list (or back to the first)
    "gateway-learnt",               # HA: a request came through another GW: the MN's GW now
)
KINDS = frozenset(HANDOVER_ORDER + OTHER_KINDS + IKE_KINDS + MOBILE_KINDS + POOL_KINDS)
# Bounds (a timeline is what ``mipsec status`` / ``timeline`` show, and what an authenticated MN
# can make a role record: every Registration Request it tunnels, for one): a role's timeline
# never holds more than TIMELINE_MAX_EVENTS; when it reaches that it is compacted to at most
# TIMELINE_KEEP_EVENTS, keeping the newest TIMELINE_EVENTS_PER_MOBILE of each MN (events
# without a home address count as one more MN).  So one MN's flood cannot push another MN's
# handovers out, and memory stays about TIMELINE_MAX_EVENTS x ~500 bytes per role.  A role
# that serves few MNs (an MN serves itself) keeps a ``Timeline`` with a lower limit
# (``limit_for``): twice its MNs' shares, so that a daemon left running reaches its steady
# size within hours, not weeks.
TIMELINE_MAX_EVENTS = 8192
TIMELINE_KEEP_EVENTS = TIMELINE_MAX_EVENTS // 2
TIMELINE_EVENTS_PER_MOBILE = 512


class Timeline(list):
    """A role's timeline: a list of events that ``record`` compacts when it reaches
    ``max_events`` (to half of that, and the newest TIMELINE_EVENTS_PER_MOBILE of each MN)."""

    __slots__ = ("max_events",)

    def __init__(self, max_events: int = TIMELINE_MAX_EVENTS):
        super().__init__()
        if max_events < 2:
            raise ValueError(f"a timeline needs room for at least 2 events, not {max_events}")
        self.max_events = max_events


def limit_for(mobiles: int) -> int:
    """The event limit of a role that records events of ``mobiles`` MNs (an MN: 1; a GW or HA:
    its configured MNs, plus one for events without a home address)."""
    return min(TIMELINE_MAX_EVENTS, 2 * TIMELINE_EVENTS_PER_MOBILE * max(1, mobiles))


def compact(timeline: list[TimelineEvent], per_mobile: int = TIMELINE_EVENTS_PER_MOBILE,
            keep: int = TIMELINE_KEEP_EVENTS) -> None:
    """Keep (in place, in order) the newest ``per_mobile`` events of each MN, at most ``keep``
    in all.  O(len): called once per TIMELINE_MAX_EVENTS - keep appends at most."""
    counts: dict[Any, int] = {}
    kept: list[TimelineEvent] = []
    for event in reversed(timeline):
        key = event.detail.get("home_address")
        n = counts.get(key, 0)
        if n < per_mobile:
            counts[key] = n + 1
            kept.append(event)
            if len(kept) >= keep:
                break
    kept.reverse()
    timeline[:] = kept


def record(timeline: list[TimelineEvent], now: float, node: str, kind: str,
           **detail: Any) -> TimelineEvent:
    """Append one event (``kind`` must be a known kind: typos would hide a missing step)."""
    if kind not in KINDS:
        raise ValueError(f"unknown timeline kind {kind!r}")
    event = TimelineEvent(now, node, kind, detail)
    limit = getattr(timeline, "max_events", TIMELINE_MAX_EVENTS)
    if len(timeline) >= limit:
        compact(timeline, keep=limit // 2)
    timeline.append(event)
    return event


def merge(*timelines: Iterable[TimelineEvent]) -> list[TimelineEvent]:
    """All events by time; events at the same instant keep the order of the arguments."""
    events: list[TimelineEvent] = []
    for t in timelines:
        events.extend(t)
    return sorted(events, key=lambda e: e.time)


def for_mobile(events: Iterable[TimelineEvent], home_address: str) -> list[TimelineEvent]:
    """The events that concern one MN (those with ``home_address`` in their detail, or none)."""
    return [e for e in events if e.detail.get("home_address", home_address) == home_address]


def split_handovers(events: Sequence[TimelineEvent]) -> list[list[TimelineEvent]]:
    """Cut a merged timeline at each ``coa-changed`` / ``returned-home`` (one list per move)."""
    out: list[list[TimelineEvent]] = []
    for e in events:
        if e.kind in ("coa-changed", "returned-home") or not out:
            out.append([])
        out[-1].append(e)
    return out


def first(events: Iterable[TimelineEvent], kind: str, **match: Any) -> TimelineEvent | None:
    for e in events:
        if e.kind == kind and all(e.detail.get(k) == v for k, v in match.items()):
            return e
    return None


def in_order(events: Sequence[TimelineEvent], kinds: Sequence[str]) -> bool:
    """True when the first occurrences of ``kinds`` appear in this order (each strictly after)."""
    position = -1
    for kind in kinds:
        found = next((i for i, e in enumerate(events) if e.kind == kind and i > position), None)
        if found is None:
            return False
        position = found
    return True


TABLE_OMITS = ("home_address", "identification", "sequence")


def format_detail(detail: dict[str, Any], omit: Sequence[str] = TABLE_OMITS) -> str:
    """One line of ``key=value`` for a timeline table: SPIs in hex, ``omit`` left out (long
    numbers, and the home address where the table is about one MN anyway)."""
    parts = []
    for k, v in detail.items():
        if k in omit:
            continue
        if isinstance(v, int) and k.endswith("spi"):
            v = f"0x{v:08x}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def format_table(events: Sequence[TimelineEvent], t0: float | None = None) -> str:
    """A fixed-width table: time since ``t0`` (ms), node, kind, details."""
    if not events:
        return "(no events)"
    base = events[0].time if t0 is None else t0
    lines = [f"{'t+ms':>10}  {'node':<5} {'event':<26} detail"]
    for e in events:
        lines.append(f"{(e.time - base) * 1000:10.3f}  {e.node:<5} {e.kind:<26} {format_detail(e.detail)}")
    return "\n".join(lines)


def format_timeline(events: Sequence[dict[str, Any]], t0: float | None = None,
                    omit: Sequence[str] = TABLE_OMITS) -> list[str]:
    """Lines for timeline events in their JSON form (``as_dicts``, ``mipsec status``): time
    since ``t0`` (ms), node, kind, details."""
    if not events:
        return ["(no events)"]
    base = events[0].get("time", 0.0) if t0 is None else t0
    out = []
    for ev in events:
        extra = format_detail(ev.get("detail") or {}, omit)
        out.append(f"{(ev.get('time', 0.0) - base) * 1000:9.2f} ms  {ev.get('node', ''):<6} "
                   f"{ev.get('kind', ''):<26} {extra}")
    return out


def as_dicts(events: Iterable[TimelineEvent]) -> list[dict[str, Any]]:
    """JSON-able form for ``status()`` and ``mipsec status --json``."""
    return [{"time": e.time, "node": e.node, "kind": e.kind,
             "detail": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                        for k, v in e.detail.items()}}
            for e in events]
