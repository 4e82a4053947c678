"""What a soak run samples every ``sample_s``: each daemon's RSS, open fds and CPU time (from
``/proc``), its status counters (drops by reason, table sizes) and its new timeline events;
with ``memory``, also each daemon's ``memory`` reply (``mipsec.io.memory``: with the daemons
started under tracemalloc, the source lines that grew since the previous sample).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from mipsec.io import control
from mipsec.lab.lab import Lab

MEMORY_TOP = 12                  # source lines per list in each sample's memory figures


def process_figures(pid: int) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": pid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / tick
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        out["gone"] = True
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


class Sampler(threading.Thread):
    """Every ``period`` s: process figures, sizes and counters of each daemon; the timelines
    accumulate (deduplicated) so that nothing is missed if a daemon bounds its own.  Each
    daemon is asked only for the events since the newest one already seen (a whole copy of a
    long timeline costs the daemon memory and time)."""

    def __init__(self, lab: Lab, period: float, memory: bool = False):
        super().__init__(daemon=True)
        self.lab, self.period, self.memory = lab, period, memory
        self.samples: list[dict[str, Any]] = []
        self.events: dict[tuple, dict[str, Any]] = {}
        self._since: dict[str, float] = {}
        self._stop = threading.Event()

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"time": time.monotonic(), "roles": {}}
        for role in self.lab.daemons:
            pid = self.lab.pid(role)
            fig: dict[str, Any] = process_figures(pid) if pid is not None else {"gone": True}
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
        self.samples.append(row)
        return row

    def run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._stop.set()

    def timeline(self) -> list[dict[str, Any]]:
        return sorted(self.events.values(), key=lambda e: e.get("time", 0.0))

