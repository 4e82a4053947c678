"""A GW daemon's data-plane worker processes (``[daemon] workers = N``), control side.

The control process (``mipsec gw``) opens every kernel object the workers use, in an order
that makes the kernel's split right, and hands each worker its own (``pass_fds``):

* a multi-queue TUN device, one queue per worker (the control reads none);
* one raw ESP socket per worker with ``bpf.esp_shard_filter(N, k)``: worker k sees the SPIs
  ``spi % N == k``;
* with UDP 4500 (IKE's NAT-T or ESP in UDP): the control's socket binds first, then one per
  worker in index order, all ``SO_REUSEPORT``, and ``bpf.udp_shard_selector(N)`` on the group:
  IKE and keepalives to the control, ESP to socket ``1 + spi % N``.  The control keeps its
  copy of each worker's descriptors, so a socket's place in the group never changes;
* a SOCK_SEQPACKET pair per worker for the messages (``mipsec.node.gw_worker_messages``), a
  SOCK_DGRAM pair per two workers for the downlink packets one reads for the other.

The role's results reach the workers before they are carried out (the loop's ``admit``):
an SA IKE has just installed is in its worker before the IKE_AUTH response leaves, an SIU's
re-point before the Registration Reply is encrypted (``SendOnWorker``).  Timers (a re-keyed
SA's grace period ending) are synchronised after the wake-up that ran them, everything at least
once a second.  Each comparison looks at every MN (a tuple comparison for an unchanged one):
its cost grows with the GW's MNs (docs/operations.md §1.3).

A worker that dies ends the GW: the control process logs which one and how, stops, and exits
with ``WORKER_DIED_EXIT_STATUS`` (the service manager restarts the whole GW).  Re-installing
its SAs in a new worker would start their sequence counters again from the control's copy
(never used for a packet), reusing sequence numbers and, with AES-GCM, nonces
(docs/operations.md "Worker processes").
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from mipsec.constants import IPPROTO_ESP
from mipsec.errors import ConfigError, ParseError
from mipsec.io import bpf
from mipsec.node import gw_worker_messages as wm
from mipsec.node.actions import SendOnWorker
from mipsec.node.gateway_worker import ControlGateway, WorkerSync

log = logging.getLogger("mipsec.daemon")

WORKER_DIED_EXIT_STATUS = 4    # a worker process ended: the whole GW stops (module doc)
WORKER_STOP_WAIT_S = 3.0       # at shutdown: SIGTERM, then SIGKILL after this
FULL_SYNC_EVERY_S = 1.0        # the control compares all its MNs with the workers' at least
WORKER_START_TIMEOUT_S = 60.0  # each worker reports once within this at start (a loaded host)
MESSAGE_MAX_BYTES = 65536      # one control <-> worker record at most


def open_reuseport_udp(address: str, port: int) -> socket.socket:
    """A UDP socket bound to (address, port) in an SO_REUSEPORT group, IP_PKTINFO on (as
    ``transports.UdpReceiver`` needs)."""
    from mipsec.io.transports import IP_PKTINFO
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    try:
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind UDP {address}:{port}: {exc}") from exc
    return sock


class Worker:
    """One worker process as the control sees it."""

    def __init__(self, index: int, channel: socket.socket, fds: dict[str, Any]):
        self.index = index
        self.channel = channel               # our end of the message pair
        self.fds = fds                       # what the worker gets (kept open here too)
        self.proc: subprocess.Popen[bytes] | None = None
        self.report: dict[str, Any] = {}
        self.report_at: float | None = None
        self.name = f"worker-{index}"

    def fileno(self) -> int:
        return self.channel.fileno()


class WorkerPool:
    """N workers: their kernel objects, processes, messages and status (module doc)."""

    def __init__(self, daemon: Any, workers: int, *, udp: tuple[str, int] | None,
                 tun_fds: list[int]):
        self.daemon = daemon
        self.n = workers
        role = daemon.role
        if not isinstance(role, ControlGateway):
            raise ConfigError("workers: the GW role must be the control process's")
        self.role: ControlGateway = role
        self.sync = WorkerSync(workers)
        if role.ike is not None:
            role.ike.endpoint.esp_spi_policy = self.sync.esp_spi
        self.stopping = False
        self._forwarding_rrq = False
        self._timers_seen = -1
        self._next_full_sync = 0.0
        self._closers: list[Any] = []
        self.workers: list[Worker] = []
        udp_socks = []
        if udp is not None:
            udp_socks = [open_reuseport_udp(*udp) for _ in range(workers)]
            self._closers += udp_socks
            bpf.attach(udp_socks[0], bpf.udp_shard_selector(workers), reuseport=True)
        handoff: dict[tuple[int, int], socket.socket] = {}
        for i in range(workers):
            for j in range(i + 1, workers):
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                handoff[(i, j)], handoff[(j, i)] = a, b
                self._closers += [a, b]
        for k in range(workers):
            esp = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ESP)
            self._closers.append(esp)
            bpf.attach(esp, bpf.esp_shard_filter(workers, k))
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._closers += [ours, theirs]
            fds = {"tun": tun_fds[k], "esp": esp.fileno(), "channel": theirs.fileno(),
                   "udp": udp_socks[k].fileno() if udp_socks else None,
                   "handoff": {str(j): handoff[(k, j)].fileno()
                               for j in range(workers) if j != k}}
            ours.setblocking(False)
            self.workers.append(Worker(k, ours, fds))

    # --- processes ---------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.daemon.cfg
        for w in self.workers:
            pass_fds = [w.fds["tun"], w.fds["esp"], w.fds["channel"],
                        *([w.fds["udp"]] if w.fds["udp"] is not None else []),
                        *w.fds["handoff"].values()]
            argv = [sys.executable, "-m", "mipsec.io.gw_worker", cfg.path, str(w.index),
                    str(self.n), json.dumps(w.fds), self.daemon.tun.name,
                    self.daemon.log_level_override or cfg.daemon.log_level,
                    self.daemon.log_format_override or cfg.daemon.log_format]
            # its own session: a terminal's Ctrl-C reaches the control only, which stops it
            w.proc = subprocess.Popen(argv, pass_fds=pass_fds, start_new_session=True)
            log.info("gw worker %d started (pid %d)", w.index, w.proc.pid)
        loop = self.daemon.loop
        for w in self.workers:
            loop.add_reader(w, self._on_message)
        loop.admit = self.before_dispatch
        loop.after_batch.append(self.after_batch)
        loop.on_action[SendOnWorker] = self.send_on_worker
        self._flush_sync()
        self._wait_running()

    def _wait_running(self) -> None:
        """Until every worker has reported once (it runs), so the GW is ready when its control
        socket answers; a worker that ends or stays silent stops the start."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while any(w.report_at is None for w in self.workers):
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None:
                    raise ConfigError(f"gw worker {w.index} ended at start (exit status "
                                      f"{w.proc.returncode}): see its log lines above")
            if time.monotonic() > deadline:
                raise ConfigError(f"gw workers did not start within {WORKER_START_TIMEOUT_S:.0f} s")
            self.daemon.loop.run_once(0.05)

    def _send(self, k: int, msg: wm.Message) -> None:
        w = self.workers[k]
        try:
            w.channel.send(wm.encode(msg))
        except (BlockingIOError, InterruptedError):
            # the worker does not read (stuck): its SAs would diverge from the control's
            self._died(w, "its message queue is full")
        except OSError as exc:
            self._died(w, f"its channel failed: {exc}")

    def _flush_sync(self) -> None:
        for k, msg in self.sync.messages(self.role):
            for target in (range(self.n) if k is None else (k,)):
                self._send(target, msg)

    # --- loop hooks --------------------------------------------------------------------------

    def before_dispatch(self, actions: list[Any]) -> bool:
        if not self._forwarding_rrq:
            self._flush_sync()
        return True

    def after_batch(self, now: float) -> None:
        # timers change SAs without a result to dispatch (a grace period ends): compare then,
        # and once a second whatever happened (a reload)
        timers = self.daemon.loop.stats["timers"]
        if timers != self._timers_seen or now >= self._next_full_sync:
            self._timers_seen = timers
            self._next_full_sync = now + FULL_SYNC_EVERY_S
            self._flush_sync()
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None and not self.stopping:
                self._died(w, f"exit status {w.proc.returncode}")

    def send_on_worker(self, action: SendOnWorker) -> None:
        k = self.sync.worker_of_mobile(action.home_address)
        if k is None:
            log.warning("no worker holds %s's SA: packet not sent", action.home_address)
            return
        to = action.to or (None, None)
        self._send(k, wm.SendInner(action.home_address, action.packet, to[0], to[1]))

    def _on_message(self, w: Worker) -> None:
        for _ in range(64):
            try:
                record = w.channel.recv(MESSAGE_MAX_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._died(w, f"its channel failed: {exc}")
                return
            if not record:
                self._died(w, "it closed its channel")
                return
            try:
                msg = wm.decode(record)
            except ParseError as exc:
                log.error("BUG: gw worker %d sent a bad message: %s", w.index, exc)
                continue
            if isinstance(msg, wm.Report):
                w.report, w.report_at = msg.status, time.monotonic()
            elif isinstance(msg, wm.RrqSeen):
                loop = self.daemon.loop
                try:
                    actions = self.role.rrq_seen(msg, loop.clock())
                except Exception:
                    log.exception("BUG: rrq_seen raised")
                    continue
                if actions:
                    # a forwarded request changes no SA: no comparison with the workers
                    self._forwarding_rrq = True
                    try:
                        loop.dispatch(actions)
                    finally:
                        self._forwarding_rrq = False
            else:
                log.error("BUG: gw worker %d sent %s", w.index, type(msg).__name__)

    def _died(self, w: Worker, how: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        code = w.proc.poll() if w.proc is not None else None
        log.error("gw worker %d (pid %s) ended: %s%s; the GW stops (exit status %d): its SAs' "
                  "sequence numbers were in that process only", w.index,
                  w.proc.pid if w.proc else "?", how,
                  f" (exit status {code})" if code is not None else "", WORKER_DIED_EXIT_STATUS)
        self.daemon.exit_status = WORKER_DIED_EXIT_STATUS
        self.daemon.loop.stop(f"gw worker {w.index} ended")

    # --- status and shutdown ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        rows = []
        totals: dict[str, int] = {}
        drops: dict[str, int] = {}
        for w in self.workers:
            rep = w.report
            for key in ("packets_up", "packets_down", "handoffs_out", "handoffs_in",
                        "from_tun", "to_tun", "from_net", "to_net", "send_errors", "bugs"):
                totals[key] = totals.get(key, 0) + int(rep.get(key, 0))
            for table in ("drops", "sad_drops"):
                for reason, count in rep.get(table, {}).items():
                    drops[reason] = drops.get(reason, 0) + count
            rows.append({"index": w.index, "pid": w.proc.pid if w.proc else None,
                         "alive": w.proc is not None and w.proc.poll() is None,
                         "report_age_s": round(now - w.report_at, 3) if w.report_at else None,
                         **rep})
        return {"count": self.n, "totals": totals, "drops": drops, "workers": rows,
                "off_shard": self.sync.off_shard}

    def close(self) -> None:
        self.stopping = True
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + WORKER_STOP_WAIT_S
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("gw worker pid %d did not stop: killed", p.pid)
                p.kill()
                p.wait()
        for w in self.workers:
            w.channel.close()
        for sock in self._closers:
            sock.close()
        self._closers = []
