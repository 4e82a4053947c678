"""One data-plane worker process of a GW (``[daemon] workers = N``): ``python -m
mipsec.io.gw_worker CONFIG INDEX N FDS TUN LEVEL FORMAT``, started by the control process
(``mipsec.io.gw_workers``) with its descriptors inherited.

It runs the ``GatewayWorker`` role in an ``EventLoop``: its TUN queue, its raw ESP socket (the
kernel gives it the SPIs ``spi % N == INDEX``), its UDP 4500 socket of the reuseport group, the
message channel to the control process and one hand-off socket per other worker.  It applies
the control's messages in order, and before the packets of the same wake-up (an SA the
control installed before its IKE_AUTH response left is there for the MN's first ESP packet);
it sends Registration Requests to the control (``RrqSeen``), hands downlink packets of other
workers' MNs to them, and reports its counters every ``WORKER_REPORT_INTERVAL_S``.  It stops
when the control process closes the channel (or is gone) and on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import time
from typing import Any

from mipsec.config import load_config
from mipsec.constants import IPPROTO_ESP, NAT_T_PORT
from mipsec.errors import ParseError
from mipsec.io import logs, seqstate, transports
from mipsec.io.loop import EventLoop
from mipsec.io.tun import FdTun
from mipsec.node import gw_worker_messages as wm
from mipsec.node.actions import ForwardRrq, HandOff, SendToNet
from mipsec.node.gateway_worker import GatewayWorker

log = logging.getLogger("mipsec.gw_worker")

WORKER_REPORT_INTERVAL_S = 0.5   # counters to the control process at most this often
MESSAGE_MAX_BYTES = 65536
HANDOFF_MAX_BYTES = 65535


class _Channel:
    """The message channel to the control process, as a loop source."""

    name = "control-channel"

    def __init__(self, fd: int):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()


class _HandOffIn:
    """Downlink packets another worker read for our MNs: a TUN-like source for the loop."""

    def __init__(self, peer: int, fd: int):
        self.name = f"handoff-from-{peer}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM, fileno=fd)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bytes | None:
        try:
            return self.sock.recv(HANDOFF_MAX_BYTES)
        except (BlockingIOError, InterruptedError):
            return None


class WorkerProcess:
    def __init__(self, config_path: str, index: int, workers: int, fds: dict[str, Any],
                 tun_name: str):
        cfg = load_config(config_path)
        self.index = index
        self.role = GatewayWorker(cfg.node, index, workers, now=time.monotonic())
        self.channel = _Channel(fds["channel"])
        self.tun = FdTun(fds["tun"], tun_name)
        self.handoff = {int(k): _HandOffIn(int(k), fd) for k, fd in fds["handoff"].items()}
        receivers: list[Any] = [transports.RawReceiver(
            IPPROTO_ESP, "esp", sock=socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ESP,
                                                   fileno=fds["esp"]))]
        if fds.get("udp") is not None:
            receivers.append(transports.UdpReceiver(
                NAT_T_PORT, cfg.node.outside_address, name="esp-udp", udp_checksum=False,
                sock=socket.socket(socket.AF_INET, socket.SOCK_DGRAM, fileno=fds["udp"])))
        self.sender = transports.RawSender()
        self.loop = EventLoop(self.role, tun=self.tun, sender=self.sender, receivers=receivers,
                              name=f"gw:{cfg.node.name}:worker{index}")
        self.receivers = receivers
        self.loop.add_reader(self.channel, self._on_channel)
        # the control's messages before any packet of the same wake-up (module doc)
        self.loop.before_ready.append(lambda: self._on_channel(self.channel))
        for source in self.handoff.values():
            self.loop.add_reader(source, self._on_handoff)
        self.loop.on_action[ForwardRrq] = self._forward_rrq
        self.loop.on_action[HandOff] = self._hand_off
        self.loop.after_batch.append(self._maybe_report)
        self._next_report = 0.0
        self.handoff_errors = 0
        # manual keys: the sequence numbers and replay windows of the SAs held here, on disk
        # (mipsec.io.seqstate; the control process merges these files at its next start)
        self.seqstore: seqstate.SequenceStore | None = None
        self._manual = {m.home_address: m for m in cfg.node.mobiles if m.esp_in is not None}
        if cfg.daemon.sa_source == "manual" and self._manual:
            self.seqstore = seqstate.SequenceStore(
                seqstate.worker_path(cfg.daemon.state_dir, cfg.node.name, index))

    # --- control channel ---------------------------------------------------------------------

    def _on_channel(self, channel: _Channel) -> None:
        for _ in range(256):
            try:
                record = channel.sock.recv(MESSAGE_MAX_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.loop.stop(f"control channel failed: {exc}")
                return
            if not record:
                self.loop.stop("the control process is gone")
                return
            try:
                msg = wm.decode(record)
            except ParseError as exc:
                log.error("BUG: worker %d: bad control message: %s", self.index, exc)
                continue
            now = self.loop.clock()
            try:
                actions = self.role.apply(msg, now)
            except Exception:
                self.loop.stats["bugs"] += 1
                log.exception("BUG: worker %d: applying %s failed", self.index,
                              type(msg).__name__)
                continue
            if self.seqstore is not None and isinstance(msg, wm.InstallPair):
                self._guard_sequence(msg.home_address)
            if actions:
                self.loop.dispatch(actions)

    def _guard_sequence(self, home: str) -> None:
        """A manual-key MN's SAs: continue from (and keep writing) the numbers on disk."""
        m, mobile = self._manual.get(home), self.role.mobiles.get(home)
        if self.seqstore is None or m is None or mobile is None:
            return
        pairs = [(mobile.inbound, m.esp_in), (mobile.outbound, m.esp_out)]
        self.seqstore.attach([(sa, esp) for sa, esp in pairs if esp is not None
                              and sa.spi == esp.spi])

    def _send_control(self, msg: wm.Message) -> None:
        try:
            self.channel.sock.send(wm.encode(msg))
        except OSError as exc:
            self.loop.stop(f"control channel failed: {exc}")

    def _forward_rrq(self, action: ForwardRrq) -> None:
        self._send_control(wm.RrqSeen(action.spi, action.source, action.port, action.packet))

    # --- hand-off between workers ------------------------------------------------------------

    def _hand_off(self, action: HandOff) -> None:
        try:
            peer = self.handoff[action.worker]
            peer.sock.send(action.packet)
        except (KeyError, OSError):
            self.handoff_errors += 1

    def _on_handoff(self, source: _HandOffIn) -> None:
        now = self.loop.clock()
        role = self.role
        for _ in range(1024):
            packet = source.read()
            if packet is None:
                break
            try:
                out = role.handed_in(packet, now)
            except Exception:
                self.loop.stats["bugs"] += 1
                log.exception("BUG: worker %d: handed-in packet", self.index)
                continue
            if out is None:
                continue
            if out.__class__ is bytes:
                self.loop.dispatch([SendToNet(out)])
            elif isinstance(out, list):
                self.loop.dispatch(out)

    # --- status ------------------------------------------------------------------------------

    def _maybe_report(self, now: float) -> None:
        if now < self._next_report:
            return
        self._next_report = now + WORKER_REPORT_INTERVAL_S
        status = self.role.report()
        status.update(self.loop.stats)
        status["handoff_errors"] = self.handoff_errors
        status["tun_write_errors"] = self.tun.write_errors
        status["receive_errors"] = sum(r.errors for r in self.receivers)
        self._send_control(wm.Report(self.index, status))

    def run(self) -> str:
        self.loop.install_signal_handlers()
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # the control process decides
        log.info("gw worker %d running", self.index)
        try:
            return self.loop.run()
        finally:
            if self.seqstore is not None:
                self.seqstore.close()        # the exact numbers: no jump at the next start
            self.loop.close()
            for r in self.receivers:
                r.close()
            self.sender.close()
            self.tun.close()


def main(argv: list[str]) -> int:
    config_path, index, workers, fds, tun_name, level, fmt = argv
    logs.configure(fmt, level)
    proc = WorkerProcess(config_path, int(index), int(workers), json.loads(fds), tun_name)
    reason = proc.run()
    log.info("gw worker %s stopping: %s", index, reason)
    return 0


if __name__ == "__main__":
    logging.basicConfig(format=logs.TEXT_FORMAT)
    sys.exit(main(sys.argv[1:]))
