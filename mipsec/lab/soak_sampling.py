"""What a soak run samples every ``sample_s``: each daemon's RSS, open fds, CPU time and time
waiting for a CPU (from ``/proc``), what the kernel of its namespace dropped because a reader
was too slow (sockets, interfaces), its status counters (drops by reason, table sizes) and its
new timeline events; the same ``/proc`` figures of the other processes named (the CN's
stream, the delaying forwarder).  With ``memory``, also each daemon's ``memory`` reply
(``mipsec.io.memory``: under tracemalloc, the source lines that grew since the last sample).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from mipsec.io import control
from mipsec.lab.lab import Lab

MEMORY_TOP = 12                  # source lines per list in each sample's memory figures


def process_figures(pid: int) -> dict[str, Any]:
    """RSS (and its anonymous part: the process's own memory, not the pages of shared
    libraries it has touched), CPU time, time spent runnable but waiting for a CPU
    (``/proc/<pid>/schedstat``: a starved process shows here) and open fds."""
    out: dict[str, Any] = {"pid": pid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    out["rss_anon_kb"] = int(line.split()[1])
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / tick
        with open(f"/proc/{pid}/schedstat") as f:
            out["run_wait_s"] = int(f.read().split()[1]) / 1e9
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        out["gone"] = True
    return out


def kernel_drops(pid: int) -> dict[str, int]:
    """What the kernel of ``pid``'s network namespace dropped because a reader was too slow:
    raw sockets' receive-queue overflows (``/proc/net/raw``, by protocol), UDP receive-buffer
    errors (``/proc/net/snmp``) and per-interface drops (``/proc/net/dev``: a TUN device whose
    reader lags drops what the kernel routes into it).  Counters only grow: the analysis
    compares samples."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/net/raw") as f:
            for line in list(f)[1:]:
                cols = line.split()
                if len(cols) >= 13 and int(cols[-1]):
                    key = f"raw-{int(cols[1].split(':')[1], 16)}"
                    out[key] = out.get(key, 0) + int(cols[-1])
        with open(f"/proc/{pid}/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        if len(rows) >= 2:
            udp = dict(zip(rows[0][1:], rows[1][1:], strict=False))
            for name in ("RcvbufErrors", "InErrors"):
                if int(udp.get(name, 0)):
                    out[f"udp-{name}"] = int(udp[name])
        with open(f"/proc/{pid}/net/dev") as f:
            for line in list(f)[2:]:
                name, _, rest = line.partition(":")
                cols = rest.split()
                if len(cols) >= 12:
                    for key, value in ((f"{name.strip()}-rx-drop", int(cols[3])),
                                       (f"{name.strip()}-tx-drop", int(cols[11]))):
                        if value:
                            out[key] = value
    except (OSError, ValueError, IndexError):
        pass
    return out


def sizes_of(role: str, status: dict[str, Any]) -> dict[str, int]:
    node = status.get("node", {})
    sizes = dict(node.get("sizes", {}))
    if role == "ha":
        sizes["bindings"] = len(node.get("bindings", {}))
    return sizes


def counters_of(status: dict[str, Any]) -> dict[str, Any]:
    node = status.get("node", {})
    return {"drops": node.get("drops", {}), "sad_drops": node.get("sad_drops", {}),
            "io": {k: v for k, v in status.get("io", {}).items() if isinstance(v, (int, float))}}


def forwarder_drops(lab: Lab) -> dict[str, int]:
    """Frames the lab's delaying forwarder lost: its ports' receive queues full (it was not
    scheduled soon enough) or a send refused (its ``--stats`` file)."""
    try:
        with open(lab.path("delay-stats.json")) as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return {}
    return {f"delay-{k.replace('_', '-')}": int(v) for k, v in stats.items()
            if k != "forwarded" and int(v)}


class Sampler(threading.Thread):
    """Every ``period`` s: process figures, sizes and counters of each daemon; the timelines
    accumulate (deduplicated) so that nothing is missed if a daemon bounds its own.  Each
    daemon is asked only for the events since the newest one already seen (a whole copy of a
    long timeline costs the daemon memory and time)."""

    def __init__(self, lab: Lab, period: float, memory: bool = False,
                 namespaces: dict[str, int] | None = None):
        super().__init__(daemon=True)
        self.lab, self.period, self.memory = lab, period, memory
        self.namespaces = namespaces or {}     # more namespaces: name -> a process in it
        self.samples: list[dict[str, Any]] = []
        self.events: dict[tuple, dict[str, Any]] = {}
        self._since: dict[str, float] = {}
        self._stop = threading.Event()

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"time": time.monotonic(), "roles": {}}
        for role in self.lab.daemons:
            pid = self.lab.pid(role)
            fig: dict[str, Any] = process_figures(pid) if pid is not None else {"gone": True}
            if pid is not None:
                fig["kernel_drops"] = kernel_drops(pid)
            try:
                st = control.request(self.lab.socket(role), "status", 10.0)
                fig["sizes"] = sizes_of(role, st)
                fig.update(counters_of(st))
                since = self._since.get(role, 0.0)
                tl = control.request(self.lab.socket(role), f"timeline since {since!r}",
                                     10.0).get("timeline", [])
                for ev in tl:
                    key = (ev.get("time"), ev.get("node"), ev.get("kind"))
                    self.events.setdefault(key, ev)
                    self._since[role] = max(self._since.get(role, 0.0), ev.get("time", 0.0))
                if self.memory:
                    fig["memory"] = control.request(self.lab.socket(role),
                                                    f"memory top {MEMORY_TOP}", 30.0)
            except (OSError, ValueError) as exc:
                fig["status_error"] = str(exc)
            row["roles"][role] = fig
        row["namespaces"] = {name: {**process_figures(pid), "kernel_drops": kernel_drops(pid)}
                             for name, pid in self.namespaces.items()}
        if "rt" in row["namespaces"]:          # the forwarder's own sockets (mipsec.lab.delay)
            row["namespaces"]["rt"]["kernel_drops"].update(forwarder_drops(self.lab))
        self.samples.append(row)
        return row

    def run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._stop.set()

    def timeline(self) -> list[dict[str, Any]]:
        return sorted(self.events.values(), key=lambda e: e.get("time", 0.0))

