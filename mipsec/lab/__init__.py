"""The network-namespace lab (``mipsec lab``): ``topology`` (namespaces, links, moves), ``lab``
(daemons, state, up/down), ``delay`` (the delaying forwarder), ``stream`` (UDP stream tool),
``demo`` (``mipsec lab demo``).  See docs/operations.md.
"""

from __future__ import annotations

import signal


def stop_on_signals() -> list[bool]:
    """For the lab's helper processes (``delay``, ``stream``): a flag their loops poll, set by
    SIGTERM (``mipsec lab down``) or SIGINT."""
    stop = [False]

    def handler(_signum, _frame):
        stop[0] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
