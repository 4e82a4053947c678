"""Faults of an HA group in the live lab (``up(ha_standbys=1)``): events for ``recovery``.

Each event makes one fault happen under the CN <-> MN stream of ``mipsec.lab.recovery`` and
returns, besides ``ready`` (the moment an HA serves again), what the checks need:

* ``kill-active-ha``: SIGKILL to the active HA.  ``bindings_before`` / ``bindings_after``: the
  bindings the old active served and those the new one serves (none may be lost);
* ``kill-etcd-leader``: SIGKILL to the etcd member that leads, then a registration (MN moves
  a -> b) that must be accepted after the election; ``registered_ms`` from the kill;
* ``partition-active-ha``: the active HA's store link goes down (``ip link set st0 down``): it
  can renew nothing, fences itself and exits; a standby takes over.  ``serving`` lists the HAs
  holding the service address afterwards (exactly one), ``old_fenced`` whether the old one said
  it fenced itself.

``takeover_ms`` is from the event to the moment the new active reported serving (its status);
the stream figures (interruption, loss) come from ``recovery``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from typing import Any

from mipsec.lab import topology as topo
from mipsec.lab.lab import Lab, pid_alive
from mipsec.lab.recovery import Scenario, _wait_gone

TAKEOVER_TIMEOUT_S = 20.0


def _bindings(lab: Lab, name: str) -> dict[str, str]:
    from mipsec.io import control
    status = control.request(lab.socket(name), "status", timeout=2.0)
    return {h: b["care_of"] for h, b in status["node"]["bindings"].items()}


def holders(lab: Lab) -> list[str]:
    """The HAs whose home interface holds the HA service address now."""
    out = []
    for name in lab.has:
        proc = lab.exec(name, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
        if f" {topo.HA}/" in proc.stdout:
            out.append(name)
    return out


def kill_active_ha(lab: Lab) -> dict[str, Any]:
    t0 = time.monotonic()
    old = lab.wait_active()
    before = _bindings(lab, old)
    pid = lab.pid(old)
    lab.kill(old, signal.SIGKILL)
    _wait_gone(pid)
    new = lab.wait_active(TAKEOVER_TIMEOUT_S, not_=old)
    ready = time.monotonic()
    return {"ready": ready, "takeover_ms": (ready - t0) * 1000, "old": old, "new": new,
            "bindings_before": before, "bindings_after": _bindings(lab, new)}


_LEADER_PY = """
import http.client, json, sys
for i, url in enumerate(sys.argv[1:]):
    host, port = url.split("//")[1].split(":")
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=1.0)
        c.request("POST", "/v3/maintenance/status", body="{}")
        st = json.loads(c.getresponse().read())
        if st.get("leader") and st["leader"] == st["header"]["member_id"]:
            print(i)
            break
    except OSError:
        pass
"""


def etcd_leader(lab: Lab) -> int:
    """The index of the etcd member that leads now (asked from the store network)."""
    proc = subprocess.run(["ip", "netns", "exec", lab.names.ns("db"), lab.python, "-c",
                           _LEADER_PY, *topo.etcd_endpoints()],
                          capture_output=True, text=True, timeout=10)
    if not proc.stdout.strip():
        raise RuntimeError(f"no etcd leader found: {proc.stderr.strip()}")
    return int(proc.stdout.split()[0])


def kill_etcd_leader(lab: Lab) -> dict[str, Any]:
    t0 = time.monotonic()
    index = etcd_leader(lab)
    member = lab.etcd_members[index]
    pid = lab.pid(member)
    lab.kill(member, signal.SIGKILL)
    _wait_gone(pid)
    # a registration after the election: the MN moves and must be accepted
    lab.move("b", wait=True, timeout=TAKEOVER_TIMEOUT_S)
    ready = time.monotonic()
    return {"ready": ready, "killed": member, "registered_ms": (ready - t0) * 1000,
            "active_after": lab.active_ha()}


def partition_active_ha(lab: Lab) -> dict[str, Any]:
    t0 = time.monotonic()
    old = lab.wait_active()
    before = _bindings(lab, old)
    topo.run("link", "set", "st0", "down", ns=lab.names.ns(old))
    new = lab.wait_active(TAKEOVER_TIMEOUT_S, not_=old)
    ready = time.monotonic()
    pid = lab.pid(old)
    _wait_gone(pid, timeout=5.0)             # the fenced HA exits (status 3)
    return {"ready": ready, "takeover_ms": (ready - t0) * 1000, "old": old, "new": new,
            "serving": holders(lab), "old_exited": pid is None or not pid_alive(pid),
            "old_fenced": "fenced" in lab.log_tail(old, 40),
            "bindings_before": before, "bindings_after": _bindings(lab, new)}


GROUP = {"ha_standbys": 1}

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("kill-active-ha", "downlink resumes, no binding lost, no MN re-registers",
             kill_active_ha, after_s=4.0, lab=GROUP),
    Scenario("kill-etcd-leader", "registrations continue after the etcd election",
             kill_etcd_leader, after_s=3.0, lab=GROUP),
    Scenario("partition-active-ha", "the cut-off active fences itself; exactly one HA serves",
             partition_active_ha, after_s=4.0, lab=GROUP),
]}


def summary(outcome: Any) -> str:
    return json.dumps({"name": outcome.name, "error": outcome.error,
                       "directions": outcome.directions,
                       "detail": {k: v for k, v in outcome.detail.items() if k != "timeline"}},
                      default=str)


__all__ = ["SCENARIOS", "holders", "etcd_leader", "summary"]
