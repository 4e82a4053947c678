"""The live-lab attack harness: a lab with several MNs, the state an attack must not change, the
drop counters it must raise, and traffic that must keep flowing.

* ``state(lab)``: what an unauthenticated or misdirected message must not move: each MN's GW
  binding and SA pair (SPIs and outer addresses), the HA's bindings, the established IKE SAs;
* ``drops(lab, role)``: the role's drop counters by reason, from ``mipsec status --json``
  (node drops, SAD drops and every SA's own drops added up);
* ``Listener`` / ``send``: UDP datagrams from one namespace to another, counted on arrival
  (``downlink(lab, k)``: CN -> MN k's home address; ``uplink``: MN k -> CN);

Starting and tearing down the lab, and ``wait_until``, are ``tests/labs.py``'s (shared with the
lab level).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from typing import Any

from mipsec.lab.lab import Lab
from mipsec.lab.topology import CN

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "labtool.py")
PORT = 40404


def status(lab: Lab, role: str) -> dict[str, Any]:
    """A lab daemon's status reply: what `mipsec status --json` prints (``cli_status``), read
    straight from its control socket (the attacks poll it while a race window is open)."""
    reply = lab.status(role)
    assert reply.get("ok"), reply
    return reply


def cli_status(lab: Lab, role: str) -> dict[str, Any]:
    """``mipsec status --socket ... --json`` of a lab daemon, as the operator reads it."""
    proc = subprocess.run([sys.executable, "-m", "mipsec", "status", "--socket", lab.socket(role),
                           "--json"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def drops(lab: Lab, role: str) -> Counter:
    node = status(lab, role)["node"]
    out: Counter = Counter()
    for key in ("drops", "sad_drops"):
        out.update(node.get(key) or {})
    for mobile in (node.get("mobiles") or {}).values():
        for sa in (mobile.get("sas") or {}).values():
            if isinstance(sa, dict):
                out.update((sa.get("counters") or {}).get("drops") or {})
    for sa in (node.get("sas") or {}).values():
        if isinstance(sa, dict):
            out.update((sa.get("counters") or {}).get("drops") or {})
    return out


def state(lab: Lab) -> dict[str, Any]:
    """Bindings and SAs of GW and HA, and the established IKE SAs (what attacks must not move)."""
    gw, ha = status(lab, "gw")["node"], status(lab, "ha")["node"]
    mobiles = {}
    for home, m in gw["mobiles"].items():
        sas = m.get("sas") or {}
        mobiles[home] = {
            "binding": m.get("binding"), "care_of": m.get("care_of"),
            "out": (sas.get("outbound") or {}).get("spi"),
            "out_remote": (sas.get("outbound") or {}).get("remote"),
            "in": (sas.get("inbound") or {}).get("spi")}
    ike = sorted((sa["peer_id"], sa["spi_i"], sa["spi_r"], sa.get("remote"))
                 for sa in (gw.get("ike") or {}).get("ike_sas", []) if sa["state"] == "established")
    bindings = {home: b["care_of"] for home, b in ha["bindings"].items()}
    return {"gw": mobiles, "ha": bindings, "ike": ike}


def registered(lab: Lab, k: int, where: str) -> bool:
    """MN k registered at its CoA on ``where``, and HA and GW agree."""
    home, coa = lab.home_address(k), lab.care_of(where, k)
    mn = status(lab, lab.mn(k))["node"]
    s = state(lab)
    assert mn["state"] == "registered" and mn["care_of"] == coa, (mn["state"], mn["care_of"])
    assert s["ha"].get(home) == coa, s["ha"]
    assert s["gw"][home]["out_remote"] is not None, s["gw"][home]
    return True


class Listener:
    """A UDP listener in a lab namespace; ``tokens()`` what it received (after it ended)."""

    def __init__(self, lab: Lab, node: str, port: int = PORT, seconds: float = 3.0):
        self.proc = lab.popen(node, sys.executable, TOOL, "listen", str(port), str(seconds),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line.strip() == "ready", (line, self.proc.stderr.read() if self.proc.stderr else "")

    def tokens(self) -> list[str]:
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return [line.split(" ", 1)[1] for line in out.splitlines() if " " in line]


def send(lab: Lab, node: str, dst: str, count: int, token: str, port: int = PORT,
         interval: float = 0.02) -> None:
    proc = lab.exec(node, sys.executable, TOOL, "send", dst, str(port), str(count), token,
                    str(interval), timeout=120)
    assert proc.returncode == 0, proc.stderr


def delivered(lab: Lab, src: str, dst_node: str, dst: str, count: int = 20,
              token: str = "probe") -> int:
    """How many of ``count`` datagrams ``src`` sends to ``dst`` arrive in ``dst_node``."""
    listener = Listener(lab, dst_node, seconds=count * 0.02 + 2.0)
    send(lab, src, dst, count, token)
    return sum(1 for t in listener.tokens() if t.startswith(token + " "))


def downlink(lab: Lab, k: int, count: int = 20) -> int:
    return delivered(lab, "cn", lab.mn(k), lab.home_address(k), count, f"down{k}")


def uplink(lab: Lab, k: int, count: int = 20) -> int:
    return delivered(lab, lab.mn(k), "cn", CN, count, f"up{k}")


def nft_drops_to(lab: Lab, node: str, address: str) -> int:
    """Packets counted by the ``counter drop`` rules of ``node``'s nftables ruleset that match
    destination ``address`` (the GW's host filter: nothing from outside to its inside address)."""
    proc = lab.exec(node, "nft", "-j", "list", "ruleset")
    assert proc.returncode == 0, proc.stderr
    total = 0
    for item in json.loads(proc.stdout).get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        exprs = rule.get("expr", [])
        kinds = [next(iter(e)) for e in exprs if isinstance(e, dict)]
        matches_dst = any(
            e.get("match", {}).get("left", {}).get("payload", {}).get("field") == "daddr"
            and e["match"].get("right") == address for e in exprs if "match" in e)
        if matches_dst and "counter" in kinds and "drop" in kinds:
            total += next(e["counter"]["packets"] for e in exprs if "counter" in e)
    return total


def host_refusals(lab: Lab, node: str, address: str) -> int:
    """Packets ``node``'s kernel refused before any socket: the reverse-path filter's count
    (``IPReversePathFilter``, /proc/net/netstat) plus the nftables drops to ``address``."""
    proc = lab.exec(node, "cat", "/proc/net/netstat")
    assert proc.returncode == 0, proc.stderr
    rp = 0
    lines = [line.split() for line in proc.stdout.splitlines()]
    for keys, values in pairwise(lines):
        if keys and keys[0] == "TcpExt:" and values and values[0] == "TcpExt:" \
                and "IPReversePathFilter" in keys and keys != values:
            rp = int(values[keys.index("IPReversePathFilter")])
    return rp + nft_drops_to(lab, node, address)


def hold(lab: Lab, node: str, family: str, table: str, rule: str, on: bool,
         priority: int = 0) -> None:
    """With ``on``, an nftables table ``table`` (``family``: ip, bridge) in ``node`` whose forward
    hook drops what ``rule`` matches; without, that table removed."""
    if on:
        rules = (f"table {family} {table} {{\n  chain forward {{\n"
                 f"    type filter hook forward priority {priority}; policy accept;\n"
                 f"    {rule} drop\n  }}\n}}\n")
        proc = lab.exec(node, "nft", "-f", "-", input=rules)
    else:
        proc = lab.exec(node, "nft", "delete", "table", family, table)
    assert proc.returncode == 0, proc.stderr


def tool(lab: Lab, node: str, *args: str, timeout: float = 300) -> str:
    proc = lab.exec(node, sys.executable, TOOL, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
