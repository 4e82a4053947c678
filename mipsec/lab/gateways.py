"""A GW of a pool killed under traffic, measured in the lab (``benchmarks/bench_cluster.py``).

``gw_killed(lab)`` needs a lab that is up with ``gateways >= 2`` and its MNs registered
(``mipsec lab up --gateways 2 --mobiles 4``).  Every MN pings the CN (``ping -D``: each reply
with its arrival time) while GW ``k`` is killed with SIGKILL; it returns, per MN, which GW
served it before and after, the longest gap between two replies, the replies lost and whether
it came back.  The MNs of the surviving GWs are the reference of the same run: what the kill
costs an MN that keeps its GW (nothing, if the pool works).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from mipsec.lab.lab import Lab
from mipsec.lab.topology import CN, LabError
from mipsec.node.config import lab_gateway_addresses

PING_INTERVAL_S = 0.05          # ping's floor for root is 0.002 s; 20 a second is plenty here


@dataclass(frozen=True)
class MobileOutcome:
    mn: str
    gateway_before: str
    gateway_after: str
    on_killed_gw: bool
    recovered: bool             # registered again (through another GW for the killed GW's MNs)
    sent: int
    received: int
    longest_gap_s: float        # between two consecutive replies around the kill

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _replies(output: str) -> tuple[int, list[float]]:
    """(highest sequence number sent, arrival times of the replies) from ``ping -D`` output."""
    times, highest = [], 0
    for line in output.splitlines():
        if "icmp_seq=" not in line:
            continue
        seq = int(line.split("icmp_seq=")[1].split()[0])
        highest = max(highest, seq)
        if "bytes from" in line and line.startswith("["):
            times.append(float(line[1:line.index("]")]))
    return highest, times


def gw_killed(lab: Lab, k: int = 1, *, settle_s: float = 2.0, recover_bound_s: float = 60.0,
              after_s: float = 2.0) -> list[MobileOutcome]:
    """Kill GW ``k`` (SIGKILL) while every MN pings the CN; the outcome per MN."""
    if lab.gateways < 2:
        raise LabError("a GW failover needs a lab with --gateways 2 or more")
    killed_gw = lab.gw(k)
    mns = [lab.mn(j) for j in range(1, lab.mobiles + 1)]
    before = {mn: lab.status(mn)["node"]["gateway"] for mn in mns}
    killed_outside = lab_gateway_addresses(k)[1]
    pingers = {mn: lab.popen(mn, "ping", "-D", "-n", "-i", str(PING_INTERVAL_S), "-W", "1", CN,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
               for mn in mns}
    affected = [mn for mn in mns if before[mn] == killed_outside]
    recovered: dict[str, bool] = {}
    try:
        time.sleep(settle_s)
        pid = lab.pid(killed_gw)
        if pid is None:
            raise LabError(f"no pid for {killed_gw}")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while time.monotonic() - killed < recover_bound_s:
            states = {mn: lab.status(mn)["node"] for mn in affected}
            if all(st["state"] == "registered" and st["gateway"] != killed_outside
                   for st in states.values()):
                break
            time.sleep(0.1)
        time.sleep(after_s)
    finally:
        for p in pingers.values():
            p.send_signal(signal.SIGINT)
        outputs = {mn: p.communicate(timeout=10)[0] for mn, p in pingers.items()}
    out = []
    for mn in mns:
        st = lab.status(mn)["node"]
        recovered[mn] = st["state"] == "registered" and st["gateway"] != killed_outside
        sent, times = _replies(outputs[mn])
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        out.append(MobileOutcome(mn=mn, gateway_before=before[mn], gateway_after=st["gateway"],
                                 on_killed_gw=mn in affected, recovered=recovered[mn],
                                 sent=sent, received=len(times),
                                 longest_gap_s=max(gaps) if gaps else float("inf")))
    return out
