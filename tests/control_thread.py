"""A ``ControlServer`` answering in a background thread, for the tests that talk to it as a
client (``mipsec status``, ``control.request``) while no daemon loop runs."""

from __future__ import annotations

import contextlib
import select
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def serving(server: Any) -> Iterator[Any]:
    """Serve ``server`` until the block ends, then stop and join the thread (the caller closes
    the server)."""
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            if select.select([server], [], [], 0.05)[0]:
                server.serve_one()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        done.set()
        thread.join()
