"""IKEv2 inside a role (sans-I/O): the glue between ``mipsec.ike.IkeEndpoint`` and the roles.

``RoleIke`` owns one ``IkeEndpoint`` and speaks the roles' language: whole IPv4 packets in,
actions out.  Both the simulator and the daemons get IKE this way, unchanged:

* ``is_ike(packet)``: UDP to port 500, or to port 4500 with the RFC 3948 non-ESP marker (or a
  NAT keepalive).  ESP in UDP 4500 (no marker) stays with the SAs.
* ``receive(packet, now)`` feeds the UDP payload to the endpoint with the packet's addresses and
  ports; ``run(outputs, interface)`` turns the endpoint's outputs into role actions: every
  ``SendDatagram`` becomes a ``SendToNet`` of a complete IPv4 + UDP packet (UDP checksum on,
  RFC 768), the events are returned separately for the role to act on (install SAs, re-key ...).
* the endpoint's timer is merged into the role's ``get_timer`` / ``handle_timer``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from mipsec.constants import IKE_PORT as IKE_PORT
from mipsec.ike.config import IkeConfig
from mipsec.ike.constants import NAT_KEEPALIVE, NON_ESP_MARKER
from mipsec.ike.endpoint import IkeEndpoint
from mipsec.ike.events import SendDatagram
from mipsec.node.actions import Action, SendToNet
from mipsec.node.packet import IPPROTO_UDP, NAT_T_PORT, a2b, b2a, build_udp_packet, parse_udp_packet


class RoleIke:
    def __init__(self, config: IkeConfig, *, random: Callable[[int], bytes] | None = None):
        self.endpoint = IkeEndpoint(config, random=random or os.urandom)
        self.config = config
        self.last_events: list[tuple[float, str]] = []     # for status: (time, what)

    @staticmethod
    def is_ike(packet: bytes, proto: int, ihl: int) -> bool:
        if proto != IPPROTO_UDP or len(packet) < ihl + 8:
            return False
        dport = int.from_bytes(packet[ihl + 2:ihl + 4], "big")
        if dport == IKE_PORT:
            return True
        if dport == NAT_T_PORT:
            payload = packet[ihl + 8:ihl + 12]
            return payload == NON_ESP_MARKER or packet[ihl + 8:] == NAT_KEEPALIVE
        return False

    def receive(self, packet: bytes, now: float) -> list:
        """The endpoint's outputs for one IKE packet.  A packet whose IPv4 + UDP framing does not
        parse raises ``ParseError`` (a parser's convention, docs/design.md "Errors"): the role
        counts its reason; what is wrong inside the datagram the endpoint counts itself."""
        src, dst, sport, dport, payload = parse_udp_packet(packet)
        return self.endpoint.receive_datagram(payload, (b2a(dst), dport), (b2a(src), sport), now)

    @staticmethod
    def run(outputs: list, interface: str | None = None) -> tuple[list[Action], list[Any]]:
        """(actions, events): datagrams become ``SendToNet``; events keep their order."""
        actions: list[Action] = []
        events: list[Any] = []
        for out in outputs:
            if out.__class__ is SendDatagram:
                actions.append(SendToNet(build_udp_packet(
                    a2b(out.local[0]), a2b(out.remote[0]), out.local[1], out.remote[1], out.data),
                    interface))
            else:
                events.append(out)
        return actions, events

    @staticmethod
    def actions(outputs: list, on_event: Callable[[Any], list[Action]],
                interface: str | None = None) -> list[Action]:
        """The role's actions for the endpoint's outputs, in their order: a datagram becomes a
        ``SendToNet`` (as ``run``), an event whatever ``on_event`` makes of it."""
        actions: list[Action] = []
        for out in outputs:
            if out.__class__ is SendDatagram:
                actions += RoleIke.run([out], interface)[0]
            else:
                actions += on_event(out)
        return actions

    def get_timer(self) -> float | None:
        return self.endpoint.get_timer()

    def handle_timer(self, now: float) -> list:
        return self.endpoint.handle_timer(now)

    def note(self, now: float, what: str, rekey: bool = False) -> None:
        self.last_events.append((now, what))
        del self.last_events[:-16]
        if rekey:
            self.last_rekey = now

    last_rekey: float | None = None

    def status(self) -> dict[str, Any]:
        """For ``mipsec status``: each IKE SA (SPIs, state, peer, addresses, children), when it
        was established, the last re-key (child or IKE SA) and the last IKE events."""
        st = self.endpoint.status()
        st["last_rekey_time"] = self.last_rekey
        st["events"] = [{"time": t, "event": w} for t, w in self.last_events]
        return st
