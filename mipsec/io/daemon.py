"""``mipsec mn|gw|ha``: a role on a TUN device and sockets, driven by one event loop.

The daemon does not fork the role's logic: it builds the same sans-I/O object the simulator
drives (``mipsec.node``) from the TOML file and wires it to the machine (docs/design.md,
"What net and tun mean"):

* MN.  TUN device: the home address on it while away, the home prefix routed into it.
  Receives raw ESP (50), UDP 4500 if UDP-encapsulated, UDP 434 (the direct RRP at home).
  Reacts to netlink: a new address on a visited interface -> ``CareOfAddressChanged``; an
  address in the home prefix -> ``ReturnedHome`` (TUN address and routes removed, gratuitous
  ARP).
* GW.  TUN device: ``ip rule iif <inside> lookup <table>``, table: default dev TUN (home-side
  traffic for care-of addresses goes to the role).  Receives raw ESP (50), UDP 4500 if any MN
  uses it, the UDP SIU port on the inside address.  ``RebindSa`` is logged (the key file uses
  ``*`` addresses and stays valid).
* HA.  TUN device: the home addresses of MNs away are routed into it.  Receives UDP 434, raw
  IP-in-IP (4), the UDP SIU port (the GWs' ACKs).  ``BindingChanged``: a host route into the
  TUN + proxy ARP + gratuitous ARP while away; removed at home.

Start-up validates everything first (file, keys, interfaces) and stops with one message on the
first problem.  SIGTERM / SIGINT stop the loop; shutdown removes the routes, rules, proxy-ARP
entries and addresses the daemon added, closes the TUN device (the kernel deletes it), the
sockets and the control socket.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from mipsec.config import DaemonConfig, check_runtime, load_config
from mipsec.errors import ConfigError
from mipsec.io import control, instance, logs, memory, netlink, transports
from mipsec.io import pcap as pcapmod
from mipsec.io import tun as tunmod
from mipsec.io.daemon_control import STATUS_TIMELINE_EVENTS, ControlCommands
from mipsec.io.daemon_kernel import KernelWiring, mn_tunnel_routes, siu_port
from mipsec.io.daemon_keys import CaptureKeys, esp_entries, read_key_lines, role_sas, sa_key_line
from mipsec.io.daemon_store import FENCED_EXIT_STATUS, HaStore
from mipsec.io.loop import EventLoop
from mipsec.node.actions import PersistBinding, ReserveSiuSequence
from mipsec.node.role import build_role

log = logging.getLogger("mipsec.daemon")

# the parts' names a caller of the daemon module uses
__all__ = ["FENCED_EXIT_STATUS", "STATUS_TIMELINE_EVENTS", "Daemon", "esp_entries", "make_role",
           "mn_tunnel_routes", "role_sas", "run_daemon", "sa_key_line", "siu_port"]


def make_role(cfg: DaemonConfig, wallclock=time.time, now: float | None = None) -> Any:
    """The sans-I/O role object for a configuration (the same classes the simulator uses).

    It gets the injected wall clock (MIPv4 identification) and ``now`` (the loop's monotonic
    clock: SA lifetimes start there); see ``mipsec.node.role``.
    """
    now = time.monotonic() if now is None else now
    if cfg.role == "gw" and cfg.daemon.workers:
        # the control process of a GW with worker processes (mipsec.io.gw_workers)
        from mipsec.node.gateway_worker import ControlGateway
        return ControlGateway(cfg.node, wallclock=wallclock, now=now)
    return build_role(cfg.role, cfg.node, wallclock=wallclock, now=now)



class Daemon(CaptureKeys, KernelWiring, HaStore, ControlCommands):
    """One role process.  ``start()`` then ``run()``; ``close()`` always (it is idempotent)."""

    # --- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        if self.manage_kernel:
            check_runtime(cfg)
        try:
            # one daemon per instance and per kernel resource; then what the machine must have
            instance.claim_instance(cfg, self.locks)
            if self.manage_kernel:
                instance.claim_kernel_resources(cfg, self.locks)
                instance.check_machine(cfg)
        except Exception:
            self.locks.release()
            raise
        try:
            # before the role is built, so that its tables are traced too (mipsec.io.memory)
            self.memory.start(memory.frames_from_env())
        except ValueError as exc:
            self.locks.release()
            raise ConfigError(str(exc)) from None
        if self.role is None:
            self.role = make_role(cfg)
        try:
            if cfg.role == "ha":
                self.store = self._open_store()
            self._start_io()
            if cfg.role == "ha" and cfg.daemon.ha_group:
                self._start_group()
        except Exception:
            self.close()
            raise

    def _start_io(self) -> None:
        cfg, d = self.cfg, self.cfg.daemon
        workers = d.workers if cfg.role == "gw" else 0
        if self.tun is None:
            # with workers: one TUN queue each, none read here (mipsec.io.gw_workers)
            self.tun = (tunmod.MultiQueueTun(d.tun, d.mtu, workers) if workers
                        else tunmod.LinuxTun(d.tun, d.mtu))
        if self.manage_kernel and cfg.role in ("gw", "ha"):
            # before any socket opens: what may be forwarded (docs/security.md §3.1)
            getattr(self, f"_protect_{cfg.role}")()
        if self.sender is None:
            self.sender = transports.RawSender()
        if self.receivers is None:
            try:
                self.receivers = self._open_receivers()
            except ConfigError as exc:    # a port in use: name the file (exit 2, no restart loop)
                raise ConfigError(f"{cfg.path}: {exc} (is another mipsec {cfg.role} running "
                                  f"on this machine?)") from None
        if d.pcap:
            self.pcap = pcapmod.PcapWriter(d.pcap, max_bytes=d.pcap_max_mb * 1_000_000,
                                           keep=d.pcap_keep)
        if cfg.keyfile:
            if self._uses_ike():
                # negotiated SAs of an earlier run of this daemon may still be in use by the
                # peer (a restart: the MN's packets on its old SA are in the capture too); its
                # capture is the rotated file -1
                for i, line in enumerate(read_key_lines(cfg.keyfile)):
                    self._esp_keys.add(("earlier", i), line, -1)
                # and the IKE SAs' keys beside them (ikev2_decryption_table), kept the same way
                self._ike_keyfile = pcapmod.ike_keyfile_path(cfg.keyfile)
                for i, line in enumerate(read_key_lines(self._ike_keyfile)):
                    self._ike_keys.add(("earlier", i), line, -1)
                pcapmod.write_ike_key_file(self._ike_keyfile, self._ike_keys.lines())
            for entry in esp_entries(cfg):
                self._esp_keys.add(entry.spi, entry.uat_line(), 0)
            pcapmod.write_esp_sa_file(cfg.keyfile, self._esp_keys.lines())
        self._attach_sequence_state()      # before the first packet can be sent
        self.loop = EventLoop(self.role, tun=None if workers else self.tun, sender=self.sender,
                              receivers=self.receivers, name=f"{cfg.role}:{self._name()}",
                              pcap=self.pcap)
        if cfg.keyfile and getattr(self.role, "ike", None) is not None:
            # IKEv2: rewrite the key file whenever SAs appear, keeping every SA the kept
            # capture files may hold, so the whole capture decrypts (docs/operations.md
            # "Captures"); SAs of capture files already rotated away leave it
            self._loop.after_dispatch.append(self._update_keyfile)
        self.events = logs.RoleWatcher(
            self.role, f"{cfg.role}:{self._name()}",
            sas=role_sas if cfg.role in ("mn", "gw") else (lambda role: ()),
            recent=lambda: self._loop.last_received)
        self._loop.on_silent = self.events.on_silent
        self._loop.after_batch.append(self.events.after_batch)
        self._loop.hurry = self.events.wants_wakeup
        if cfg.metrics.listen:
            from mipsec.io import metrics
            role_metrics = metrics.RoleMetrics(
                cfg.role, self._name(), role=self.role, stats=lambda: self._loop.stats,
                sas=lambda: role_sas(self.role) if cfg.role in ("mn", "gw") else (),
                drops=self.events.drop_totals)
            self.events.observers.append(role_metrics.observe)
            try:
                self.metrics = metrics.MetricsServer(cfg.metrics.listen, role_metrics)
            except OSError as exc:
                raise ConfigError(f"{cfg.path}: [metrics] listen: cannot listen on "
                                  f"{cfg.metrics.listen}: {exc.strerror or exc}") from None
            self._loop.add_reader(self.metrics, lambda srv: srv.serve_one())
        if cfg.role == "gw":
            # The GW's capture is its outside: packets from or to its outside address (ESP and
            # UDP-encapsulated ESP), not the SIUs on the inside.
            outside = socket.inet_aton(cfg.node.outside_address)
            self._loop.pcap_filter = lambda p: p[12:16] == outside or p[16:20] == outside
        if cfg.role == "ha":
            self._loop.admit = self._admit
            self._loop.steps[PersistBinding] = self._persist
            self._loop.steps[ReserveSiuSequence] = self._reserve
        if self.manage_kernel:
            self.nl = netlink.Netlink()
            getattr(self, f"_setup_{cfg.role}")()
        if self.store is not None and not d.ha_group:
            self._restore_bindings()      # (a group member restores when it becomes active)
        if workers:     # running before the control socket answers (the GW is ready then)
            from mipsec.io.gw_workers import WorkerPool
            self.worker_pool = WorkerPool(self, workers, udp=self._nat_t_bind,
                                          tun_fds=self.tun.fds())
            self.worker_pool.start()
        self.control = control.ControlServer(cfg.control_socket, self.handle_command)
        self._loop.add_reader(self.control, lambda srv: srv.serve_one())
        if self.watcher is not None:
            self._loop.add_reader(self.watcher, self._on_netlink)
            for event in self.watcher.initial_events():
                self._loop.feed_event(event)

    def _on_netlink(self, watcher: netlink.AddressWatcher) -> None:
        for event in watcher.receive():
            log.info("netlink: %s", event)
            self._loop.feed_event(event)

    # --- run / close ---------------------------------------------------------------------------

    def run(self) -> str:
        self._loop.on_reload = self.reload
        self._loop.install_signal_handlers()
        log.info("%s %s running (pid %d, tun %s, control %s)", self.cfg.role, self._name(),
                 os.getpid(), self.tun.name, self.cfg.control_socket)
        reason = self._loop.run()
        log.info("%s %s stopping: %s", self.cfg.role, self._name(), reason)
        return reason

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # in this order, each step whatever the ones before did
        steps: list[Callable[[], object] | None] = [
            self.seqstore.close if self.seqstore else None,
            self.nl.undo_all if self.nl else None,
            self.forward_filter.remove if self.forward_filter else None,
            self.sysctls.restore,
            self.nl.close if self.nl else None,
            self.watcher.close if self.watcher else None,
            self.announcer.close if self.announcer else None,
            self.worker_pool.close if self.worker_pool else None,
            self.control.close if self.control else None,
            self.metrics.close if self.metrics else None,
            self.loop.close if self.loop else None,
            *(r.close for r in self.receivers or ()),
            self.sender.close if self.sender else None,
            self.tun.close if self.tun else None,
            self.pcap.close if self.pcap else None,
            self.store.close if self.store else None,
            self.locks.release]
        for closer in steps:
            if closer is None:
                continue
            try:
                closer()
            except Exception as exc:
                log.warning("shutdown step failed: %s", exc)


def run_daemon(config_path: str, expected_role: str, log_level: str | None = None,
               log_format: str | None = None) -> int:
    """Entry point of ``mipsec mn|gw|ha``: exit status 0 on a clean stop, 2 on bad config."""
    try:
        cfg = load_config(config_path, require_private=True)
        if cfg.role != expected_role:
            raise ConfigError(f"{config_path}: role: the file is for {cfg.role!r}, "
                              f"not {expected_role!r}")
    except ConfigError as exc:
        logging.getLogger("mipsec").error("%s", exc)
        return 2
    logs.configure(log_format or cfg.daemon.log_format, log_level or cfg.daemon.log_level)
    daemon = Daemon(cfg)
    daemon.log_level_override, daemon.log_format_override = log_level, log_format
    try:
        daemon.start()
    except ConfigError as exc:
        logging.getLogger("mipsec").error("%s", exc)
        daemon.close()
        return 2
    except OSError as exc:     # not root, a port in use, /dev/net/tun missing ...
        logging.getLogger("mipsec").error("%s: cannot start the %s daemon: %s (it needs root, or "
                                          "CAP_NET_ADMIN and CAP_NET_RAW)", config_path,
                                          cfg.role, exc)
        daemon.close()
        return 1
    try:
        daemon.run()
    finally:
        daemon.close()
    return daemon.exit_status
