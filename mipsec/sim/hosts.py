"""Hosts that run a sans-I/O role (or a correspondent) inside the simulator.

A ``Driver`` feeds one role-like object (``receive_from_net``, ``receive_from_tun``,
``handle_timer``, ``get_timer``) at the simulator's ``now``, carries its actions out IN ORDER
(``SendToNet``, ``WriteToTun``, ``BindingChanged`` ...) and keeps exactly one timer armed from
``get_timer()`` — the same contract as the daemons' event loop (docs/design.md).

What "net" and "tun" mean follows the table of docs/design.md "Roles":

* ``MobileHost``: ESP, UDP 4500 and UDP 434 reach the role; anything else addressed to us (the MN
  at home) goes straight to the application.  The application (a ``Correspondent`` bound to the
  home address) is "behind the TUN": its packets enter ``receive_from_tun`` and ``WriteToTun``
  hands packets to it.  ``SendToNet(packet, interface)`` leaves from that interface.
* ``GatewayHost``: packets arriving on the inside interface for its inside address go to
  ``receive_siu`` (the daemon's inside-bound SIU socket); other packets for its own addresses go
  to ``receive_from_net``; packets arriving on the inside interface for anyone else (a CoA) go
  to ``receive_from_tun`` (the lab's policy routing into the TUN).  ``WriteToTun`` routes the
  inner packet into the home network.
* ``HomeAgentHost``: packets for its address go to ``receive_from_net``; a ``BindingChanged``
  makes it claim (proxy ARP) the home address on the home segment, and packets so caught go to
  ``receive_from_tun``.  ``WriteToTun`` routes the decapsulated packet into the home network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mipsec.errors import UsageError
from mipsec.node.actions import (
    BindingChanged,
    Log,
    RebindSa,
    ReestablishRequested,
    SendToNet,
    WriteToTun,
)
from mipsec.node.correspondent import Correspondent
from mipsec.sim.core import Simulator
from mipsec.sim.network import Host, Interface, a2b

_ROLE_PROTOCOLS = {50}
_ROLE_UDP_PORTS = {4500, 434, 500}   # ESP in UDP, registration, IKEv2


class Driver:
    """Runs one role-like object: calls it at ``sim.now``, performs its actions, re-arms its timer."""

    def __init__(self, sim: Simulator, role: Any, *, send: Callable[[SendToNet], None],
                 tun: Callable[[bytes], None], on_other: Callable[[Any], None] | None = None,
                 record: bool = False):
        self.sim = sim
        self.role = role
        self._send = send
        self._tun = tun
        self._other = on_other
        self._armed: float | None = None
        self.stopped = False                 # the host is gone (a killed GW): no more timers
        self.log: list[tuple[float, Any]] | None = [] if record else None
        self.reestablish: list[tuple[float, ReestablishRequested]] = []

    def net(self, packet: bytes) -> None:
        self.perform(self.role.receive_from_net(packet, self.sim.now))

    def tun(self, packet: bytes) -> None:
        self.perform(self.role.receive_from_tun(packet, self.sim.now))

    def siu(self, packet: bytes) -> None:
        self.perform(self.role.receive_siu(packet, self.sim.now))

    def event(self, event: Any) -> None:
        self.perform(self.role.handle_event(event, self.sim.now))

    def perform(self, actions: list[Any]) -> None:
        log = self.log
        now = self.sim.now
        for action in actions:
            if log is not None:
                log.append((now, action))
            cls = action.__class__
            if cls is SendToNet:
                self._send(action)
            elif cls is WriteToTun:
                self._tun(action.packet)
            elif cls is ReestablishRequested:
                self.reestablish.append((now, action))
            elif cls in (RebindSa, Log):
                pass
            elif self._other is not None:
                self._other(action)
        self.rearm()

    def rearm(self) -> None:
        t = self.role.get_timer()
        if t is None or (self._armed is not None and self._armed <= t):
            return
        self._armed = t
        self.sim.at(t, self._fire, t)

    def _fire(self, t: float) -> None:
        if self._armed != t or self.stopped:
            return                       # superseded by an earlier deadline
        self._armed = None
        self.perform(self.role.handle_timer(self.sim.now))


class CorrespondentHost(Host):
    """A plain host whose local traffic is handled by a ``Correspondent``."""

    def __init__(self, sim: Simulator, name: str, app: Correspondent):
        super().__init__(sim, name)
        self.app = app
        self.driver = Driver(sim, app, send=lambda a: self.send(a.packet, a.interface),
                             tun=lambda p: None)

    def receive(self, packet: bytes, iface: Interface) -> None:
        self.driver.net(packet)


class MobileHost(Host):
    def __init__(self, sim: Simulator, name: str, role: Any, app: Correspondent | None = None,
                 record: bool = False):
        super().__init__(sim, name)
        self.role = role
        self.app = app
        self.driver = Driver(sim, role, send=self._send_from, tun=self._to_app, record=record)
        self.app_driver = (Driver(sim, app, send=lambda a: self.driver.tun(a.packet),
                                  tun=lambda p: None) if app is not None else None)

    @property
    def application(self) -> Correspondent:
        """The MN's application (a ``Correspondent`` behind its home address)."""
        if self.app is None:
            raise UsageError(f"{self.name}: this mobile host has no application")
        return self.app

    @property
    def application_driver(self) -> Driver:
        if self.app_driver is None:
            raise UsageError(f"{self.name}: this mobile host has no application")
        return self.app_driver

    def _send_from(self, action: SendToNet) -> None:
        packet = action.packet
        if action.interface is not None and action.interface in self.interfaces:
            self.send(packet, action.interface)
            return
        src = packet[12:16]
        for iface in self.interfaces.values():
            if iface.up and iface.address_bytes == src:
                self.send(packet, iface.name)
                return
        self.send(packet)

    def _to_app(self, packet: bytes) -> None:
        if self.app_driver is not None:
            self.app_driver.net(packet)

    def receive(self, packet: bytes, iface: Interface) -> None:
        proto = packet[9]
        ihl = (packet[0] & 0x0F) << 2
        if proto in _ROLE_PROTOCOLS or (
                proto == 17 and len(packet) >= ihl + 4
                and int.from_bytes(packet[ihl + 2:ihl + 4], "big") in _ROLE_UDP_PORTS):
            self.driver.net(packet)
        else:
            self._to_app(packet)             # at home: the kernel delivers it locally


