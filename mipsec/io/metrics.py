"""Prometheus metrics of one daemon, served from its own event loop (``[metrics] listen``).

Off by default.  With ``listen = "127.0.0.1:9474"`` the daemon opens a TCP socket and answers
``GET /metrics`` in the Prometheus text format (``prometheus_client``'s exposition).  The HTTP
server is not a thread: the listening socket is one more source of the event loop, so the role's
state is read in the loop, between packets, never while it changes.  A request gets
``control.CLIENT_TIMEOUT_S`` to arrive (the control socket's accept and read serve here too).

Metrics (labels ``role`` and ``name`` on every one):

* ``mipsec_io_packets_total{path}``: from_tun, to_tun, from_net, to_net (the loop's counters);
* ``mipsec_sa_packets_total`` / ``mipsec_sa_octets_total{spi,direction}``: per ESP SA now held;
* ``mipsec_drops_total{reason,where,spi}``: every drop counter (``where`` = ``role``, or
  ``sa`` with the SA's ``spi``);
* ``mipsec_handovers_total`` and ``mipsec_handover_duration_seconds`` (histogram): MN, from the
  new care-of address to the accepting reply;
* ``mipsec_registrations_total``: MN accepted replies, HA accepted requests;
* ``mipsec_siu_applied_total`` (GW), ``mipsec_rekeys_total{kind}`` (child / ike);
* ``mipsec_ike_sas`` (established IKE SAs), ``mipsec_bindings`` (HA), ``mipsec_mobiles`` (GW).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import Any

from mipsec.io.control import accept_client, read_request
from mipsec.io.logs import ACCEPTED_CODES

MAX_REQUEST_BYTES = 8192
HANDOVER_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REKEY_KINDS = {"sas-rekeyed": "child", "gw-sas-rekeyed": "child", "ike-rekeyed": "ike"}


def parse_listen(text: str) -> tuple[str, int]:
    """``"addr:port"`` -> (addr, port); raises ValueError with the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not addr:port")
    try:
        socket.inet_aton(host)
        number = int(port)
    except (OSError, ValueError):
        raise ValueError(f"{text!r} is not an IPv4 addr:port") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} is not in 1-65535")
    return host, number


