"""Where a daemon's memory goes: the ``memory`` control command.

A daemon left running for days must not grow.  When it does, the resident set size alone does
not say why, so ``mipsec memory`` (the control command ``memory [top <n>]``) answers with:

* ``rss_kb`` / ``rss_peak_kb`` (``/proc/self/status``), the interpreter's allocated blocks and
  the garbage collector's generation counts;
* with ``MIPSEC_TRACEMALLOC=<frames>`` in the daemon's environment (tracemalloc started before
  the role is built, ``frames`` deep): the traced total and peak, the ``n`` source lines that
  hold the most, and the ``n`` that grew most since the previous ``memory`` command (the first
  one compares with the snapshot taken when tracing started).  Asked at intervals under load,
  the growing lines name the structure that keeps what it should not.

Tracing costs time on every allocation, and a ``memory`` command holds the event loop while it
takes and compares the snapshots (on the order of a second; packets queue meanwhile): it is
for finding a leak, not for production.  Snapshots leave out tracemalloc's own frames and the
import machinery.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from typing import Any

ENV_VAR = "MIPSEC_TRACEMALLOC"
DEFAULT_TOP = 15
MAX_TOP = 200
MAX_FRAMES = 64
_FILTERS = (tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
            tracemalloc.Filter(False, "<unknown>"))


def frames_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """The traceback depth ``MIPSEC_TRACEMALLOC`` asks for (0: not set, no tracing)."""
    value = environ.get(ENV_VAR, "").strip()
    if not value:
        return 0
    try:
        frames = int(value)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={value!r}: a number of frames (1-{MAX_FRAMES})") from None
    if not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"{ENV_VAR}={value!r}: a number of frames (1-{MAX_FRAMES})")
    return frames


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _where(stat: Any) -> str:
    """``file:line`` of a statistic, innermost first (at most four frames)."""
    return " <- ".join(f"{_short(fr.filename)}:{fr.lineno}" for fr in list(stat.traceback)[:4])


def _short(filename: str) -> str:
    """A source path from its package directory on (``mipsec/node/timeline.py``)."""
    for marker in (f"{os.sep}site-packages{os.sep}", f"{os.sep}lib{os.sep}python"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    parts = filename.split(os.sep)
    return os.sep.join(parts[parts.index("mipsec"):]) if "mipsec" in parts else filename


class MemoryProbe:
    """The daemon's memory figures; ``start`` begins tracing (once, at start-up)."""

    def __init__(self) -> None:
        self._previous: tracemalloc.Snapshot | None = None
        self.frames = 0

    def start(self, frames: int) -> None:
        if frames <= 0:
            return
        self.frames = frames
        if not tracemalloc.is_tracing():
            tracemalloc.start(frames)
        self._previous = self._snapshot()

    @staticmethod
    def _snapshot() -> tracemalloc.Snapshot:
        return tracemalloc.take_snapshot().filter_traces(_FILTERS)

    def report(self, top: int = DEFAULT_TOP) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": True, "rss_kb": _proc_status_kb("VmRSS"), "rss_peak_kb": _proc_status_kb("VmHWM"),
            "allocated_blocks": sys.getallocatedblocks(), "gc_counts": list(gc.get_count()),
            "gc_frozen": gc.get_freeze_count(), "tracing": tracemalloc.is_tracing()}
        if not tracemalloc.is_tracing():
            out["hint"] = f"start the daemon with {ENV_VAR}=<frames> to see where it allocates"
            return out
        group = "traceback" if self.frames > 1 else "lineno"
        current, peak = tracemalloc.get_traced_memory()
        snap = self._snapshot()
        out.update(traced_kb=current // 1024, traced_peak_kb=peak // 1024, frames=self.frames,
                   top=[{"where": _where(s), "kb": round(s.size / 1024, 1), "count": s.count}
                        for s in snap.statistics(group)[:top]])
        if self._previous is not None:
            diff = [d for d in snap.compare_to(self._previous, group) if d.size_diff > 0]
            diff.sort(key=lambda d: d.size_diff, reverse=True)
            out["grown"] = [{"where": _where(d), "kb_diff": round(d.size_diff / 1024, 1),
                             "kb": round(d.size / 1024, 1), "count_diff": d.count_diff}
                            for d in diff[:top]]
        self._previous = snap
        return out

    def command(self, args: list[str]) -> dict[str, Any]:
        """``memory`` / ``memory top <n>``."""
        top = DEFAULT_TOP
        if args:
            if len(args) != 2 or args[0] != "top" or not args[1].isdigit() \
                    or not 1 <= int(args[1]) <= MAX_TOP:
                return {"ok": False, "error": f"usage: memory [top <1-{MAX_TOP}>]"}
            top = int(args[1])
        return self.report(top)
