"""A role daemon's control socket commands (``mipsec status|timeline|handover|home|ping|
memory|reload``) and the configuration reload that SIGHUP also triggers."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from typing import Any

from mipsec.config import load_config
from mipsec.errors import ConfigError
from mipsec.io import logs
from mipsec.io import pcap as pcapmod
from mipsec.io.daemon_keys import esp_entries
from mipsec.io.daemon_state import DaemonState
from mipsec.node.actions import (
    CareOfAddressChanged,
    ReturnedHome,
)

log = logging.getLogger("mipsec.daemon")

STATUS_TIMELINE_EVENTS = 256   # status carries the latest events; `timeline` has them all


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)



class ControlCommands(DaemonState):
    """The answers to control commands, and reload."""

    def status(self) -> dict[str, Any]:
        try:
            node = self.role.status()
        except Exception as exc:
            log.exception("BUG: role.status() raised")
            node = {"error": f"status failed: {exc}"}
        return {
            "ok": True, "role": self.cfg.role, "name": self._name(), "pid": os.getpid(),
            "config": self.cfg.path, "tun": getattr(self.tun, "name", None),
            "control_socket": self.cfg.control_socket,
            "pcap": self.cfg.daemon.pcap or None, "keyfile": self.cfg.keyfile or None,
            "ike_keyfile": self._ike_keyfile,
            "clock": {"monotonic": self._loop.clock(), "wall": self._loop.wallclock()},
            "started": self.started_wall,
            "io": {**self._loop.stats, "tun_write_errors": getattr(self.tun, "write_errors", 0),
                   "tun_read_errors": getattr(self.tun, "read_errors", 0),
                   "receive_errors": {r.name: r.errors for r in self.receivers or ()
                                      if getattr(r, "errors", 0)}},
            "drops": {str(k): v for k, v in getattr(self.role, "drops", {}).items()},
            **({"ha_group": {
                "state": self.group.election.state.value, "identity": self.group.election.identity,
                "serving": self.serving, "standby_dropped": self.standby_dropped,
                "warm_keys": len(self.watcher_thread.kv), "revision": self.watcher_thread.revision,
                "watch_reconnects": self.watcher_thread.reconnects,
                "history": self.group.election.history[-16:]}}
               if self.group is not None else {}),
            **({"store": {"kind": self.cfg.daemon.store, "errors": self.store_errors,
                          "path": self.store_path() if self.cfg.daemon.store == "sqlite"
                          else None}} if self.store is not None else {}),
            **({"workers": self.worker_pool.status()} if self.worker_pool is not None else {}),
            "node": _jsonable(node),
            "timeline": self.timeline(STATUS_TIMELINE_EVENTS),
        }

    def timeline(self, last: int | None = None, since: float | None = None
                 ) -> list[dict[str, Any]]:
        """The role's timeline as JSON-able dicts; only the ``last`` events, or those stamped
        at or after ``since`` (monotonic seconds), when given.  Serialising a long-running
        daemon's whole timeline took seconds in the loop, and each whole copy raised the
        process's memory high-water mark with the timeline: pollers ask for what is new."""
        events = getattr(self.role, "timeline", [])
        if not isinstance(events, list):
            events = list(events)
        if since is not None:
            start = len(events)
            while start > 0 and events[start - 1].time >= since:
                start -= 1
            events = events[start:]
        if last is not None:
            events = events[-last:] if last > 0 else []
        return [_jsonable(ev) for ev in events]

    def _timeline_command(self, args: list[str]) -> dict[str, Any]:
        """``timeline`` (all), ``timeline last <n>``, ``timeline since <monotonic seconds>``."""
        kw: dict[str, Any] = {}
        try:
            if len(args) % 2:
                raise ValueError(args[-1])
            for key, value in zip(args[::2], args[1::2], strict=True):
                if key == "last":
                    kw["last"] = int(value)
                elif key == "since":
                    kw["since"] = float(value)
                else:
                    raise ValueError(key)
        except ValueError:
            return {"ok": False, "error": "usage: timeline [last <n>] [since <monotonic seconds>]"}
        return {"ok": True, "timeline": self.timeline(**kw),
                "clock": {"monotonic": self._loop.clock(), "wall": self._loop.wallclock()}}

    def handle_command(self, command: str, args: list[str]) -> dict[str, Any]:
        if command == "status":
            return self.status()
        if command == "timeline":
            return self._timeline_command(args)
        if command == "handover":
            if self.cfg.role != "mn":
                return {"ok": False, "error": "handover: only a mobile node moves"}
            if not args:
                return {"ok": False, "error": "usage: handover <care-of address> [interface]"}
            try:
                ipaddress.IPv4Address(args[0])
            except ValueError:
                return {"ok": False, "error": f"handover: not an IPv4 address: {args[0]!r}"}
            self._loop.feed_event(CareOfAddressChanged(args[0], args[1] if len(args) > 1 else None))
            return {"ok": True, "handover": args[0]}
        if command == "home":
            if self.cfg.role != "mn":
                return {"ok": False, "error": "home: only a mobile node returns home"}
            self._loop.feed_event(ReturnedHome(args[0] if args else self.cfg.daemon.home_interface
                                              or None))
            return {"ok": True}
        if command == "ping":
            return {"ok": True, "pid": os.getpid()}
        if command == "memory":
            return self.memory.command(args)
        if command == "reload":
            return self.reload()
        return {"ok": False, "error": f"unknown command {command!r} "
                                      f"(status, timeline, handover, home, ping, memory, reload)"}

    # --- reload ----------------------------------------------------------------------------------

    # [daemon] keys a running daemon takes from a new file; the others need a restart
    RELOADABLE_DAEMON_KEYS = frozenset({"log_level", "log_format"})

    def reload(self) -> dict[str, Any]:
        """SIGHUP / ``mipsec reload``: re-read the file and apply what changed (only that, see
        mipsec.node.reload).  A file that does not load, or a change that needs a restart, is
        refused with its message and the running configuration stays."""
        from mipsec.node.reload import NeedsRestart, reconfigure
        path = self.cfg.path
        try:
            new = load_config(path, require_private=True)
            if new.metrics != self.cfg.metrics:
                raise ConfigError(f"{path}: [metrics] changed: that needs a restart")
            if new.role != self.cfg.role:
                raise ConfigError(f"{path}: role: the file is now for {new.role!r}, the running "
                                  f"daemon is {self.cfg.role!r}")
            for f in dataclasses.fields(new.daemon):
                if f.name not in self.RELOADABLE_DAEMON_KEYS and \
                        getattr(new.daemon, f.name) != getattr(self.cfg.daemon, f.name):
                    raise ConfigError(f"{path}: [daemon] {f.name} changed: that needs a restart")
            actions, changes = reconfigure(self.role, new.node, self._loop.clock())
        except (ConfigError, NeedsRestart) as exc:
            message = str(exc) if str(exc).startswith(path) else f"{path}: {exc}"
            log.error("reload refused, the running configuration stays: %s", message)
            return {"ok": False, "error": f"reload refused: {message}"}
        old_daemon = self.cfg.daemon
        self.cfg = new
        try:
            self._attach_sequence_state()     # SAs a reload installed continue like the others
        except ConfigError as exc:
            log.error("%s", exc)
        if (new.daemon.log_level, new.daemon.log_format) != (old_daemon.log_level,
                                                             old_daemon.log_format):
            logs.configure(self.log_format_override or new.daemon.log_format,
                           self.log_level_override or new.daemon.log_level)
            changes.append("logging")
        if actions:
            self._loop.dispatch(actions)
        if new.keyfile and changes:
            added = [e for e in esp_entries(new) if e.spi not in self._esp_keys]
            if added:
                for entry in added:
                    self._esp_keys.add(entry.spi, entry.uat_line(), self._key_rotation)
                try:
                    pcapmod.write_esp_sa_file(new.keyfile,
                                              [line for line in self._esp_keys.lines() if line])
                except OSError as exc:
                    log.warning("key file %s: %s", new.keyfile, exc)
        log.info("%s %s reloaded %s: %s", new.role, self._name(), path,
                 "; ".join(changes) or "nothing changed")
        return {"ok": True, "changes": changes}
