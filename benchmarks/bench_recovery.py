"""Recovery from real-world events in the namespace lab (root), each beside its target.

For every scenario (mipsec/lab/recovery.py: DHCP-order roam, GW restart with IKEv2 and with
manual keys, HA restart (kill -9), MN restart (kill -9), a 40 s outage of the visited network,
the SIU path down, a lost SIU, return home then leave again) a fresh lab carries a stream both
ways (CN <-> MN home address, default 1,000 datagrams/s each way); the event happens after 1 s;
the table shows per direction the longest interruption from the event on and the datagrams
lost, how long after the restarted part was up the traffic came back, how many Registration
Requests the MN sent, and whether the path recovered, beside the target.

Usage:  sudo python3 benchmarks/bench_recovery.py [--rate 1000] [--only ha-restart,lost-siu]
                                                  [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mipsec.lab.lab import requirements_problem  # noqa: E402
from mipsec.lab.recovery import SCENARIOS, Outcome, run_scenario  # noqa: E402


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def row(o: Outcome) -> str:
    if o.error is not None:
        return f"{o.name:<19} ERROR {o.error.splitlines()[0][:90]}\n{'':<19} target: {o.target}"
    d, u = o.directions["down"], o.directions["up"]
    back = [x["back_after_ready_ms"] for x in (d, u) if x["back_after_ready_ms"] is not None]
    status = "recovered" if o.recovered else "NOT recovered"
    if o.detail.get("rrp_after_start_ms") is not None:
        status += f", registered {_ms(o.detail['rrp_after_start_ms'])} after the start"
    if o.detail.get("mn_reestablishments"):
        status += (f", {o.detail['mn_reestablishments']} new tunnel(s), GW bound by IKE "
                   f"{_ms(o.detail.get('ike_bound_after_event_ms'))} after the event")
    return (f"{o.name:<19} down {_ms(d['interruption_ms']):>9} {d['lost']:>6} lost | "
            f"up {_ms(u['interruption_ms']):>9} {u['lost']:>6} lost | "
            f"back after up {_ms(max(back)) if back else '-':>9} | "
            f"RRQs {o.detail.get('mn_registrations', '-'):>2} | {status}\n"
            f"{'':<19} target: {o.target}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=1000.0, help="datagrams per second each way")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    a = p.parse_args()
    problem = requirements_problem()
    if problem:
        print(f"bench_recovery: {problem}", file=sys.stderr)
        return 2
    names = [n for n in a.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    outcomes = []
    if not a.json:
        print(f"recovery in the lab, {a.rate:g} datagrams/s each way, event 1 s into the stream"
              f" (interruption: longest gap from the event on; back after up: from the restarted"
              f" part ready / the path back)", flush=True)
    for i, name in enumerate(names):
        o = run_scenario(SCENARIOS[name], a.rate, prefix=f"br{os.getpid() % 10000}{i}-")
        outcomes.append(o)
        if not a.json:
            print(row(o), flush=True)
    if a.json:
        print(json.dumps([{"name": o.name, "target": o.target, "directions": o.directions,
                           "detail": {k: v for k, v in o.detail.items() if k != "timeline"},
                           "error": o.error, "recovered": o.recovered} for o in outcomes],
                         indent=1))
    return 0 if all(o.recovered for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
