#!/usr/bin/env python3
"""A GW of a pool killed under traffic, in the live lab (root): what its MNs lose, beside the MNs
of the surviving GW in the same run.

    sudo python3 benchmarks/bench_gateways.py [--mobiles 4] [--gateways 2] [--runs 3]

Each run builds ``mipsec lab up --gateways N --mobiles M`` (IKEv2, SIU mode), lets every MN ping
the CN every 50 ms, kills GW 1 with SIGKILL and waits until its MNs are registered through the
next GW of their lists (``mipsec.lab.gateways.gw_killed``).  Printed per MN group: the longest gap
between two ping replies and the replies lost (the failover's cost: the liveness check noticing
the silence, a new IKE SA with the next GW, the registration through it), beside the same for
the MNs whose GW stayed up (the reference: they should lose nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mipsec.lab.gateways import gw_killed  # noqa: E402
from mipsec.lab.lab import Lab, requirements_problem  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mobiles", type=int, default=4)
    ap.add_argument("--gateways", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefix", default=f"bgw{os.getpid()}-")
    args = ap.parse_args()
    problem = requirements_problem()
    if problem:
        print(f"bench_gateways: {problem}", file=sys.stderr)
        return 2
    killed, kept = [], []
    ok = True
    for run in range(args.runs):
        lab = Lab(prefix=args.prefix)
        lab.down()
        try:
            lab.up(mobiles=args.mobiles, gateways=args.gateways)
            outcomes = gw_killed(lab, 1)
        finally:
            lab.down()
        for o in outcomes:
            (killed if o.on_killed_gw else kept).append(o)
            ok = ok and o.recovered
            print(f"run {run + 1} {o.mn:>4} {'GW killed' if o.on_killed_gw else 'GW kept  '} "
                  f"{o.gateway_before} -> {o.gateway_after}: longest gap "
                  f"{o.longest_gap_s * 1e3:7.0f} ms, lost {o.sent - o.received:3d} of {o.sent}, "
                  f"recovered {o.recovered}")
    for name, group in (("MNs of the killed GW", killed), ("MNs of the other GW (reference)", kept)):
        if not group:
            continue
        gaps = [o.longest_gap_s * 1e3 for o in group]
        lost = [o.sent - o.received for o in group]
        print(f"{name:>32}: longest gap median {statistics.median(gaps):.0f} ms "
              f"(max {max(gaps):.0f}), lost median {statistics.median(lost):.0f} pings of "
              f"{statistics.median(o.sent for o in group):.0f} (50 ms apart), all recovered "
              f"{all(o.recovered for o in group)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
