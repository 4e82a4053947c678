"""A new configuration applied to a running role, changing only what changed (sans-I/O).

``reconfigure(role, new_config, now)`` returns ``(actions, changes)``: the actions to carry out
(the HA unsteering a removed MN's home address) and one line per change for the log.  What it
cannot apply in place raises ``NeedsRestart`` naming the key, and then nothing was changed (every
check runs before the first change).

What changes in place:

* **GW**: ``[[gateway.mobiles]]`` added, removed or changed.  An added or changed MN with manual
  keys gets its SA pair installed (a changed one replaces only its own; its outbound SA waits
  for the next SIU as at start); an IKEv2 MN's identity and PSK take effect for its next IKE SA
  (a running one is kept).  Every other MN keeps its SAs, bindings and counters.
* **HA**: ``[[home_agent.mobiles]]`` added, removed (its binding ends: ``BindingChanged`` to
  home) or changed (a new MN-HA key starts a new identification history); ``max_lifetime_s``
  for the next registrations.
* **MN**: the registration timers (``lifetime_s``, ``renew_fraction``, ``retransmit_*``,
  ``max_attempts``) for the next request.

Addresses, prefixes, HA-GW keys, IKE settings and handover modes need a restart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mipsec.errors import MipsecError
from mipsec.node import timeline as tl
from mipsec.node.actions import Action, BindingChanged


class NeedsRestart(MipsecError):
    """A change that cannot be applied to a running role."""


MN_RELOADABLE = frozenset({"lifetime_s", "renew_fraction", "retransmit_initial_s",
                           "retransmit_max_s", "max_attempts"})
GW_RELOADABLE = frozenset({"mobiles"})
HA_RELOADABLE = frozenset({"mobiles", "max_lifetime_s"})


def _fixed(old: Any, new: Any, reloadable: frozenset[str], section: str) -> None:
    for f in dataclasses.fields(old):
        if f.name not in reloadable and getattr(old, f.name) != getattr(new, f.name):
            raise NeedsRestart(f"[{section}] {f.name} changed: that needs a restart")


def _changed_fields(old: Any, new: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def reconfigure(role: Any, new: Any, now: float) -> tuple[list[Action], list[str]]:
    kind = type(role).__name__
    if kind in ("VpnGateway", "HomeAgent"):
        result = (_gateway if kind == "VpnGateway" else _home_agent)(role, new, now)
        if hasattr(role.timeline, "max_events"):     # its bound follows the number of MNs
            role.timeline.max_events = tl.limit_for(len(new.mobiles) + 1)
        return result
    return _mobile_node(role, new, now)


def _mobile_node(mn: Any, new: Any, now: float) -> tuple[list[Action], list[str]]:
    old = mn.config
    _fixed(old, new, MN_RELOADABLE, "mobile_node")
    changes = [f"{name}: {getattr(old, name)} -> {getattr(new, name)}"
               for name in _changed_fields(old, new)]
    mn.config = new
    return [], changes


def _gateway(gw: Any, new: Any, now: float) -> tuple[list[Action], list[str]]:
    from mipsec.ipsec.sa import Direction
    from mipsec.node.gateway import UNBOUND_ADDRESS
    from mipsec.node.mobile_node import make_sa

    old = gw.config
    _fixed(old, new, GW_RELOADABLE, "gateway")
    before = {m.home_address: m for m in old.mobiles}
    after = {m.home_address: m for m in new.mobiles}
    for home, m in after.items():
        if m.home_agent not in gw._home_agents and not m.road_warrior:
            raise NeedsRestart(f"[[gateway.mobiles]] {home}: home_agent {m.home_agent} is not "
                               f"one of the running [[gateway.home_agents]]")
        if m.esp_in is None and gw.ike is None:
            raise NeedsRestart(f"[[gateway.mobiles]] {home}: the first IKEv2 mobile needs a "
                               f"restart (the IKE responder is not running)")
    changes: list[str] = []
    for home in before.keys() - after.keys():
        if home in gw.mobiles:
            gw.remove_mobile(home)
        changes.append(f"mobile {home} removed")
    for home, m in after.items():
        was = before.get(home)
        if was == m:
            continue
        if m.esp_in is not None:
            inbound = make_sa(m.esp_in, Direction.INBOUND, local=gw.outside, remote=None,
                              now=now, random=gw._random)
            outbound = make_sa(m.esp_out, Direction.OUTBOUND, local=gw.outside,
                               remote=UNBOUND_ADDRESS, now=now, random=gw._random)
            gw.install_mobile(home, inbound, outbound, home_agent=m.home_agent,
                              allowed_destinations=m.allowed_destinations, now=now,
                              road_warrior=m.road_warrior)
            if gw.ike is not None:
                gw.ike.endpoint.reserve_esp_spi(inbound.spi)
        elif was is not None and was.esp_in is not None and home in gw.mobiles:
            gw.remove_mobile(home)            # manual keys -> IKEv2: its SAs come from IKE now
        elif home in gw.mobiles and was is not None and (
                was.home_agent != m.home_agent or was.road_warrior != m.road_warrior
                or was.allowed_destinations != m.allowed_destinations):
            gw.remove_mobile(home)            # IKE's next child SA installs it anew
        changes.append(f"mobile {home} {'added' if was is None else 'changed'}")
    by_ike_id = {m.ike_id: m for m in new.mobiles if m.ike_id}
    gw._by_ike_id = by_ike_id
    if gw.ike is not None and by_ike_id:
        endpoint = gw.ike.endpoint
        endpoint.config = dataclasses.replace(
            endpoint.config, psks={m.ike_id: m.psk for m in by_ike_id.values()})
    gw.config = new
    return [], changes


def _home_agent(ha: Any, new: Any, now: float) -> tuple[list[Action], list[str]]:
    from mipsec.mip.security import MobilitySecurityAssociation

    old = ha.config
    _fixed(old, new, HA_RELOADABLE, "home_agent")
    before = {m.home_address: m for m in old.mobiles}
    after = {m.home_address: m for m in new.mobiles}
    actions: list[Action] = []
    changes: list[str] = []
    for home in before.keys() - after.keys():
        m = ha._mobiles.pop(home, None)
        if m is not None:
            ha._msa_by_spi.pop(m.msa.spi, None)
        if ha.bindings.pop(home, None) is not None:
            actions.append(BindingChanged(home, None))
        changes.append(f"mobile {home} removed")
    for home, m in after.items():
        was = before.get(home)
        if was == m:
            continue
        ha._mobiles[home] = m
        if was is None or was.msa != m.msa:     # an unchanged MSA keeps its identifications
            if was is not None:
                ha._msa_by_spi.pop(was.msa.spi, None)
            ha._msa_by_spi[m.msa.spi] = (
                MobilitySecurityAssociation(m.msa.spi, m.msa.key, m.msa.algorithm), home)
        changes.append(f"mobile {home} {'added' if was is None else 'changed'}")
    if old.max_lifetime_s != new.max_lifetime_s:
        changes.append(f"max_lifetime_s: {old.max_lifetime_s} -> {new.max_lifetime_s}")
    ha.config = new
    return actions, changes
