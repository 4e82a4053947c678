"""Log lines that explain what a daemon does, made from what its role already records.

The roles stay sans-I/O and never log by themselves: they append ``TimelineEvent``s, count drops
by ``DropReason`` (per role, per ESP SA, per IKE endpoint) and keep IKE SAs.  ``RoleWatcher``
turns those into log lines after every batch of the event loop:

* **INFO**, one line per lifecycle event: IKE SA up (peer, addresses, the chosen proposal) and
  down, child SAs installed / re-keyed / deleted, registrations and deregistrations (care-of
  address, lifetime), each handover with its duration (the MN, from the new care-of address to
  the accepting reply), SIUs sent and applied;
* **WARNING**, rate-limited per (reason, peer), for every authentication failure and mismatch
  (``MISMATCH_REASONS``: PSK, SIU key, MN-HA key, ESP key, addresses that do not match), naming
  the peer and what the reason usually means;
* **DEBUG**: every other drop (rate-limited the same way) and every timeline event.

Peers: a drop counted on an ESP SA names the SA and its remote address; a drop counted by the
role or its IKE endpoint names the sources of the net packets the role answered with nothing
since the last look (the loop reports them through ``EventLoop.on_silent``).

``JsonFormatter`` writes one JSON object per line (``--log-format json``), with the fields a
line carries (``event``, ``reason``, ``peer`` ...) as keys of their own.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from mipsec.constants import IPPROTO_UDP, MIP_PORT
from mipsec.drops import DropReason
from mipsec.node.timeline import format_detail
from mipsec.wire.mip import MSG_REGISTRATION_REQUEST

log = logging.getLogger("mipsec.events")

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

DROP_CHECK_INTERVAL_S = 0.2     # look at the drop counters at most this often (and then soon)
IKE_CHECK_INTERVAL_S = 1.0      # look for IKE SAs that ended on a timer at least this often
WARN_INTERVAL_S = 10.0          # one WARNING per (reason, peer) per interval; the rest counted
MAX_RATE_KEYS = 1024            # rate-limiter memory bound (forgotten all at once beyond it)
MAX_SILENT_SOURCES = 8          # peers remembered between two looks at the counters

# Drop reasons that mean a key, identity or address does not match the peer's: WARNING, with
# what the operator should check.
MISMATCH_REASONS: dict[DropReason, str] = {
    DropReason.IKE_AUTH_FAILED: "IKE authentication failed (PSK or identity mismatch)",
    DropReason.IKE_INTEGRITY_FAILED: "IKE message integrity check failed (IKE keys disagree)",
    DropReason.IKE_NO_PROPOSAL_CHOSEN: "no common IKE/ESP proposal (proposal mismatch)",
    DropReason.ICV_MISMATCH: "ESP integrity check failed (ESP key mismatch)",
    DropReason.OUTER_SOURCE_MISMATCH: "ESP from an unexpected outer source (address mismatch)",
    DropReason.OUTER_DESTINATION_MISMATCH:
        "ESP to an unexpected outer destination (address mismatch)",
    DropReason.MIP_AUTH_FAILED: "MN-HA authenticator does not verify (MN-HA key mismatch)",
    DropReason.MIP_NO_AUTH: "registration without MN-HA authentication",
    DropReason.MIP_UNKNOWN_SPI: "unknown MN-HA SPI (msa.spi mismatch)",
    DropReason.MIP_UNKNOWN_HOME_ADDRESS: "registration for an unknown home address",
    DropReason.MIP_HOME_ADDRESS_NOT_OWNED: "registration for another MN's home address",
    DropReason.MIP_UNKNOWN_HOME_AGENT: "registration for another home agent (HA address mismatch)",
    DropReason.MIP_NOT_FOR_US: "Mobile IP message not for this node (wrong GW or HA address)",
    DropReason.SIU_AUTH_FAILED: "SIU authenticator does not verify (HA-GW key mismatch)",
    DropReason.SIU_UNKNOWN_SENDER: "SIU from no configured HA (wrong HA or GW address)",
    DropReason.SIU_UNKNOWN_SA: "SIU names an SA the GW does not have (SPI mismatch)",
    DropReason.SIU_UNKNOWN_MOBILE: "SIU for an MN the GW does not serve",
    DropReason.REVERSE_TUNNEL_SOURCE_MISMATCH: "reverse-tunnelled packet from the wrong source",
}

# Timeline kinds that are lifecycle events (INFO); every other kind is DEBUG.
LIFECYCLE_KINDS: dict[str, str] = {
    "sas-installed": "child SA installed",
    "gw-sas-installed": "child SA installed",
    "mobile-installed": "mobile node configured",
    "sas-rekeyed": "child SA re-keyed",
    "gw-sas-rekeyed": "child SA re-keyed",
    "sas-deleted": "child SA deleted",
    "mobile-removed": "child SAs deleted (mobile node removed)",
    "ike-rekeyed": "IKE SA re-keyed",
    "ike-ended": "IKE SA ended",
    "ike-initiated": "IKE SA initiated",
    "ike-reestablish": "IKE SA re-established",
    "rrq-accepted": "registered",
    "binding-deregistered": "deregistered",
    "binding-expired": "binding expired",
    "deregistered": "deregistered",
    "returned-home": "returned home",
    "coa-changed": "care-of address changed",
    "siu-sent": "SIU sent",
    "gw-sa-repointed": "SIU applied",
    "gw-sa-moved-by-mobike": "SA moved by MOBIKE",
    "gw-binding-retired": "binding retired",
    "registration-failed": "registration failed",
    "reestablish-requested": "re-establishment requested",
    "siu-correction-refused": "SIU correction refused",
}
ACCEPTED_CODES = (0, 1)          # RFC 5944 §3.4: registration accepted (1: no simultaneous)


class RateLimiter:
    """``allow(key, now)``: True for the first call per ``interval`` s, and how many were held
    back before it (reported with the next line that gets through)."""

    def __init__(self, interval: float = WARN_INTERVAL_S, max_keys: int = MAX_RATE_KEYS):
        self.interval = interval
        self.max_keys = max_keys
        self._next: dict[Any, float] = {}
        self._held: dict[Any, int] = {}

    def allow(self, key: Any, now: float, count: int = 1) -> tuple[bool, int]:
        if now >= self._next.get(key, float("-inf")):
            if len(self._next) >= self.max_keys:
                self._next.clear()
                self._held.clear()
            self._next[key] = now + self.interval
            return True, self._held.pop(key, 0)
        self._held[key] = self._held.get(key, 0) + count
        return False, 0


def ike_suite_text(suite: Any) -> str:
    """``ENCR_AES_GCM_16/256 PRF_HMAC_SHA2_256 CURVE25519`` for an IKE or ESP suite object."""
    if suite is None:
        return "?"
    parts = []
    for fname in ("encr", "integ", "prf", "dh"):
        value = getattr(suite, fname, None)
        if value is None or int(value) == 0:
            continue
        text = getattr(value, "name", str(value))
        if fname == "encr" and getattr(suite, "key_bits", None):
            text += f"/{suite.key_bits}"
        parts.append(text)
    return " ".join(parts)


def _ip(packet: bytes) -> str | None:
    """Who sent a packet, for a log line: its IPv4 source, and for a Registration Request the
    MN it speaks for (a GW forwards requests from its own inside address, so the source alone
    would name the GW, not the MN whose key or request is wrong)."""
    if len(packet) < 20:
        return None
    source = socket.inet_ntoa(packet[12:16])
    ihl = (packet[0] & 0x0F) * 4
    # RFC 5944 §3.3: type 1, flags, lifetime, home address, home agent, care-of address
    if packet[9] == IPPROTO_UDP and len(packet) >= ihl + 8 + 16 \
            and packet[ihl + 2:ihl + 4] == MIP_PORT.to_bytes(2, "big") \
            and packet[ihl + 8] == MSG_REGISTRATION_REQUEST:
        mip = ihl + 8
        home = socket.inet_ntoa(packet[mip + 4:mip + 8])
        care_of = socket.inet_ntoa(packet[mip + 12:mip + 16])
        return f"{source} (registration of {home}, care-of {care_of})"
    return source


class RoleWatcher:
    """Looks at one role after each loop batch and logs what changed (see the module doc)."""

    def __init__(self, role: Any, name: str, *, sas: Callable[[Any], Iterable[Any]] = lambda r: (),
                 recent: Callable[[], Iterable[bytes]] = lambda: ()):
        self.role = role
        self.name = name
        self._sas = sas
        self._recent = recent                       # the last packets received (peer guess)
        self._role_sum = 0
        self._tl_last: Any = None
        self._tl_len = 0
        self._coa_since: dict[str, float] = {}      # MN: home address -> time of coa-changed
        self._drops: dict[tuple[str, DropReason], int] = {}
        self._silent: list[str] = []
        self._drops_due = False
        self._next_drop_check = float("-inf")
        self._next_ike_check = float("-inf")
        self._ike: dict[str, str] = {}              # established IKE SA name -> description
        self.limiter = RateLimiter()
        self.warnings = 0                           # WARNING lines written (status, tests)
        self.observers: list[Callable[[Any], None]] = []   # every new timeline event (metrics)
        self._drops = self.drop_totals()           # what was there before we started
        self._role_sum = self._role_level_sum()

    # --- hooks for the loop --------------------------------------------------------------------

    def on_silent(self, packet: bytes) -> None:
        """A net packet the role answered with nothing: maybe a drop; remember who sent it."""
        self._drops_due = True
        src = _ip(packet)
        if src is not None and src not in self._silent and len(self._silent) < MAX_SILENT_SOURCES:
            self._silent.append(src)

    def wants_wakeup(self) -> bool:
        """True while a drop check is pending (the loop should not sleep a whole second)."""
        return self._drops_due

    def _role_level_sum(self) -> int:
        role = self.role
        return sum(sum(c.values()) for c in (
            getattr(role, "drops", None) or {},
            getattr(getattr(role, "sad", None), "drops", None) or {},
            getattr(getattr(getattr(role, "ike", None), "endpoint", None), "drops", None) or {}))

    def after_batch(self, now: float) -> None:
        # Drops the role counted while answering (an IKE AUTHENTICATION_FAILED reply): not
        # silent, so the packets of the last batch are the best guess of who sent them.
        total = self._role_level_sum()
        if total != self._role_sum:
            self._role_sum = total
            if not self._silent:
                for packet in self._recent():
                    src = _ip(packet)
                    if src is not None and src not in self._silent \
                            and len(self._silent) < MAX_SILENT_SOURCES:
                        self._silent.append(src)
            self._drops_due = True
        changed = self._timeline(now)
        if changed or now >= self._next_ike_check:
            self._next_ike_check = now + IKE_CHECK_INTERVAL_S
            self._ike_sas()
        if self._drops_due and now >= self._next_drop_check:
            self._next_drop_check = now + DROP_CHECK_INTERVAL_S
            self._drops_due = False
            self._check_drops(now)
            self._silent = []

    # --- timeline -> INFO ----------------------------------------------------------------------

    def _new_events(self) -> list[Any]:
        timeline = getattr(self.role, "timeline", None)
        if not timeline:
            return []
        n = len(timeline)
        last = timeline[-1]
        if last is self._tl_last and n == self._tl_len:
            return []
        start = 0
        if self._tl_last is not None:
            for i in range(n - 1, -1, -1):
                if timeline[i] is self._tl_last:
                    start = i + 1
                    break
            else:   # it was cut off with the oldest events: what came after it in time is new
                start = next((i for i in range(n) if timeline[i].time > self._tl_last.time), n)
        self._tl_last, self._tl_len = last, n
        return list(timeline[start:])

    def _timeline(self, now: float) -> bool:
        events = self._new_events()
        for ev in events:
            self.event(ev)
            for observer in self.observers:
                observer(ev)
        return bool(events)

    def event(self, ev: Any) -> None:
        """One timeline event as a log line (INFO for lifecycle kinds, DEBUG otherwise)."""
        kind, d = ev.kind, ev.detail
        home = d.get("home_address")
        who = f" {home}" if home else ""
        extra = {"event": kind, "node": ev.node, **({"home_address": home} if home else {})}
        if kind == "coa-changed" and home:
            self._coa_since[home] = ev.time
        if kind == "rrp-received" and d.get("code") in ACCEPTED_CODES:
            lifetime = d.get("lifetime")
            if lifetime == 0:
                log.info("%s:%s deregistered (reply via %s)", self.name, who, d.get("via"),
                         extra={**extra, "event": "deregistered"})
                return
            start = self._coa_since.pop(home, None) if home else None
            took = "" if start is None else f"; handover took {(ev.time - start) * 1000:.0f} ms"
            if start is not None:
                extra["handover_ms"] = round((ev.time - start) * 1000, 3)
            log.info("%s:%s registered, lifetime %s s (reply via %s)%s", self.name, who,
                     lifetime, d.get("via"), took, extra={**extra, "event": "registered"})
            return
        if kind == "rrq-accepted":
            if d.get("care_of") is None or d.get("lifetime") == 0:
                log.info("%s:%s deregistered (at home)", self.name, who,
                         extra={**extra, "event": "deregistered"})
            else:
                log.info("%s:%s registered at care-of address %s, lifetime %s s", self.name, who,
                         d.get("care_of"), d.get("lifetime"),
                         extra={**extra, "event": "registered", "care_of": d.get("care_of"),
                                "lifetime": d.get("lifetime")})
            return
        text = LIFECYCLE_KINDS.get(kind)
        detail = format_detail(d)
        if text is not None:
            log.info("%s:%s %s%s", self.name, who, text, f" ({detail})" if detail else "",
                     extra=extra)
        else:
            log.debug("%s:%s %s %s", self.name, who, kind, detail, extra=extra)

    # --- IKE SAs -------------------------------------------------------------------------------

    def _ike_sas(self) -> None:
        ike = getattr(self.role, "ike", None)
        endpoint = getattr(ike, "endpoint", None)
        if endpoint is None:
            return
        now_up: dict[str, str] = {}
        for sa in list(getattr(endpoint, "ike_sas", ())):
            if not getattr(sa, "is_established", False):
                continue
            name = sa.name
            remote = getattr(sa, "remote", None)
            where = f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) else str(remote)
            now_up[name] = f"{sa.peer_id} at {where}"
            if name not in self._ike:
                log.info("%s: IKE SA %s up with %s, proposal %s", self.name, name, now_up[name],
                         ike_suite_text(getattr(sa, "suite", None)),
                         extra={"event": "ike-sa-up", "ike_sa": name, "peer": str(sa.peer_id),
                                "remote": where})
        for name, what in self._ike.items():
            if name not in now_up:
                log.info("%s: IKE SA %s with %s down", self.name, name, what,
                         extra={"event": "ike-sa-down", "ike_sa": name})
        self._ike = now_up

    # --- drops -> WARNING / DEBUG --------------------------------------------------------------

    def drop_totals(self) -> dict[tuple[str, DropReason], int]:
        """Every drop counter of the role: (where, reason) -> count.  ``where`` is an SA with
        its remote address, or "" for counters that do not name a peer."""
        out: dict[tuple[str, DropReason], int] = {}

        def add(where: str, counter: Any) -> None:
            for reason, n in dict(counter or {}).items():
                if isinstance(reason, DropReason) and n:
                    key = (where, reason)
                    out[key] = out.get(key, 0) + n

        role = self.role
        add("", getattr(role, "drops", None))
        add("", getattr(getattr(role, "sad", None), "drops", None))
        add("", getattr(getattr(getattr(role, "ike", None), "endpoint", None), "drops", None))
        for sa in self._sas(role):
            counters = getattr(sa, "counters", None)
            remote = getattr(sa, "remote", None)
            where = f"SA 0x{sa.spi:08x}" + (f" from {remote}" if remote not in (None, "*")
                                             else "")
            add(where, getattr(counters, "drops", None))
        return out

    def _check_drops(self, now: float) -> None:
        totals = self.drop_totals()
        previous = self._drops
        self._drops = totals
        peers = ", ".join(self._silent) or "unknown"
        increased = {key: n - previous.get(key, 0) for key, n in totals.items()
                     if n > previous.get(key, 0)}
        on_sas = {reason for where, reason in increased if where}
        for (where, reason), new in increased.items():
            if not where and reason in on_sas:
                continue                  # the same drops, counted by the SA that names its peer
            peer = where or f"from {peers}"
            if where and " from " not in where:
                peer = f"{where} from {peers}"        # a wildcard-source SA (the GW's inbound)
            meaning = MISMATCH_REASONS.get(reason)
            if meaning is not None:
                ok, held = self.limiter.allow((reason, peer), now, new)
                if ok:
                    self.warnings += 1
                    more = f"; {held} more since the last line" if held else ""
                    log.warning("%s: %s %s: %s (%d dropped%s)", self.name, reason, peer,
                                meaning, new, more,
                                extra={"event": "mismatch", "reason": str(reason),
                                       "peer": peer, "count": new})
            elif log.isEnabledFor(logging.DEBUG):
                ok, held = self.limiter.allow(("drop", reason, peer), now, new)
                if ok:
                    log.debug("%s: dropped %d %s %s%s", self.name, new, reason, peer,
                              f" ({held} more before)" if held else "",
                              extra={"event": "drop", "reason": str(reason), "peer": peer})


# --- formatting ------------------------------------------------------------------------------

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the line's
    structured fields (``extra=``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) \
                    else str(value)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(fmt: str = "text", level: str | int | None = None) -> None:
    """Set the format of every handler of the root logger (the CLI installs one on stderr) and
    the level of mipsec's loggers."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (one of {', '.join(LOG_FORMATS)})")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=TEXT_FORMAT)
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)
    if level is not None:
        logging.getLogger("mipsec").setLevel(level.upper() if isinstance(level, str) else level)
