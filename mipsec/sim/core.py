"""The simulator's virtual clock and event queue.

Time is a float in seconds starting at 0.0; nothing here reads a real clock.  Events scheduled for
the same instant run in the order they were scheduled (a sequence number breaks ties), so a run is
a deterministic function of its inputs and the seed of ``Simulator.rng``.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from typing import Any


class Simulator:
    """A discrete-event loop: ``at``/``after`` schedule callbacks, ``run`` executes them in order."""

    def __init__(self, seed: int = 0):
        self.now = 0.0
        self.rng = random.Random(seed)
        self._queue: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.events_run = 0

    def at(self, time: float, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` at virtual ``time`` (never earlier than now)."""
        if time < self.now:
            time = self.now
        heapq.heappush(self._queue, (time, next(self._seq), callback, args))

    def after(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + delay_s, callback, *args)

    def pending(self) -> int:
        return len(self._queue)

    def run(self, until: float | None = None, max_events: int | None = None) -> float:
        """Run events up to and including time ``until`` (all of them if None); return ``now``.

        With ``until`` given the clock ends exactly at ``until`` even when the queue empties first.
        """
        queue = self._queue
        pop = heapq.heappop
        budget = max_events
        while queue and (until is None or queue[0][0] <= until):
            if budget is not None:
                if budget <= 0:
                    break
                budget -= 1
            time, _, callback, args = pop(queue)
            self.now = time
            self.events_run += 1
            callback(*args)
        if until is not None and self.now < until and (budget is None or budget > 0):
            self.now = until
        return self.now

    def run_for(self, duration_s: float) -> float:
        return self.run(until=self.now + duration_s)

    def run_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Run event by event until ``predicate()`` holds or ``timeout_s`` of virtual time passed."""
        deadline = self.now + timeout_s
        while not predicate():
            if not self._queue or self._queue[0][0] > deadline:
                self.now = max(self.now, deadline)
                return predicate()
            self.run(max_events=1)
        return True