class RoleMetrics:
    """The registry for one daemon: counters fed from timeline events, the rest read at scrape
    time from the role and the loop."""

    def __init__(self, role_name: str, name: str, *, role: Any, stats: Callable[[], dict],
                 sas: Callable[[], Iterable[Any]], drops: Callable[[], dict]):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.role = role
        self._stats = stats
        self._sas = sas
        self._drops = drops
        self.labels = {"role": role_name, "name": name}
        self.registry = CollectorRegistry(auto_describe=True)
        names = ["role", "name"]
        self.handovers = Counter("mipsec_handovers", "Completed handovers (MN)", names,
                                 registry=self.registry).labels(**self.labels)
        self.handover_seconds = Histogram(
            "mipsec_handover_duration_seconds", "New care-of address to accepting reply (MN)",
            names, buckets=HANDOVER_BUCKETS_S, registry=self.registry).labels(**self.labels)
        self.registrations = Counter("mipsec_registrations", "Accepted registrations", names,
                                     registry=self.registry).labels(**self.labels)
        self.siu_applied = Counter("mipsec_siu_applied", "SIUs applied (GW)", names,
                                   registry=self.registry).labels(**self.labels)
        rekeys = Counter("mipsec_rekeys", "Re-keys", names + ["kind"], registry=self.registry)
        self.rekeys = {k: rekeys.labels(**self.labels, kind=k) for k in ("child", "ike")}
        self._coa_since: dict[Any, float] = {}
        self.registry.register(self)

    # --- timeline events (from the log watcher) ------------------------------------------------

    def observe(self, ev: Any) -> None:
        kind, d = ev.kind, ev.detail
        if kind == "coa-changed":
            self._coa_since[d.get("home_address")] = ev.time
        elif kind == "rrp-received" and d.get("code") in ACCEPTED_CODES and d.get("lifetime"):
            self.registrations.inc()
            start = self._coa_since.pop(d.get("home_address"), None)
            if start is not None:
                self.handovers.inc()
                self.handover_seconds.observe(max(0.0, ev.time - start))
        elif kind == "rrq-accepted" and d.get("care_of") is not None and d.get("lifetime"):
            self.registrations.inc()
        elif kind == "gw-sa-repointed":
            self.siu_applied.inc()
        elif kind in REKEY_KINDS:
            self.rekeys[REKEY_KINDS[kind]].inc()

    # --- read at scrape time (prometheus_client custom collector) ------------------------------

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        base = ["role", "name"]
        values = [self.labels["role"], self.labels["name"]]
        io = CounterMetricFamily("mipsec_io_packets", "Packets through the event loop",
                                 labels=base + ["path"])
        for path in ("from_tun", "to_tun", "from_net", "to_net"):
            io.add_metric(values + [path], self._stats().get(path, 0))
        yield io
        packets = CounterMetricFamily("mipsec_sa_packets", "Packets per ESP SA",
                                      labels=base + ["spi", "direction"])
        octets = CounterMetricFamily("mipsec_sa_octets", "Octets per ESP SA",
                                     labels=base + ["spi", "direction"])
        for sa in self._sas():
            counters = getattr(sa, "counters", None)
            labels = values + [f"0x{sa.spi:08x}", str(getattr(sa.direction, "value",
                                                                 sa.direction)).lower()]
            packets.add_metric(labels, getattr(counters, "packets", 0))
            octets.add_metric(labels, getattr(counters, "octets", 0))
        yield packets
        yield octets
        drops = CounterMetricFamily("mipsec_drops", "Dropped input by reason",
                                    labels=base + ["reason", "where", "spi"])
        merged: dict[tuple[str, str, str], int] = {}
        for (where, reason), n in self._drops().items():
            spi = where.split()[1] if where.startswith("SA ") else ""
            key = (str(reason), "sa" if where else "role", spi)
            merged[key] = merged.get(key, 0) + n
        for (reason, where, spi), n in sorted(merged.items()):
            drops.add_metric(values + [reason, where, spi], n)
        yield drops
        role = self.role
        endpoint = getattr(getattr(role, "ike", None), "endpoint", None)
        ike = GaugeMetricFamily("mipsec_ike_sas", "Established IKE SAs", labels=base)
        ike.add_metric(values, sum(1 for sa in getattr(endpoint, "ike_sas", ())
                                   if getattr(sa, "is_established", False)))
        yield ike
        if hasattr(role, "bindings"):
            g = GaugeMetricFamily("mipsec_bindings", "Mobility bindings (HA)", labels=base)
            g.add_metric(values, len(role.bindings))
            yield g
        if isinstance(getattr(role, "mobiles", None), dict):
            g = GaugeMetricFamily("mipsec_mobiles", "Mobile nodes with SAs (GW)", labels=base)
            g.add_metric(values, len(role.mobiles))
            yield g

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class MetricsServer:
    """A tiny HTTP/1.0 responder for ``GET /metrics`` run by the event loop (one request per
    readable listening socket, answered inline)."""

    def __init__(self, listen: str, metrics: RoleMetrics):
        host, port = parse_listen(listen)
        self.metrics = metrics
        self.name = "metrics"
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(16)
        self._sock.setblocking(False)
        self.address = self._sock.getsockname()
        self.served = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve_one(self) -> None:
        conn = accept_client(self._sock)
        if conn is None:
            return
        with conn:
            try:
                request = read_request(conn, (b"\r\n\r\n", b"\n\n"), MAX_REQUEST_BYTES)
                words = request.split(b"\r\n", 1)[0].split()
                if len(words) >= 2 and words[0] == b"GET" and words[1].split(b"?")[0] in (
                        b"/metrics", b"/"):
                    body = self.metrics.exposition()
                    head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; "
                            b"charset=utf-8\r\n")
                else:
                    body, head = b"only GET /metrics\n", b"HTTP/1.0 404 Not Found\r\n"
                conn.sendall(head + b"Content-Length: " + str(len(body)).encode()
                             + b"\r\nConnection: close\r\n\r\n" + body)
                self.served += 1
            except OSError:
                return

    def close(self) -> None:
        self._sock.close()