class GatewayHost(Host):
    def __init__(self, sim: Simulator, name: str, role: Any, inside: str, record: bool = False):
        super().__init__(sim, name)
        self.role = role
        self.inside_name = inside
        self.driver = Driver(sim, role, send=lambda a: self.send(a.packet, a.interface),
                             tun=self.send, record=record)

    def deliver(self, packet: bytes, iface: Interface) -> None:
        if len(packet) < 20:
            self.counters["runt"] += 1
            return
        if packet[16:20] in self._local:
            if iface.name == self.inside_name and packet[16:20] == iface.address_bytes:
                self.driver.siu(packet)      # the SIU socket: inside address, inside interface
            else:
                self.driver.net(packet)
        elif iface.name == self.inside_name:
            self.driver.tun(packet)          # policy routing: home side -> the GW's TUN
        else:
            self.counters["not-for-us"] += 1


class HomeAgentHost(Host):
    def __init__(self, sim: Simulator, name: str, role: Any, home_iface: str, record: bool = False):
        super().__init__(sim, name)
        self.role = role
        self.home_iface = home_iface
        self._claimed: set[bytes] = set()
        self._care_of_routes: dict[str, tuple] = {}   # home address -> its care-of route
        self.driver = Driver(sim, role, send=lambda a: self.send(a.packet, a.interface),
                             tun=self.send, on_other=self._other, record=record)

    def _other(self, action: Any) -> None:
        if isinstance(action, BindingChanged):
            iface = self.interfaces[self.home_iface]
            self._route_care_of(action)
            if action.care_of_address is None:
                self._claimed.discard(a2b(action.home_address))
                iface.segment.unclaim(action.home_address, iface)
            else:
                self._claimed.add(a2b(action.home_address))
                iface.segment.claim(action.home_address, iface)

    def _route_care_of(self, action: BindingChanged) -> None:
        """GW pool: the care-of address is routed via the GW that serves the MN (as the HA
        daemon does with a host route), so the tunnelled downlink reaches its SAs."""
        old = self._care_of_routes.pop(action.home_address, None)
        if old is not None:
            self._routes = [r for r in self._routes if r is not old]
        if action.care_of_address is None or action.gateway is None:
            return
        self.add_route(f"{action.care_of_address}/32", action.gateway, self.home_iface)
        self._care_of_routes[action.home_address] = next(
            r for r in self._routes if r[2] == 32 and r[0] == int.from_bytes(
                a2b(action.care_of_address), "big") and r[3] == a2b(action.gateway))

    def claims(self, dst: bytes) -> bool:
        return dst in self._claimed

    def receive(self, packet: bytes, iface: Interface) -> None:
        if packet[16:20] in self._local:
            self.driver.net(packet)
        else:
            self.driver.tun(packet)
