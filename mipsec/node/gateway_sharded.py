"""The GW with worker processes, in one object: the simulator's and the tests' model of it.

``ShardedGateway`` wires a ``ControlGateway``, ``WorkerSync`` and N ``GatewayWorker`` exactly
as the daemon's processes are wired (``mipsec.io.gw_workers``), without processes: the
kernel's split is modelled (raw ESP and ESP in UDP by ``spi % N``, IKE and NAT keepalives to
the control, home-side packets to a TUN queue by a flow hash), and every message between
control and workers goes through the codec (``mipsec.node.gw_worker_messages``).  It offers
the role interface, so the in-memory network runs it like a ``VpnGateway``.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from mipsec.ipsec.shard import worker_of
from mipsec.node import gw_worker_messages as wm
from mipsec.node.actions import Action, ForwardRrq, HandOff, SendOnWorker, SendToNet
from mipsec.node.config import GatewayConfig
from mipsec.node.gateway_worker import ControlGateway, GatewayWorker, WorkerSync
from mipsec.wire.esp import esp_spi_of


class ShardedGateway:
    """Control plus ``workers`` workers behind one role interface (module doc)."""

    def __init__(self, config: GatewayConfig, workers: int, *, now: float = 0.0,
                 random: Callable[[int], bytes] | None = None,
                 wallclock: Callable[[], float] | None = None):
        self.control = ControlGateway(config, now=now, random=random, wallclock=wallclock)
        self.sync = WorkerSync(workers)
        if self.control.ike is not None:
            self.control.ike.endpoint.esp_spi_policy = self.sync.esp_spi
        self.workers = [GatewayWorker(config, k, workers, now=now, random=random)
                        for k in range(workers)]
        self.name = self.control.name
        self.outside, self.inside = self.control.outside, self.control.inside
        self.messages: Counter[str] = Counter()     # control <-> worker messages by type
        self._sync(now)

    # --- the wiring -------------------------------------------------------------------------

    def _send(self, worker: int | None, msg: wm.Message, now: float) -> list[Action]:
        record = wm.encode(msg)
        self.messages[type(msg).__name__] += 1
        targets = range(len(self.workers)) if worker is None else (worker,)
        out: list[Action] = []
        for k in targets:
            out += self._from_worker(k, self.workers[k].apply(wm.decode(record), now), now)
        return out

    def _sync(self, now: float) -> list[Action]:
        out: list[Action] = []
        for worker, msg in self.sync.messages(self.control):
            out += self._send(worker, msg, now)
        return out

    def _from_control(self, actions: list[Action], now: float) -> list[Action]:
        out = self._sync(now)            # the workers first: an SA the reply sets up is there
        for action in actions:
            if action.__class__ is SendOnWorker:
                assert isinstance(action, SendOnWorker)
                worker = self.sync.worker_of_mobile(action.home_address)
                if worker is None:
                    continue
                to = action.to or (None, None)
                out += self._send(worker, wm.SendInner(action.home_address, action.packet,
                                                       to[0], to[1]), now)
            else:
                out.append(action)
        return out

    def _from_worker(self, k: int, result: Any, now: float) -> list[Action]:
        if result is None:
            return []
        if result.__class__ is bytes:
            return [SendToNet(result)]
        out: list[Action] = []
        for action in result:
            cls = action.__class__
            if cls is ForwardRrq:
                record = wm.encode(wm.RrqSeen(action.spi, action.source, action.port,
                                              action.packet))
                self.messages["RrqSeen"] += 1
                msg = wm.decode(record)
                assert isinstance(msg, wm.RrqSeen)
                out += self._from_control(self.control.rrq_seen(msg, now), now)
            elif cls is HandOff:
                out += self._from_worker(action.worker,
                                         self.workers[action.worker].handed_in(action.packet,
                                                                               now), now)
            else:
                out.append(action)
        return out

    # --- the kernel's split -----------------------------------------------------------------

    def worker_for_net(self, packet: bytes) -> int | None:
        """The worker the kernel gives this packet (None: the control process)."""
        spi = esp_spi_of(packet)
        return None if spi is None else worker_of(spi, len(self.workers))

    def queue_for_tun(self, packet: bytes) -> int:
        """The TUN queue (worker) a home-side packet is read from: a flow hash, as the
        kernel's, blind to which MN it is for."""
        return zlib.crc32(packet[12:20] + packet[9:10]) % len(self.workers)

    # --- the role interface -----------------------------------------------------------------

    def receive_from_net(self, packet: bytes, now: float) -> list[Action]:
        k = self.worker_for_net(packet)
        if k is None:
            return self._from_control(self.control.receive_from_net(packet, now), now)
        return self._from_worker(k, self.workers[k].net_fast_path(packet, now), now)

    def receive_siu(self, packet: bytes, now: float) -> list[Action]:
        return self._from_control(self.control.receive_siu(packet, now), now)

    def receive_from_tun(self, packet: bytes, now: float) -> list[Action]:
        k = self.queue_for_tun(packet)
        return self._from_worker(k, self.workers[k].tun_fast_path(packet, now), now)

    def handle_event(self, event: object, now: float) -> list[Action]:
        return self._from_control(self.control.handle_event(event, now), now)

    def get_timer(self) -> float | None:
        return self.control.get_timer()

    def handle_timer(self, now: float) -> list[Action]:
        return self._from_control(self.control.handle_timer(now), now)

    def status(self) -> dict[str, Any]:
        out = self.control.status()
        out["workers"] = [w.report() for w in self.workers]
        return out
