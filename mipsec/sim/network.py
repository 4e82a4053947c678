"""Hosts, interfaces, segments and routers of the in-memory network.

The model is layer 3 only: a ``Segment`` is a link or LAN with one-way ``delay_s``, random
``loss`` and ``reorder`` (seeded by the simulator), and ``drop_next(match)`` rules for tests.
A host sends a complete IPv4 packet out of an interface towards a next-hop address; the segment
hands it, after the delay, to the interface that owns that address (or that claims it: the HA's
proxy ARP for a home address while the MN is away).  Packets to an address nobody owns on the
segment are counted in ``undeliverable`` and vanish, like an unanswered ARP.

A ``Host`` has interfaces, longest-prefix-match routes and, when ``forwarding`` is on, forwards
packets that are not for it (a router).  Role hosts (``mipsec.sim.hosts``) override ``receive``.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable

from mipsec.sim.core import Simulator
from mipsec.wire.ipv4 import addr_to_bytes, bytes_to_addr

Match = Callable[[bytes], bool]


# the short names the simulator uses for wire.ipv4's converters
a2b = addr_to_bytes
b2a = bytes_to_addr


def dst_of(packet: bytes) -> bytes:
    return packet[16:20]


class Segment:
    """A link or LAN with delay, loss and reordering."""

    def __init__(self, sim: Simulator, name: str, prefix: str, *, delay_s: float = 0.0,
                 loss: float = 0.0, reorder: float = 0.0, reorder_extra_s: float = 0.0):
        self.sim = sim
        self.name = name
        self.prefix = ipaddress.IPv4Network(prefix)
        self.delay_s = delay_s
        self.loss = loss
        self.reorder = reorder
        self.reorder_extra_s = reorder_extra_s
        self.owners: dict[bytes, Interface] = {}
        self.proxies: dict[bytes, Interface] = {}
        self._drop_rules: list[list] = []            # [match, remaining count, description]
        self.counters: Counter[str] = Counter()
        self.capture: list[tuple[float, str, bytes]] | None = None   # (time, sender, packet)

    # --- test controls -------------------------------------------------------------------------
    def drop_next(self, match: Match, count: int = 1, description: str = "") -> None:
        """Drop the next ``count`` packets for which ``match(packet)`` is true."""
        self._drop_rules.append([match, count, description])

    def start_capture(self) -> list[tuple[float, str, bytes]]:
        self.capture = []
        return self.capture

    # --- address ownership ---------------------------------------------------------------------
    def attach(self, iface: Interface) -> None:
        self.owners[iface.address_bytes] = iface

    def detach(self, iface: Interface) -> None:
        if self.owners.get(iface.address_bytes) is iface:
            del self.owners[iface.address_bytes]

    def claim(self, address: str, iface: Interface) -> None:
        """Proxy ARP: ``iface`` answers for ``address`` (takes precedence over the owner)."""
        self.proxies[a2b(address)] = iface

    def unclaim(self, address: str, iface: Interface) -> None:
        if self.proxies.get(a2b(address)) is iface:
            del self.proxies[a2b(address)]

    def resolve(self, address: bytes) -> Interface | None:
        return self.proxies.get(address) or self.owners.get(address)

    # --- transmission --------------------------------------------------------------------------
    def transmit(self, packet: bytes, next_hop: bytes, sender: Interface) -> None:
        self.counters["sent"] += 1
        if self.capture is not None:
            self.capture.append((self.sim.now, sender.host.name, packet))
        rules = self._drop_rules
        if rules:
            for rule in rules:
                if rule[0](packet):
                    rule[1] -= 1
                    if rule[1] <= 0:
                        rules.remove(rule)
                    self.counters["dropped-by-rule"] += 1
                    return
        rng = self.sim.rng
        if self.loss and rng.random() < self.loss:
            self.counters["lost"] += 1
            return
        delay = self.delay_s
        if self.reorder and rng.random() < self.reorder:
            delay += self.reorder_extra_s
            self.counters["reordered"] += 1
        self.sim.at(self.sim.now + delay, self._arrive, packet, next_hop)

    def _arrive(self, packet: bytes, next_hop: bytes) -> None:
        iface = self.resolve(next_hop)
        if iface is None or not iface.up:
            self.counters["undeliverable"] += 1
            return
        self.counters["delivered"] += 1
        iface.host.deliver(packet, iface)


class Interface:
    def __init__(self, host: Host, name: str, address: str, segment: Segment):
        self.host = host
        self.name = name
        self.address = address
        self.address_bytes = a2b(address)
        self.segment = segment
        self.up = False

    def bring_up(self) -> None:
        self.up = True
        self.segment.attach(self)
        self.host._refresh()

    def bring_down(self) -> None:
        self.up = False
        self.segment.detach(self)
        self.host._refresh()

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"<{self.host.name}:{self.name} {self.address} on {self.segment.name} {state}>"


class Host:
    """A host or router: interfaces, longest-prefix routes, optional forwarding."""

    def __init__(self, sim: Simulator, name: str, *, forwarding: bool = False):
        self.sim = sim
        self.name = name
        self.forwarding = forwarding
        self.interfaces: dict[str, Interface] = {}
        self._routes: list[tuple[int, int, int, bytes | None, Interface]] = []
        self.counters: Counter[str] = Counter()
        self.received: list[tuple[float, bytes]] | None = None    # plain hosts may record
        self._local: frozenset[bytes] = frozenset()

    def _refresh(self) -> None:
        self._local = frozenset(i.address_bytes for i in self.interfaces.values() if i.up)

    def add_interface(self, name: str, address: str, segment: Segment, *, up: bool = True) -> Interface:
        iface = Interface(self, name, address, segment)
        self.interfaces[name] = iface
        self.add_route(str(segment.prefix), None, name)
        if up:
            iface.bring_up()
        return iface

    def add_route(self, prefix: str, via: str | None, interface: str) -> None:
        net = ipaddress.IPv4Network(prefix)
        self._routes.append((int(net.network_address), int(net.netmask), net.prefixlen,
                             a2b(via) if via else None, self.interfaces[interface]))
        self._routes.sort(key=lambda r: -r[2])

    def route(self, dst: bytes) -> tuple[Interface, bytes] | None:
        value = int.from_bytes(dst, "big")
        for net, mask, _, via, iface in self._routes:
            if value & mask == net and iface.up:
                return iface, via or dst
        return None

    def send(self, packet: bytes, interface: str | None = None) -> None:
        """Route ``packet`` (or send it out of the named interface) towards its destination."""
        if len(packet) < 20:
            self.counters["unroutable"] += 1
            return
        dst = dst_of(packet)
        if interface is not None:
            iface = self.interfaces.get(interface)
            if iface is None or not iface.up:
                self.counters["interface-down"] += 1
                return
            found: tuple[Interface, bytes] | None = self._route_via(iface, dst)
        else:
            found = self.route(dst)
        if found is None:
            self.counters["unroutable"] += 1
            return
        iface, next_hop = found
        iface.segment.transmit(packet, next_hop, iface)

    def _route_via(self, iface: Interface, dst: bytes) -> tuple[Interface, bytes]:
        value = int.from_bytes(dst, "big")
        for net, mask, _, via, r_iface in self._routes:
            if r_iface is iface and value & mask == net:
                return iface, via or dst
        return iface, dst

    def deliver(self, packet: bytes, iface: Interface) -> None:
        """A packet arrived on ``iface``: for us, or forwarded when we are a router."""
        if len(packet) < 20:
            self.counters["runt"] += 1
            return
        dst = packet[16:20]
        if dst in self._local or self.claims(dst):
            self.receive(packet, iface)
        elif self.forwarding:
            self.counters["forwarded"] += 1
            self.send(packet)
        else:
            self.counters["not-for-us"] += 1

    def claims(self, dst: bytes) -> bool:
        return False

    def receive(self, packet: bytes, iface: Interface) -> None:
        self.counters["received"] += 1
        if self.received is not None:
            self.received.append((self.sim.now, packet))


class Router(Host):
    def __init__(self, sim: Simulator, name: str):
        super().__init__(sim, name, forwarding=True)
