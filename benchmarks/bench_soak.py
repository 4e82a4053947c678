"""Soak benchmark (root): the lab left running with short SA lifetimes, moves and traffic.

The network-namespace lab with ``--mobiles`` MNs, IKEv2 child SAs re-keyed every ``--child-s``
seconds and the IKE SA every ``--ike-s``, a steady UDP stream each way between the CN and each
MN's home address (``--rate`` datagrams/s each), each MN moving between the visited networks
and home every 10-20 s on its own seeded schedule, for ``--minutes``.  Every 30 s it samples
each daemon's RSS, fds, CPU and status counters; at the end it replays one captured packet of
every SPI ever used.  It prints loss per MN inside and outside its handover windows, loss per
re-key, the RSS slope after warm-up, table sizes, and PASS/FAIL against: zero loss outside
handover windows, zero loss at re-keys, RSS slope below 2 MB/h after warm-up, no growing
structure, no SPI left behind (``mipsec/lab/soak.py``: the run; ``soak_sampling``,
``soak_spis`` and ``soak_analysis`` beside it).

Usage:  sudo python3 benchmarks/bench_soak.py --minutes 30 [--mobiles 2] [--rate 500]
        [--child-s 30] [--ike-s 90] [--delay-ms 5] [--seed 1] [--no-moves] [--json FILE|-]
        [--raw FILE] [--trace-memory FRAMES]
Exit status 0 when every criterion passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mipsec.lab.lab import requirements_problem  # noqa: E402
from mipsec.lab.soak import SoakPlan, run_soak  # noqa: E402
from mipsec.lab.soak_analysis import analyse, format_report, verdict  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--mobiles", type=int, default=1,
                    help="mobile nodes, each with its own streams and move schedule")
    ap.add_argument("--rate", type=float, default=500.0, help="datagrams/s each way")
    ap.add_argument("--child-s", type=float, default=30.0, help="child SA lifetime")
    ap.add_argument("--ike-s", type=float, default=90.0, help="IKE SA lifetime")
    ap.add_argument("--delay-ms", type=float, default=5.0, help="one-way Internet delay")
    ap.add_argument("--seed", type=int, default=1, help="move schedule")
    ap.add_argument("--no-moves", action="store_true",
                    help="the MNs stay at a: re-keys under traffic only")
    ap.add_argument("--sample-s", type=float, default=30.0)
    ap.add_argument("--trace-memory", type=int, default=0, metavar="FRAMES",
                    help="run the daemons under tracemalloc (FRAMES deep) and keep each "
                         "sample's growing source lines (in --raw; slows the daemons)")
    ap.add_argument("--json", metavar="FILE", help="figures as JSON (- for stdout)")
    ap.add_argument("--raw", metavar="FILE", help="the raw record (samples, timeline, streams)")
    args = ap.parse_args()
    problem = requirements_problem()
    if problem:
        print(f"bench_soak: {problem}", file=sys.stderr)
        return 2
    if not 1 <= args.mobiles <= 16:
        print(f"bench_soak: --mobiles: 1..16, got {args.mobiles}", file=sys.stderr)
        return 2
    plan = SoakPlan(minutes=args.minutes, rate=args.rate, child_lifetime_s=args.child_s,
                    ike_lifetime_s=args.ike_s, delay_ms=args.delay_ms, seed=args.seed,
                    sample_s=args.sample_s, schedule=[] if args.no_moves else None,
                    mobiles=args.mobiles, trace_memory=args.trace_memory)
    record = run_soak(plan)
    if args.raw:
        with open(args.raw, "w") as f:
            json.dump(record, f)
    fig = analyse(record)
    print(format_report(fig, record["plan"]))
    if args.json == "-":
        print(json.dumps(fig, indent=1))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)
    return 0 if all(ok for _n, ok, _d in verdict(fig)) else 1


if __name__ == "__main__":
    sys.exit(main())
