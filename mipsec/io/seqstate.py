"""Manual-key ESP SAs across restarts: the sequence numbers and replay windows on disk.

With keys from a configuration file, every start used to begin at sequence number 1 again.  With
AES-CBC that is no nonce problem (the IV is random; AEAD transforms are refused with manual
keys, docs/security.md §3.6), but the peer's anti-replay window remembers the highest number it
accepted: a restarted sender was dropped as a replay until it passed that number, so all traffic
to the peer was silently lost; and a restarted receiver accepted again the packets it had accepted
before (a replay).  The SA stays sans-I/O; this adapter keeps, per manual SA, in one state file
(JSON, mode 0600, written with ``mipsec.files.write_private``):

* **outbound**: ``reserved``, a number at least as high as every sequence number ever sent.  It is
  written *ahead*, in blocks of ``SEQ_PERSIST_BLOCK``, before the first packet of each block
  leaves (a wrapper around the SA's ``encapsulate`` compares one integer per packet).  On a
  restart the SA continues after ``reserved``: a jump of at most one block, never back.  A clean
  stop writes the exact last number (no jump).
* **inbound**: ``top``, the highest authenticated sequence number, written each time it has moved
  by a block and at a clean stop.  On a restart the window starts there with every bit set: the
  numbers up to ``top`` count as seen.  After a crash (no clean stop) up to one block of old
  packets could be accepted once more: the limit of writing in blocks.

Each entry is bound to its SA by direction, SPI and a fingerprint of the transforms and keys
(SHA-256), so a state file never applies to new keys.  A missing file is the first start; a file
that cannot be read or parsed is logged and ignored (the SA starts from the configuration).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from mipsec.files import write_private

log = logging.getLogger("mipsec.io.seqstate")

SEQ_PERSIST_BLOCK = 1 << 16     # tunable: sequence numbers per write (the restart jump at most)
STATE_VERSION = 1


def fingerprint(direction: str, spi: int, esp: Any) -> str:
    """Names one SA's keys without revealing them (``esp``: an EspSaConfig)."""
    h = hashlib.sha256()
    for part in (direction, f"{spi:08x}", esp.encryption, esp.integrity or ""):
        h.update(part.encode() + b"\0")
    h.update(bytes(esp.encryption_key) + b"\0" + bytes(esp.integrity_key or b""))
    return h.hexdigest()[:32]


class SequenceStore:
    """The state file of one daemon's manual SAs (see module doc)."""

    def __init__(self, path: str, block: int = SEQ_PERSIST_BLOCK):
        if block < 1:
            raise ValueError("block must be positive")
        self.path = path
        self.block = block
        self.entries: dict[str, dict[str, Any]] = {}
        self._out: dict[str, Any] = {}     # key -> outbound SA
        self._in: dict[str, Any] = {}      # key -> inbound SA
        self._guarded: set[int] = set()
        self.write_errors = 0
        self.loaded = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                data = json.load(f)
            if data.get("version") != STATE_VERSION or not isinstance(data.get("sas"), dict):
                raise ValueError(f"not a version {STATE_VERSION} state file")
            return {k: v for k, v in data["sas"].items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("sequence state %s ignored (%s): manual SAs start from their "
                        "configuration", self.path, exc)
            return {}

    def merge(self, paths: list[str]) -> None:
        """Take the highest numbers of other state files of this daemon too (a GW's worker
        processes each keep one for the SAs they hold: ``<name>.w<k>.seq.json``)."""
        for path in paths:
            for key, entry in SequenceStore(path, self.block).loaded.items():
                mine = self.loaded.setdefault(key, {})
                for field in ("reserved", "top"):
                    value = entry.get(field)
                    if isinstance(value, int) and value > mine.get(field, 0):
                        mine[field] = value

    def attach(self, pairs: list[tuple[Any, Any]]) -> None:
        """Apply the stored state to these (SA, EspSaConfig) pairs, reserve the first outbound
        block and write the file, all before any packet is sent; then guard each SA.  SAs
        already attached are skipped (a reload that installs new SAs calls this again)."""
        new = [(sa, esp) for sa, esp in pairs if id(sa) not in self._guarded]
        if not new:
            return
        for sa, esp in new:
            inbound = sa.direction.name == "INBOUND"
            key = f"{'in' if inbound else 'out'}:{sa.spi:08x}:" \
                  f"{fingerprint('in' if inbound else 'out', sa.spi, esp)}"
            stored = self.loaded.get(key, {})
            if inbound:
                top = stored.get("top", 0)
                if isinstance(top, int) and top > sa.replay.top:
                    sa.replay.top = top
                    sa.replay.bitmap = (1 << sa.replay.size) - 1   # everything up to top: seen
                    log.info("SA 0x%08x: replay window restored at %d", sa.spi, top)
                self.entries[key] = {"top": sa.replay.top}
                self._in[key] = sa
                self._guard_inbound(sa, key)
            else:
                reserved = stored.get("reserved", 0)
                if isinstance(reserved, int) and reserved > sa.sequence:
                    sa.sequence = reserved
                    log.info("SA 0x%08x: sequence numbers continue after %d", sa.spi, reserved)
                self.entries[key] = {"reserved": sa.sequence + self.block}
                self._out[key] = sa
                self._guard_outbound(sa, key)
            self._guarded.add(id(sa))
        self.write()

    def _guard_outbound(self, sa: Any, key: str) -> None:
        entry = self.entries[key]
        encapsulate: Callable[..., bytes] = sa.encapsulate

        def guarded(inner_ipv4: bytes, now: float = 0.0) -> bytes:
            if sa.sequence >= entry["reserved"]:
                # the next number is past the reservation: reserve a block on disk first
                entry["reserved"] = sa.sequence + self.block
                self.write()
            return encapsulate(inner_ipv4, now)

        sa.encapsulate = guarded

    def _guard_inbound(self, sa: Any, key: str) -> None:
        entry = self.entries[key]
        decapsulate: Callable[..., bytes] = sa.decapsulate
        replay = sa.replay

        def guarded(outer_ipv4: bytes, now: float = 0.0) -> bytes:
            inner = decapsulate(outer_ipv4, now)
            if replay.top >= entry["top"] + self.block:
                entry["top"] = replay.top
                self.write()
            return inner

        sa.decapsulate = guarded

    def write(self) -> bool:
        data = {"version": STATE_VERSION, "sas": self.entries}
        try:
            write_private(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
            return True
        except OSError as exc:
            self.write_errors += 1
            if self.write_errors == 1:
                log.error("sequence state %s: cannot write (%s): after a restart the peer may "
                          "drop this daemon's packets as replays", self.path, exc)
            return False

    def close(self) -> None:
        """A clean stop: the exact numbers (no jump on the next start)."""
        for key, sa in self._out.items():
            self.entries[key]["reserved"] = sa.sequence
        for key, sa in self._in.items():
            self.entries[key]["top"] = sa.replay.top
        if self.entries:
            self.write()


def worker_path(state_dir: str, name: str, index: int | str) -> str:
    """A GW worker process's own state file (``index`` ``*``: a glob of them all)."""
    return os.path.join(state_dir, f"{name}.w{index}.seq.json")


def default_path(config_path: str) -> str:
    """``gw.toml`` -> ``gw.toml.seq``, beside the configuration (a directory that survives a
    reboot, unlike /run)."""
    return os.fspath(config_path) + ".seq"
