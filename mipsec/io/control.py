"""The daemon's control socket: a Unix stream socket that answers one command per connection.

Protocol: the client sends one line (``status``, ``timeline``, ``handover <care-of address>
[<interface>]``, ``home [<interface>]``), the daemon answers with one JSON document and a newline
and closes.  A reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.

The server runs inside the daemon's event loop: it is registered with the selector, and a
readable listening socket means one client to serve.  A client gets ``CLIENT_TIMEOUT_S`` to send
its line; commands are tiny, so serving them inline keeps the loop single-threaded.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

CLIENT_TIMEOUT_S = 1.0
MAX_REQUEST_BYTES = 4096

Handler = Callable[[str, list[str]], dict[str, Any]]


class ControlServer:
    def __init__(self, path: str, handler: Handler):
        self.path = path
        self.handler = handler
        self.name = "control"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            if _alive(path):
                raise FileExistsError(f"{path}: another daemon is listening there")
            os.unlink(path)           # stale, left by a killed daemon
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(8)
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve_one(self) -> None:
        conn = accept_client(self._sock)
        if conn is None:
            return
        with conn:
            try:
                data = read_request(conn, (b"\n",), MAX_REQUEST_BYTES)
            except OSError:
                return
            request = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
            words = request.split()
            if not words:
                reply: dict[str, Any] = {"ok": False, "error": "empty command"}
            else:
                try:
                    reply = self.handler(words[0], words[1:])
                except Exception as exc:  # a bad command must not take the daemon down
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            try:
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def accept_client(listening: socket.socket) -> socket.socket | None:
    """The next client of a non-blocking listening socket, given ``CLIENT_TIMEOUT_S`` to send
    its request; None when no client is waiting after all."""
    try:
        conn, _ = listening.accept()
    except (BlockingIOError, InterruptedError):
        return None
    conn.settimeout(CLIENT_TIMEOUT_S)
    return conn


def read_request(conn: socket.socket, ends: tuple[bytes, ...], limit: int) -> bytes:
    """What the client sends until one of ``ends`` is in it, it closes, or ``limit`` bytes came."""
    data = b""
    while not any(end in data for end in ends) and len(data) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def request(path: str, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to a daemon's control socket and return its JSON reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
