"""Small shared helpers for the benchmarks (not part of the mipsec package): timing, and
``write_json`` for the ``--json FILE|-`` option.

A *batch* is a callable ``batch(n)`` that performs ``n`` operations itself, so every contender
pays the same tight ``for`` loop per operation.  A batch may also have a ``prepare(n)`` method,
called untimed before each timed run (e.g. a fresh inbound SA and ``n`` fresh packets, so that
the replay window accepts every one of them).

``interleaved`` times several batches round-robin for ``repeat`` rounds and keeps for each the
best (lowest) time per operation: on a shared machine the minimum is the figure least disturbed
by other processes, and interleaving spreads any slow period over every contender instead of
penalising one.  Timing uses ``time.perf_counter_ns`` with the garbage collector paused, or,
with ``clock=CPU_CLOCK``, the CPU time of the calling thread (``time.thread_time_ns``): for
CPU-bound work on a machine shared with other jobs, the time the thread was not running (another
process had the core) is then left out; that clock must not time anything that waits for I/O.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

Batch = Callable[[int], object]
WALL_CLOCK = time.perf_counter_ns
CPU_CLOCK = time.thread_time_ns


def time_batch_ns(batch: Batch, n: int, clock: Callable[[], int] = WALL_CLOCK) -> int:
    """Time of one ``batch(n)`` in nanoseconds (``prepare(n)`` first, untimed)."""
    prepare = getattr(batch, "prepare", None)
    if prepare is not None:
        prepare(n)
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        batch(n)
        return clock() - start
    finally:
        if enabled:
            gc.enable()


def calibrate(batch: Batch, target_ns: int, *, cap: int = 1_000_000,
              clock: Callable[[], int] = WALL_CLOCK) -> int:
    """Number of operations for which one batch takes about ``target_ns``."""
    n = 16
    while True:
        elapsed = time_batch_ns(batch, n, clock)
        if elapsed >= target_ns // 4 or n >= cap:
            break
        n *= 4
    per_op = max(elapsed / n, 1.0)
    return max(16, min(cap, int(target_ns / per_op)))


def interleaved(batches: Mapping[str, Batch], *, repeat: int, target_ns: int,
                clock: Callable[[], int] = WALL_CLOCK) -> dict[str, float]:
    """Best nanoseconds per operation for each named batch, measured round-robin."""
    sizes = {name: calibrate(batch, target_ns, clock=clock) for name, batch in batches.items()}
    best = {name: float("inf") for name in batches}
    for _ in range(repeat):
        for name, batch in batches.items():
            per_op = time_batch_ns(batch, sizes[name], clock) / sizes[name]
            if per_op < best[name]:
                best[name] = per_op
    return best


def write_json(target: str, data: Any) -> None:
    """The figures as JSON to the file ``target``, or to stdout when it is ``-``."""
    text = json.dumps(data, indent=1) + "\n"
    if target == "-":
        sys.stdout.write(text)
    else:
        with open(target, "w") as fh:
            fh.write(text)
