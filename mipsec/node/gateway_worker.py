"""A GW split into a control process and data-plane workers (``workers = N``), sans-I/O.

Theory of operation
-------------------
The control process runs ``ControlGateway``: the whole GW role (IKE, SIUs, bindings, the
Registration Requests' care-of check, status) whose SA objects are the *specification* of the
SAs, never used for a packet.  ``WorkerSync`` compares, after every result of the role, what
the role holds with what each worker was told and sends the difference
(``mipsec.node.gw_worker_messages``).  Each MN lives in one worker, ``spi % N`` of its inbound
SPI: with IKE, ``WorkerSync.esp_spi`` chooses every inbound SPI of a peer for the worker it
was given first (the least loaded then), so re-keys stay there; manual keys are sharded by the
configured inbound SPI.  Its outbound SA is installed in the same worker.

A worker runs ``GatewayWorker``: the same ``VpnGateway`` data path (``net_fast_path``,
``tun_fast_path``, the same drops) over the SAs it was given, with three differences:

* an authenticated Registration Request is not forwarded but handed to the control process
  (``ForwardRrq``), which notes its care-of address and source and forwards it: the SIU that
  follows is checked there;
* a downlink packet for an MN another worker holds (the kernel spreads TUN flows over the
  queues by a flow hash, not by MN) is handed to that worker (``HandOff``, counted);
* the control's binding is copied (``Bind``), not decided: the binding machine runs in the
  control process only.

The order the patent asks for is kept: an SIU's re-point reaches the worker (``Bind``) before
the request to encrypt the Registration Reply (``SendInner``), on one ordered channel.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mipsec.drops import DropReason
from mipsec.ipsec.sa import Direction, Lifetime, SecurityAssociation, UdpEncap
from mipsec.ipsec.selector import Selector
from mipsec.ipsec.shard import check_workers, spi_for_worker
from mipsec.mobility.gw_binding import BindingState
from mipsec.node import gw_worker_messages as wm
from mipsec.node.actions import Action, ForwardRrq, HandOff, SendOnWorker
from mipsec.node.config import MIP_PORT, GatewayConfig
from mipsec.node.gateway import UNBOUND_ADDRESS, Mobile, VpnGateway
from mipsec.node.packet import IPPROTO_IPIP, a2b, b2a, udp_ports
from mipsec.wire.mip import MSG_REGISTRATION_REQUEST

# --- SAs across processes ---------------------------------------------------------------------


def sa_spec(sa: SecurityAssociation) -> wm.SaSpec:
    """What builds ``sa`` again in a worker, with its sequence number and replay top."""
    enc_key, int_key = sa.key_material()
    sel = sa.selector
    lt = sa.lifetime
    return wm.SaSpec(
        spi=sa.spi, direction=sa.direction.value, encryption=sa.encryption,
        encryption_key=enc_key.hex(), integrity=sa.integrity, integrity_key=int_key.hex(),
        local=sa.local, remote=sa.remote, esn=sa.esn, replay_window=sa.replay.size,
        udp_local_port=sa.udp_encap.local_port if sa.udp_encap else None,
        udp_remote_port=sa.udp_encap.remote_port if sa.udp_encap else None,
        selector=None if not isinstance(sel, Selector) else (
            sel.local, sel.remote, sel.protocol, sel.local_ports, sel.remote_ports),
        lifetime=None if lt is None else (lt.soft_seconds, lt.hard_seconds, lt.soft_bytes,
                                          lt.hard_bytes),
        created=sa.created, sequence=sa.sequence, replay_top=sa.replay.top)


def sa_from_spec(spec: wm.SaSpec, random: Callable[[int], bytes] | None = None
                 ) -> SecurityAssociation:
    kwargs: dict[str, Any] = {"random": random} if random is not None else {}
    sa = SecurityAssociation(
        spi=spec.spi, direction=Direction(spec.direction), encryption=spec.encryption,
        encryption_key=bytes.fromhex(spec.encryption_key), integrity=spec.integrity,
        integrity_key=bytes.fromhex(spec.integrity_key), local=spec.local, remote=spec.remote,
        esn=spec.esn, replay_window=spec.replay_window,
        udp_encap=(UdpEncap(spec.udp_local_port, spec.udp_remote_port)
                   if spec.udp_local_port is not None and spec.udp_remote_port is not None
                   else None),
        selector=Selector(*spec.selector) if spec.selector is not None else None,
        lifetime=Lifetime(*spec.lifetime) if spec.lifetime is not None else None,
        now=spec.created, **kwargs)
    sa.sequence = spec.sequence
    if spec.replay_top:
        sa.replay.top = spec.replay_top
        sa.replay.bitmap = (1 << sa.replay.size) - 1      # everything up to top: seen
    return sa


# --- the control process ----------------------------------------------------------------------


class ControlGateway(VpnGateway):
    """The GW role of the control process: everything but ESP (module doc)."""

    def _send_on_sa(self, mobile: Mobile, inner: bytes, now: float,
                    to: tuple[str, int | None] | None = None) -> list[Action]:
        return [SendOnWorker(mobile.home_address, inner, to)]

    def rrq_seen(self, msg: wm.RrqSeen, now: float) -> list[Action]:
        """A worker's authenticated Registration Request: noted and forwarded as
        ``receive_from_net`` does in one process (its SA may be gone meanwhile: NO_SA)."""
        mobile = self._by_spi.get(msg.spi)
        inner = msg.packet
        if mobile is None:
            return self._drop(DropReason.NO_SA)
        iihl = (inner[0] & 0x0F) << 2 if inner else 0
        ports = udp_ports(inner, iihl) if len(inner) >= 20 else None
        if (ports is None or ports[1] != MIP_PORT or len(inner) < iihl + 8 + 24
                or inner[iihl + 8] != MSG_REGISTRATION_REQUEST):
            return self._drop(DropReason.MALFORMED)
        forwarded = self._forward_rrq(mobile, msg.spi, a2b(msg.source), msg.port, inner, iihl,
                                      ports, now)
        if forwarded is None:         # in one process it would go on unchanged: there is no TUN
            return self._drop(DropReason.MALFORMED)
        return forwarded


@dataclass
class _Told:
    """What one worker was told about one MN."""
    mobile: Mobile
    worker: int
    inbound: set[int]
    outbound: SecurityAssociation
    bind: tuple[Any, ...] | None = None
    quick: tuple[Any, ...] | None = None     # the objects last told: unchanged -> no work


class WorkerSync:
    """The control side's view of the workers: which MN is where, and the messages that bring
    the workers in line with the role (module doc)."""

    def __init__(self, workers: int):
        check_workers(workers)
        self.workers = workers
        self._told: dict[str, _Told] = {}
        self._peer_worker: dict[str, int] = {}       # IKE identity -> its worker (bounded by
        self._load = [0] * workers                   # the configured MNs); peers per worker
        self.off_shard = 0     # SAs found on another worker than their MN's (never expected)

    def esp_spi(self, candidate: int, peer_id: str | None) -> int:
        """The inbound SPI for ``candidate`` (IKE's allocation): in the peer's worker."""
        index = self._peer_worker.get(peer_id) if peer_id is not None else None
        if index is None:
            index = min(range(self.workers), key=lambda k: (self._load[k], k))
            if peer_id is not None:
                self._peer_worker[peer_id] = index
                self._load[index] += 1
        return spi_for_worker(candidate, self.workers, index)

    def worker_of_mobile(self, home_address: str) -> int | None:
        told = self._told.get(home_address)
        return told.worker if told is not None else None

    def messages(self, role: VpnGateway) -> list[tuple[int | None, wm.Message]]:
        """(worker, message) pairs (worker None: every worker), in the order to send.  An MN
        whose SA objects, binding and other inbound SAs are the ones last told costs one tuple
        comparison (the control calls this after every result of the role)."""
        out: list[tuple[int | None, wm.Message]] = []
        n = self.workers
        told_all = self._told
        for home, m in role.mobiles.items():
            sa = m.outbound
            older = role.other_inbound(m)
            quick = (m.inbound, sa, m.state, m.care_of, sa.udp_encap, sa.remote_bytes,
                     tuple(older) if older else None)
            told = told_all.get(home)
            if told is not None and told.quick == quick and told.mobile is m:
                continue
            w = m.inbound.spi % n
            inbound = {m.inbound.spi: m.inbound, **older}
            self.off_shard += sum(1 for spi in inbound if spi % n != w)
            if told is None or told.mobile is not m or told.worker != w:
                if told is not None and told.worker != w:
                    out.append((told.worker, wm.RemoveMobile(home)))
                out.append((w, wm.InstallPair(home, m.home_agent, m.allowed_text,
                                              m.road_warrior, sa_spec(m.inbound),
                                              sa_spec(sa))))
                out += [(w, wm.AddInbound(home, sa_spec(x))) for x in older.values()]
                out.append((None, wm.Owner(home, w)))
                told = told_all[home] = _Told(m, w, set(inbound), sa)
            else:
                current = set(inbound)
                out += [(w, wm.AddInbound(home, sa_spec(inbound[spi])))
                        for spi in current - told.inbound]
                out += [(w, wm.RemoveInbound(spi)) for spi in told.inbound - current]
                told.inbound = current
                if sa is not told.outbound:
                    out.append((w, wm.SetOutbound(home, sa_spec(sa))))
                    told.outbound = sa
            bind = (m.state.value, m.care_of, sa.remote or UNBOUND_ADDRESS,
                    sa.udp_encap.remote_port if sa.udp_encap is not None else None)
            if bind != told.bind:
                out.append((w, wm.Bind(home, *bind)))
                told.bind = bind
            told.quick = quick
        if len(told_all) > len(role.mobiles):     # (every MN of the role is told by now)
            for home in [h for h in told_all if h not in role.mobiles]:
                told = told_all.pop(home)
                out += [(told.worker, wm.RemoveMobile(home)), (None, wm.Owner(home, -1))]
        return out


# --- a worker ---------------------------------------------------------------------------------


class GatewayWorker(VpnGateway):
    """The GW role of worker ``index`` of ``workers`` (module doc)."""

    def __init__(self, config: GatewayConfig, index: int, workers: int, *, now: float = 0.0,
                 random: Callable[[int], bytes] | None = None):
        check_workers(workers, index)
        super().__init__(dataclasses.replace(config, mobiles=(), ike=None), now=now,
                         random=random)
        self.index = index
        self.workers = workers
        self._sa_random = random
        self._owner: dict[bytes, int] = {}       # home address -> worker with its outbound SA
        # each MN's inbound SAs besides its current one (the control's other pairs and
        # re-keyed SAs in their grace period), oldest first: home address -> spi -> SA
        self._older: dict[str, dict[int, SecurityAssociation]] = {}
        self.handoffs_out = 0
        self.handoffs_in = 0
        self.control_errors: Counter[str] = Counter()

    # --- messages from the control process -----------------------------------------------------

    def apply(self, msg: wm.Message, now: float) -> list[Action]:
        """Carry out one control message; what it asks to send, if anything."""
        cls = msg.__class__
        if cls is wm.Owner:
            assert isinstance(msg, wm.Owner)
            if msg.worker < 0:
                self._owner.pop(a2b(msg.home_address), None)
            else:
                self._owner[a2b(msg.home_address)] = msg.worker
            return []
        if cls is wm.InstallPair:
            assert isinstance(msg, wm.InstallPair)
            self.install_mobile(msg.home_address, self._sa(msg.inbound), self._sa(msg.outbound),
                                home_agent=msg.home_agent, allowed_destinations=msg.allowed,
                                now=now, road_warrior=msg.road_warrior)
            return []
        if cls is wm.RemoveInbound:
            assert isinstance(msg, wm.RemoveInbound)
            self._remove_inbound(msg.spi)
            return []
        home = getattr(msg, "home_address", "")
        mobile = self.mobiles.get(home)
        if mobile is None:
            self.control_errors[f"{type(msg).__name__}: unknown MN"] += 1
            return []
        if cls is wm.RemoveMobile:
            self.remove_mobile(home)
        elif cls is wm.AddInbound:
            assert isinstance(msg, wm.AddInbound)
            sa = self._sa(msg.sa)
            self._older.setdefault(home, {})[mobile.inbound.spi] = mobile.inbound
            mobile.inbound = sa
            self.sad.add(sa)
            self._by_spi[sa.spi] = mobile
        elif cls is wm.SetOutbound:
            assert isinstance(msg, wm.SetOutbound)
            mobile.outbound = self._sa(msg.sa)
        elif cls is wm.Bind:
            assert isinstance(msg, wm.Bind)
            sa = mobile.outbound
            if sa.udp_encap is not None and msg.remote_port is not None:
                sa.rebind(remote=msg.remote, udp_encap=UdpEncap(sa.udp_encap.local_port,
                                                                msg.remote_port))
            else:
                sa.rebind(remote=msg.remote)
            mobile.care_of = msg.care_of
            # a copy of the control process's machine, which alone decides (module doc)
            mobile.state = BindingState(msg.state)
        elif cls is wm.SendInner:
            assert isinstance(msg, wm.SendInner)
            to = (msg.to_address, msg.to_port) if msg.to_address is not None else None
            return self._send_on_sa(mobile, msg.packet, now, to)
        else:
            self.control_errors[f"{type(msg).__name__}: not for a worker"] += 1
        return []

    def _sa(self, spec: wm.SaSpec) -> SecurityAssociation:
        return sa_from_spec(spec, self._sa_random)

    def _remove_inbound(self, spi: int) -> None:
        mobile = self._by_spi.pop(spi, None)
        if mobile is None:
            self.control_errors["RemoveInbound: unknown SPI"] += 1
            return
        self.sad.remove(spi)
        older = self._older.get(mobile.home_address, {})
        older.pop(spi, None)
        if mobile.inbound.spi == spi and older:
            mobile.inbound = older.pop(next(reversed(older)))

    def remove_mobile(self, home_address: str) -> None:
        for spi in self._older.pop(home_address, {}):
            if self._by_spi.pop(spi, None) is not None:
                self.sad.remove(spi)
        super().remove_mobile(home_address)

    def esp_sas(self) -> list[SecurityAssociation]:
        return super().esp_sas() + [sa for older in self._older.values()
                                    for sa in older.values()]

    # --- the data path's differences ----------------------------------------------------------

    def _forward_rrq(self, mobile: Mobile, spi: int, src: bytes, port: int | None,
                     inner: bytes, iihl: int, ports: tuple[int, int],
                     now: float) -> list[Action] | None:
        return [ForwardRrq(spi, b2a(src), port, inner)]

    def _handoff(self, packet: bytes) -> list[Action] | None:
        """A downlink packet of an MN another worker holds: for that worker."""
        if len(packet) < 20:
            return None
        ihl = (packet[0] & 0x0F) << 2
        key = packet[ihl + 16:ihl + 20] if packet[9] == IPPROTO_IPIP else packet[16:20]
        owner = self._owner.get(key)
        if owner is None or owner == self.index:
            return None
        self.handoffs_out += 1
        return [HandOff(owner, packet)]

    def tun_fast_path(self, packet: bytes, now: float) -> bytes | list[Action] | None:
        return self._handoff(packet) or super().tun_fast_path(packet, now)

    def receive_from_tun(self, packet: bytes, now: float) -> list[Action]:
        return self._handoff(packet) or super().receive_from_tun(packet, now)

    def handed_in(self, packet: bytes, now: float) -> bytes | list[Action] | None:
        """A downlink packet another worker read for one of our MNs."""
        self.handoffs_in += 1
        return super().tun_fast_path(packet, now)

    # --- status -------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """For the control process's ``mipsec status``: counters, drops, SPIs."""
        inbound = sorted(self._by_spi)
        return {
            "worker": self.index, "mobiles": len(self.mobiles),
            "inbound_spis": [f"0x{spi:08x}" for spi in inbound],
            "outbound_spis": [f"0x{m.outbound.spi:08x}" for m in self.mobiles.values()],
            "outbound_sequence": {f"0x{m.outbound.spi:08x}": m.outbound.sequence
                                  for m in self.mobiles.values()},
            "packets_up": sum(m.packets_up for m in self.mobiles.values()),
            "packets_down": sum(m.packets_down for m in self.mobiles.values()),
            "handoffs_out": self.handoffs_out, "handoffs_in": self.handoffs_in,
            "drops": {str(k): v for k, v in self.drops.items()},
            "sad_drops": {str(k): v for k, v in self.sad.drops.items()},
            "control_errors": dict(self.control_errors),
        }
