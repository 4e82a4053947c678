"""The ready-made topology of docs/design.md ("The lab / sim addressing plan").

    CN 10.1.0.10 ---+
    HA 10.1.0.2  ---+-- home 10.1.0.0/24 (lan) --- GW 10.1.0.1 | 172.16.0.1
    (MN at home) ---+                                          |
                                          outside 172.16.0.0/24 (internet_delay_s)
                                                               |
                                               router 172.16.0.254
                                                 |                     |
                                 visited-a 172.16.1.0/24      visited-b 172.16.2.0/24
                                     MN CoA 172.16.1.10           MN CoA 172.16.2.10

``internet_delay_s`` is the one-way delay of the outside segment (router <-> GW); LAN segments
have ``lan_delay_s``.  So one MN -> GW trip takes ``internet_delay_s + lan_delay_s`` and one
MN-GW-HA-GW round trip (``Topology.round_trip_s``) ``2 * (internet_delay_s + lan_delay_s) +
2 * lan_delay_s``.  With more than 200 MNs the visited networks become 172.20.0.0/16 and
172.21.0.0/16 (CoA of MN i: .0.10 + i) and the home prefix 10.1.0.0/16.

A GW pool (``n_gateways=2`` ..., IKEv2): GW k > 1 sits beside GW 1 on the home link
(10.1.0.(20 + k)) and on the outside segment (172.16.0.k); ``Topology.gateways`` lists them,
``Topology.gw`` is GW 1.  ``Topology.kill_gateway(k)`` takes GW k off both links at once (a
machine gone): its role stops, its links deliver nothing to it.

Wall-clock time for MIPv4 identification is ``wallclock_epoch + sim.now`` (injected).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mipsec.node.actions import CareOfAddressChanged, ReturnedHome
from mipsec.node.config import LabConfigs, make_lab_configs
from mipsec.node.correspondent import Correspondent
from mipsec.node.gateway import VpnGateway
from mipsec.node.home_agent import HomeAgent
from mipsec.node.mobile_node import MobileNode
from mipsec.sim.core import Simulator
from mipsec.sim.hosts import CorrespondentHost, GatewayHost, HomeAgentHost, MobileHost
from mipsec.sim.network import Router, Segment

WALLCLOCK_EPOCH = 1_767_225_600.0      # 2026-01-01T00:00:00Z: a fixed, reproducible wall clock


@dataclass
class Topology:
    sim: Simulator
    configs: LabConfigs
    home: Segment
    outside: Segment
    visited: dict[str, Segment]
    cn: CorrespondentHost
    ha: HomeAgentHost
    gw: GatewayHost
    router: Router
    mobiles: list[MobileHost]
    internet_delay_s: float
    lan_delay_s: float
    care_of: dict[str, list[str]] = field(default_factory=dict)   # "a"/"b" -> CoA per MN
    more_gateways: list[GatewayHost] = field(default_factory=list)  # GW 2, 3 ... of a pool

    @property
    def gateways(self) -> list[GatewayHost]:
        return [self.gw, *self.more_gateways]

    def kill_gateway(self, k: int) -> GatewayHost:
        """GW ``k`` (1-based) is gone: both its interfaces go down and its timers stop."""
        host = self.gateways[k - 1]
        for iface in host.interfaces.values():
            iface.bring_down()
        host.driver.stopped = True
        return host

    # --- convenient handles ---------------------------------------------------------------
    @property
    def mn(self) -> MobileHost:
        return self.mobiles[0]

    @property
    def round_trip_s(self) -> float:
        """One MN -> GW -> HA -> GW -> MN round trip (the SIU's detour included)."""
        return 2 * (self.internet_delay_s + self.lan_delay_s) + 2 * self.lan_delay_s

    def roles(self) -> list[Any]:
        return ([g.role for g in self.gateways[:1]] + [self.ha.role] + [m.role for m in self.mobiles]
                + [g.role for g in self.more_gateways])

    # --- moving a mobile node ------------------------------------------------------------
    def move(self, where: str, index: int = 0, *, make_before_break: bool = False) -> None:
        """Attach MN ``index`` to visited network ``"a"``/``"b"`` or ``"home"`` now.

        Break-before-make takes every other interface down first; make-before-break keeps the
        old one up (take it down later with ``detach``).
        """
        host = self.mobiles[index]
        target = host.interfaces[where]
        for name, iface in host.interfaces.items():
            if name != where and iface.up and not make_before_break:
                iface.bring_down()
        target.bring_up()
        if where == "home":
            for name, iface in host.interfaces.items():
                if name != "home" and iface.up:
                    iface.bring_down()
            host.driver.event(ReturnedHome("home"))
        else:
            host.driver.event(CareOfAddressChanged(target.address, where, make_before_break))

    def detach(self, where: str, index: int = 0) -> None:
        self.mobiles[index].interfaces[where].bring_down()


def _visited_plan(n: int) -> dict[str, tuple[str, str, int]]:
    if n <= 200:
        return {"a": ("172.16.1.0/24", "172.16.1.254", int(ipaddress.IPv4Address("172.16.1.10"))),
                "b": ("172.16.2.0/24", "172.16.2.254", int(ipaddress.IPv4Address("172.16.2.10")))}
    return {"a": ("172.20.0.0/16", "172.20.255.254", int(ipaddress.IPv4Address("172.20.0.10"))),
            "b": ("172.21.0.0/16", "172.21.255.254", int(ipaddress.IPv4Address("172.21.0.10")))}


def build_topology(n_mobiles: int = 1, *, internet_delay_s: float = 0.010,
                   lan_delay_s: float = 0.0001, seed: int = 0, configs: LabConfigs | None = None,
                   keys_from: Any = None, record: bool = True, with_apps: bool = True,
                   wallclock_epoch: float = WALLCLOCK_EPOCH, sim: Simulator | None = None,
                   make_gateway: Callable[..., Any] | None = None,
                   **config_kwargs: Any) -> Topology:
    """Build the network, the roles and (``with_apps``) a stream endpoint on CN and each MN.

    MNs start with no interface up; call ``topology.move("a")`` to attach one.  ``sim``: build
    into an existing simulator (several independent GW/HA pairs, each with its own segments, in
    one virtual time: ``benchmarks/bench_scale.py --pairs``).  ``make_gateway(config,
    wallclock=...)``: the GW role (default ``VpnGateway``; e.g. a GW split into workers,
    ``mipsec.node.gateway_sharded``).
    """
    if sim is None:
        sim = Simulator(seed)
    if configs is None:
        import random as _random
        configs = make_lab_configs(n_mobiles, keys_from if keys_from is not None
                                   else _random.Random(seed), **config_kwargs)
    n_mobiles = len(configs.mobiles)

    def wallclock() -> float:
        return wallclock_epoch + sim.now

    home_prefix = configs.home_agent.home_prefix
    home = Segment(sim, "home", home_prefix, delay_s=lan_delay_s)
    outside = Segment(sim, "outside", "172.16.0.0/24", delay_s=internet_delay_s)
    plan = _visited_plan(n_mobiles)
    visited = {k: Segment(sim, f"visited-{k}", p[0], delay_s=lan_delay_s) for k, p in plan.items()}

    gw_cfg, ha_cfg = configs.gateway, configs.home_agent
    gw_hosts = []
    for g_cfg in configs.gateways:
        g = GatewayHost(sim, g_cfg.name, (make_gateway or VpnGateway)(g_cfg, wallclock=wallclock),
                        inside="inside", record=record)
        g.add_interface("inside", g_cfg.inside_address, home)
        g.add_interface("outside", g_cfg.outside_address, outside)
        g.add_route("0.0.0.0/0", "172.16.0.254", "outside")
        gw_hosts.append(g)
    gw = gw_hosts[0]

    ha = HomeAgentHost(sim, "ha", HomeAgent(ha_cfg, wallclock=wallclock), home_iface="home",
                       record=record)
    ha.add_interface("home", ha_cfg.address, home)
    ha.add_route("0.0.0.0/0", gw_cfg.inside_address, "home")

    cn_app = Correspondent("cn", "10.1.0.10")
    cn = CorrespondentHost(sim, "cn", cn_app)
    cn.add_interface("home", "10.1.0.10", home)
    cn.add_route("0.0.0.0/0", gw_cfg.inside_address, "home")

    router = Router(sim, "router")
    router.add_interface("outside", "172.16.0.254", outside)
    for k, (_prefix, raddr, _first) in plan.items():
        router.add_interface(k, raddr, visited[k])

    mobiles: list[MobileHost] = []
    care_of: dict[str, list[str]] = {k: [] for k in plan}
    for i, mcfg in enumerate(configs.mobiles):
        role = MobileNode(mcfg, wallclock=wallclock)
        app = Correspondent(f"{mcfg.name}-app", mcfg.home_address) if with_apps else None
        host = MobileHost(sim, mcfg.name, role, app, record=record)
        host.add_interface("home", mcfg.home_address, home, up=False)
        host.add_route("0.0.0.0/0", gw_cfg.inside_address, "home")
        for k, (_prefix, raddr, first) in plan.items():
            coa = str(ipaddress.IPv4Address(first + i))
            care_of[k].append(coa)
            host.add_interface(k, coa, visited[k], up=False)
            host.add_route("0.0.0.0/0", raddr, k)
        mobiles.append(host)

    return Topology(sim=sim, configs=configs, home=home, outside=outside, visited=visited,
                    cn=cn, ha=ha, gw=gw, router=router, mobiles=mobiles,
                    internet_delay_s=internet_delay_s, lan_delay_s=lan_delay_s, care_of=care_of,
                    more_gateways=gw_hosts[1:])
