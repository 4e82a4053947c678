"""The live-lab attack harness: a lab with several MNs, the state an attack must not change, the
drop counters it must raise, and traffic that must keep flowing.

* ``started_lab(prefix, ...)``: ``Lab.up`` with the requirement check (FAILS in CI, skips
  elsewhere) and a teardown that leaves no namespace behind;
* ``state(lab)``: what an unauthenticated or misdirected message must not move: each MN's GW
  binding and SA pair (SPIs and outer addresses), the HA's bindings, the established IKE SAs;
* ``drops(lab, role)``: the role's drop counters by reason, from ``mipsec status --json``
  (node drops, SAD drops and every SA's own drops added up);
* ``Listener`` / ``send``: UDP datagrams from one namespace to another, counted on arrival
  (``downlink(lab, k)``: CN -> MN k's home address; ``uplink``: MN k -> CN);
* ``wait_until``: poll a check instead of sleeping a guessed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import needs
from mipsec.lab.lab import Lab, requirements_problem
from mipsec.lab.topology import CN, existing_namespaces

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "labtool.py")
PORT = 40404


def require(nft: bool = False) -> None:
    problem = requirements_problem()
    if problem is None and nft:
        import shutil
        if shutil.which("nft") is None:
            problem = "the NAT'd visited network needs nftables (Debian package nftables)"
    needs.need(problem, f"the live-lab security tests are required in CI: {problem}")


@contextlib.contextmanager
def started_lab(prefix: str, **up: Any) -> Iterator[Lab]:
    require(nft=bool(up.get("nat")))
    lab = Lab(prefix=prefix)
    lab.down()
    try:
        lab.up(**up)
        yield lab
    finally:
        lab.down()
    assert existing_namespaces(prefix) == []


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


def wait_until(check: Callable[[], Any], timeout: float = 10.0, every: float = 0.1) -> Any:
    """``check()``'s first true result; fails with its last AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
            problem: Any = result
        except AssertionError as exc:
            problem = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {problem}")
        time.sleep(every)


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


def tool(lab: Lab, node: str, *args: str, timeout: float = 300) -> str:
    proc = lab.exec(node, sys.executable, TOOL, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
