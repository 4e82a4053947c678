"""Helpers shared by the tests, the demo and the benchmarks: streams, waits, GW send records."""

from __future__ import annotations

from typing import Any

from mipsec.mip.constants import SIU_PORT
from mipsec.node import timeline as tl
from mipsec.node.actions import RebindSa, SendToNet, TimelineEvent
from mipsec.node.config import MIP_PORT
from mipsec.node.correspondent import StreamReport
from mipsec.node.mobile_node import RegState
from mipsec.sim.network import b2a
from mipsec.sim.topology import Topology


def start_streams(topo: Topology, *, interval_s: float, start: float, stop: float,
                  index: int = 0, size: int = 64) -> None:
    """CN -> MN (downlink) and MN -> CN (uplink) streams, one datagram per ``interval_s`` each."""
    mn = topo.mobiles[index]
    topo.cn.app.start_stream(mn.role.home_address, interval_s=interval_s, start=start, stop=stop,
                             size=size)
    mn.application.start_stream(topo.cn.app.address, interval_s=interval_s, start=start, stop=stop,
                        size=size)
    topo.cn.driver.rearm()
    mn.application_driver.rearm()


def stream_reports(topo: Topology, index: int = 0, **window: Any) -> dict[str, StreamReport]:
    mn = topo.mobiles[index]
    return {"downlink": mn.application.report(topo.cn.app.sent, **window),
            "uplink": topo.cn.app.report(mn.application.sent, **window)}


def wait_registered(topo: Topology, timeout_s: float = 5.0, index: int | None = None,
                    step_s: float = 0.0005) -> bool:
    """Run until the MN(s) are REGISTERED (or AT_HOME); False on timeout.

    With one MN the condition is checked after every event; with many, every ``step_s`` of
    virtual time (checking 10,000 MNs after each event would cost more than the simulation).
    """
    hosts = topo.mobiles if index is None else [topo.mobiles[index]]
    done = (RegState.REGISTERED, RegState.AT_HOME)
    pending = [h.role for h in hosts]

    def finished() -> bool:
        pending[:] = [r for r in pending if r.state not in done]
        return not pending

    if len(hosts) == 1:
        return topo.sim.run_until(finished, timeout_s)
    sim = topo.sim
    deadline = sim.now + timeout_s
    while not finished():
        if sim.now >= deadline:
            return False
        sim.run(until=min(deadline, sim.now + step_s))
    return True


def merged_timeline(topo: Topology, index: int = 0) -> list[TimelineEvent]:
    home = topo.mobiles[index].role.home_address
    return tl.for_mobile(tl.merge(topo.mobiles[index].role.timeline, topo.gw.role.timeline,
                                  topo.ha.role.timeline), home)


def gw_log(topo: Topology) -> list[tuple[int, float, str, Any]]:
    """The GW's actions in order: (position, time, kind, detail): "send" (ESP to a CoA) and
    "ack" (SIU ACK to the HA), "rrq" (a Registration Request forwarded to the HA), "ike" (IKEv2
    to an MN) -> destination, "rebind" -> new remote."""
    out: list[tuple[int, float, str, Any]] = []
    for pos, (time, action) in enumerate(topo.gw.driver.log or ()):
        if isinstance(action, SendToNet):
            packet = action.packet
            ihl = (packet[0] & 0x0F) * 4
            dport = int.from_bytes(packet[ihl + 2:ihl + 4], "big") if packet[9] == 17 else None
            if dport == SIU_PORT:
                kind = "ack"
            elif dport == MIP_PORT:
                kind = "rrq"          # a Registration Request forwarded to the HA
            elif dport == 500 or (dport == 4500 and packet[ihl + 8:ihl + 12] == bytes(4)):
                kind = "ike"
            else:
                kind = "send"
            out.append((pos, time, kind, b2a(packet[16:20])))
        elif isinstance(action, RebindSa):
            out.append((pos, time, "rebind", action.remote))
    return out


def restart_gateway(topo: Topology) -> Any:
    """The GW process restarts: a new ``VpnGateway`` from the same configuration, with no SAs
    negotiated by IKE, no bindings and no SIU replay state (docs/protocol.md §2.3)."""
    from mipsec.node.gateway import VpnGateway
    old = topo.gw.role
    new = VpnGateway(old.config, wallclock=old.wallclock)
    topo.gw.role = new
    topo.gw.driver.role = new
    topo.gw.driver.rearm()
    return new
