"""``mipsec check FILE...``: a set of configuration files checked together, before anything runs.

Each file is loaded as the daemon would load it (one message per bad file).  Then what must
agree between machines is compared, and every disagreement is reported with both files and both
keys:

* every MN is served by exactly one GW (its home address in ``[[gateway.mobiles]]``) and one HA
  (in ``[[home_agent.mobiles]]``); every MN the GW or HA lists that has a file in the set is
  checked the same way from the other side;
* MN ``gateway`` = GW ``outside_address``; MN ``home_agent`` = HA ``address`` = the GW's
  ``home_agent`` for that MN, which must be one of the GW's ``[[gateway.home_agents]]``;
  MN ``home_prefix`` = HA ``home_prefix``, and the home address lies inside it;
* the MN-HA security association (``msa``: SPI, algorithm, key);
* manual keys: MN ``esp_out`` = GW ``esp_in`` and MN ``esp_in`` = GW ``esp_out`` (SPI,
  transforms, keys, UDP encapsulation); the HA's ``gateway_spi`` is the GW's outbound SPI;
* IKEv2: the same ``sa_source`` and ``handover_mode`` at MN and GW, MN ``ike.local_id`` = GW
  ``ike_id``, MN ``ike.psk`` = GW ``psk``, MN ``ike.remote_id`` = GW ``ike.local_id``;
* HA ``mobiles.gateway`` = GW ``inside_address``, and the HA-GW key (``key_id``, ``key``) the
  same in ``[[home_agent.gateways]]`` and ``[[gateway.home_agents]]``.

Keys are compared, never printed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mipsec.config import DaemonConfig, load_config
from mipsec.errors import ConfigError


@dataclass(frozen=True)
class Problem:
    text: str

    def __str__(self) -> str:
        return self.text


def _ref(cfg: DaemonConfig, key: str) -> str:
    return f"{cfg.path} {key}"


class _Checker:
    def __init__(self, configs: list[DaemonConfig]):
        self.configs = configs
        self.problems: list[str] = []
        self.mns = [c for c in configs if c.role == "mn"]
        self.gws = [c for c in configs if c.role == "gw"]
        self.has = [c for c in configs if c.role == "ha"]

    def differ(self, a: DaemonConfig, akey: str, avalue: Any, b: DaemonConfig, bkey: str,
               bvalue: Any, secret: bool = False) -> None:
        if avalue == bvalue:
            return
        if secret:
            self.problems.append(f"{_ref(a, akey)} and {_ref(b, bkey)} differ")
        else:
            self.problems.append(f"{_ref(a, akey)} = {avalue!r} but {_ref(b, bkey)} = "
                                 f"{bvalue!r}")

    def run(self) -> list[str]:
        for mn in self.mns:
            self.mobile(mn)
        for gw in self.gws:
            for ha in self.has:
                self.gw_ha(gw, ha)
        self.servers_without_mn_files()
        return self.problems

    # --- one MN against its GW and HA ----------------------------------------------------------

    def _serving(self, servers: list[DaemonConfig], home: str) -> list[tuple[DaemonConfig, int,
                                                                               Any]]:
        return [(s, i, m) for s in servers for i, m in enumerate(s.node.mobiles)
                if m.home_address == home]

    def mobile(self, mn: DaemonConfig) -> None:
        node = mn.node
        home = node.home_address
        where = f"[mobile_node] home_address {home}"
        for kind, servers, table in (("GW", self.gws, "gateway"), ("HA", self.has, "home_agent")):
            found = self._serving(servers, home)
            if not found:
                if servers:
                    self.problems.append(f"{_ref(mn, where)}: no {kind} file of the set lists it "
                                         f"in [[{table}.mobiles]] "
                                         f"({', '.join(s.path for s in servers)})")
            elif len(found) > 1:
                self.problems.append(f"{_ref(mn, where)}: more than one {kind} serves it: "
                                     f"{', '.join(s.path for s, _, _ in found)}")
        gws = self._serving(self.gws, home)
        has = self._serving(self.has, home)
        if len(gws) == 1:
            self.mn_gw(mn, *gws[0])
        if len(has) == 1:
            self.mn_ha(mn, *has[0])
            if len(gws) == 1:
                gw, _, gm = gws[0]
                ha, hi, hm = has[0]
                self.differ(ha, f"[[home_agent.mobiles]][{hi}] gateway", hm.gateway,
                            gw, "[gateway] inside_address", gw.node.inside_address)
                if mn.daemon.sa_source == "manual" and gm.esp_out is not None \
                        and hm.gateway_spi:
                    self.differ(ha, f"[[home_agent.mobiles]][{hi}] gateway_spi",
                                hm.gateway_spi, gw, f"[[gateway.mobiles]] ({home}) esp_out.spi",
                                gm.esp_out.spi)
                self.differ(gw, f"[[gateway.mobiles]] ({home}) home_agent", gm.home_agent,
                            ha, "[home_agent] address", ha.node.address)

    def mn_gw(self, mn: DaemonConfig, gw: DaemonConfig, index: int, gm: Any) -> None:
        node = mn.node
        gmk = f"[[gateway.mobiles]][{index}]"
        self.differ(mn, "[mobile_node] gateway", node.gateway, gw, "[gateway] outside_address",
                    gw.node.outside_address)
        self.differ(mn, "[mobile_node] home_agent", node.home_agent, gw, f"{gmk} home_agent",
                    gm.home_agent)
        self.differ(mn, "[daemon] sa_source", mn.daemon.sa_source, gw, "[daemon] sa_source",
                    gw.daemon.sa_source)
        self.differ(mn, "[mobile_node] handover_mode", node.handover_mode, gw,
                    "[gateway] handover_mode", gw.node.handover_mode)
        if mn.daemon.sa_source != gw.daemon.sa_source:
            return
        if mn.daemon.sa_source == "manual":
            for mine, theirs in (("esp_out", "esp_in"), ("esp_in", "esp_out")):
                a, b = getattr(node, mine), getattr(gm, theirs)
                if a is None or b is None:
                    continue
                for field in ("spi", "encryption", "integrity", "udp_encap"):
                    self.differ(mn, f"[mobile_node.{mine}] {field}", getattr(a, field),
                                gw, f"{gmk} {theirs}.{field}", getattr(b, field))
                for field in ("encryption_key", "integrity_key"):
                    self.differ(mn, f"[mobile_node.{mine}] {field}", getattr(a, field),
                                gw, f"{gmk} {theirs}.{field}", getattr(b, field), secret=True)
        elif node.ike is not None:
            self.differ(mn, "[mobile_node.ike] local_id", node.ike.local_id, gw,
                        f"{gmk} ike_id", gm.ike_id)
            self.differ(mn, "[mobile_node.ike] psk", node.ike.psk, gw, f"{gmk} psk", gm.psk,
                        secret=True)
            if gw.node.ike is not None and node.ike.remote_id:
                self.differ(mn, "[mobile_node.ike] remote_id", node.ike.remote_id, gw,
                            "[gateway.ike] local_id", gw.node.ike.local_id)

    def mn_ha(self, mn: DaemonConfig, ha: DaemonConfig, index: int, hm: Any) -> None:
        node = mn.node
        hmk = f"[[home_agent.mobiles]][{index}]"
        self.differ(mn, "[mobile_node] home_agent", node.home_agent, ha, "[home_agent] address",
                    ha.node.address)
        self.differ(mn, "[mobile_node] home_prefix", node.home_prefix, ha,
                    "[home_agent] home_prefix", ha.node.home_prefix)
        try:
            inside = ipaddress.IPv4Address(node.home_address) in ipaddress.IPv4Network(
                ha.node.home_prefix, strict=False)
        except ValueError:
            inside = False
        if not inside:
            self.problems.append(f"{_ref(mn, '[mobile_node] home_address')} = "
                                 f"{node.home_address!r} is outside "
                                 f"{_ref(ha, '[home_agent] home_prefix')} = "
                                 f"{ha.node.home_prefix!r}")
        for field in ("spi", "algorithm"):
            self.differ(mn, f"[mobile_node.msa] {field}", getattr(node.msa, field), ha,
                        f"{hmk} msa.{field}", getattr(hm.msa, field))
        self.differ(mn, "[mobile_node.msa] key", node.msa.key, ha, f"{hmk} msa.key", hm.msa.key,
                    secret=True)

    # --- GW <-> HA -----------------------------------------------------------------------------

    def gw_ha(self, gw: DaemonConfig, ha: DaemonConfig) -> None:
        serves = any(m.gateway == gw.node.inside_address for m in ha.node.mobiles) or any(
            m.home_agent == ha.node.address for m in gw.node.mobiles)
        if not serves:
            return
        ghs = [(i, h) for i, h in enumerate(gw.node.home_agents) if h.address == ha.node.address]
        hgs = [(i, g) for i, g in enumerate(ha.node.gateways) if g.address == gw.node.inside_address]
        if not ghs:
            self.problems.append(f"{_ref(gw, '[[gateway.home_agents]]')}: no entry for the HA "
                                 f"{ha.node.address} of {_ref(ha, '[home_agent] address')}")
        if not hgs:
            self.problems.append(f"{_ref(ha, '[[home_agent.gateways]]')}: no entry for the GW "
                                 f"{gw.node.inside_address} of "
                                 f"{_ref(gw, '[gateway] inside_address')}")
        if ghs and hgs:
            (gi, gh), (hi, hg) = ghs[0], hgs[0]
            self.differ(gw, f"[[gateway.home_agents]][{gi}] key_id", gh.key_id, ha,
                        f"[[home_agent.gateways]][{hi}] key_id", hg.key_id)
            self.differ(gw, f"[[gateway.home_agents]][{gi}] key", gh.key, ha,
                        f"[[home_agent.gateways]][{hi}] key", hg.key, secret=True)
            if hg.outside_address:
                self.differ(ha, f"[[home_agent.gateways]][{hi}] outside_address",
                            hg.outside_address, gw, "[gateway] outside_address",
                            gw.node.outside_address)

    def servers_without_mn_files(self) -> None:
        """An MN the GW serves must be known to an HA of the set (and the other way round)."""
        if not (self.gws and self.has):
            return
        for gw in self.gws:
            for i, m in enumerate(gw.node.mobiles):
                if not self._serving(self.has, m.home_address):
                    self.problems.append(f"{_ref(gw, f'[[gateway.mobiles]][{i}] home_address')}"
                                         f" {m.home_address}: no HA file of the set lists it")
        for ha in self.has:
            for i, m in enumerate(ha.node.mobiles):
                if not self._serving(self.gws, m.home_address):
                    self.problems.append(
                        f"{_ref(ha, f'[[home_agent.mobiles]][{i}] home_address')} "
                        f"{m.home_address}: no GW file of the set lists it")


def check_files(paths: Iterable[str]) -> tuple[list[DaemonConfig], list[str]]:
    """(the configurations that loaded, every problem found: load errors, then mismatches)."""
    configs, problems = [], []
    for path in paths:
        try:
            configs.append(load_config(path))
        except ConfigError as exc:
            problems.append(str(exc))
    return configs, problems + check_set(configs)


def check_set(configs: list[DaemonConfig]) -> list[str]:
    return _Checker(configs).run()
