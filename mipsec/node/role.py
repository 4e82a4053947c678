"""What every role offers its runtime (the daemon, the simulator): the ``Role`` protocol.

A runtime builds a role with ``build_role`` and from then on uses only these members: feed it
packets, events and timer expiries with the current time, carry out the actions it returns,
and read its status, timeline, drop counters and ESP SAs.  No runtime needs a role's
constructor signature or its private attributes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from mipsec.drops import DropReason
from mipsec.errors import UsageError
from mipsec.node.actions import Action, TimelineEvent

if TYPE_CHECKING:
    from mipsec.ipsec.sa import SecurityAssociation

ROLE_KINDS = ("mn", "gw", "ha")


class Role(Protocol):
    """The sans-I/O surface of ``MobileNode``, ``VpnGateway`` and ``HomeAgent``."""

    name: str
    timeline: list[TimelineEvent]
    drops: Counter[DropReason]

    def receive_from_net(self, packet: bytes, now: float) -> list[Action]: ...
    def receive_from_tun(self, packet: bytes, now: float) -> list[Action]: ...
    def handle_event(self, event: object, now: float) -> list[Action]: ...
    def handle_timer(self, now: float) -> list[Action]: ...
    def get_timer(self) -> float | None: ...
    def status(self) -> dict[str, Any]: ...
    def esp_sas(self) -> list[SecurityAssociation]:
        """Every ESP SA the role holds now (current pairs, re-keyed inbound SAs in their
        grace period); an HA holds none."""
        ...


def build_role(kind: str, config: Any, *, wallclock: Callable[[], float], now: float) -> Role:
    """The role ``kind`` ("mn", "gw" or "ha") for its configuration; ``wallclock`` (Unix
    seconds) stamps MIPv4 identifications and SIUs, ``now`` (the runtime's monotonic clock) is
    when its configured SAs' lifetimes start."""
    if kind == "mn":
        from mipsec.node.mobile_node import MobileNode
        return MobileNode(config, wallclock=wallclock, now=now)
    if kind == "gw":
        from mipsec.node.gateway import VpnGateway
        return VpnGateway(config, wallclock=wallclock, now=now)
    if kind == "ha":
        from mipsec.node.home_agent import HomeAgent
        return HomeAgent(config, wallclock=wallclock)
    raise UsageError(f"unknown role {kind!r}: one of {', '.join(ROLE_KINDS)}")
