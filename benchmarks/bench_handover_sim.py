#!/usr/bin/env python3
"""Handover interruption and loss in the in-memory network, against the one-round-trip bound.

    python3 benchmarks/bench_handover_sim.py [--interval-ms 0.2]

For several one-way Internet delays, an MN with a CN <-> MN stream (one datagram per
``--interval-ms`` each way) hands over A -> B break-before-make and B -> A make-before-break.
Printed per row: the downlink / uplink longest interruption and packets lost, beside the
reference measured in the same run, the MN-GW-HA-GW round trip of that topology
(docs/protocol.md: a break-before-make handover should cost one round trip of downlink).
Virtual time: the figures are exact properties of the protocol, not of this machine; the wall
time of each run is printed too.

The second table compares the two handover modes with IKEv2-negotiated SAs, same run, same
delays, side by side: ``siu`` (the GW's SA moves when the HA's SIU arrives) and ``mobike`` (the MN
also sends UPDATE_SA_ADDRESSES, RFC 4555; the GW moves the SA on it and the SIU finds it "already
there").  The reference is again the MN-GW-HA-GW round trip; the home LAN delay (GW <-> HA) is
varied, because that detour is all MOBIKE saves.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mipsec.sim.scenario import start_streams, wait_registered  # noqa: E402
from mipsec.sim.topology import build_topology  # noqa: E402


def one(delay_s: float, interval_s: float, make_before_break: bool, **topo_kw) -> dict:
    wall = time.perf_counter()
    topo = build_topology(1, internet_delay_s=delay_s, seed=5, **topo_kw)
    topo.move("a")
    assert wait_registered(topo, 5.0)
    start = topo.sim.now + 0.1
    start_streams(topo, interval_s=interval_s, start=start, stop=start + 1.0 + 4 * delay_s)
    topo.sim.run(until=start + 0.5)
    topo.move("b", make_before_break=make_before_break)
    assert wait_registered(topo, 5.0)
    if make_before_break:
        topo.sim.run_for(2 * delay_s + 0.01)
        topo.detach("a")
    topo.sim.run(until=start + 2.0 + 8 * delay_s)
    down = topo.mn.app.report(topo.cn.app.sent)
    up = topo.cn.app.report(topo.mn.app.sent)
    return {"rtt": topo.round_trip_s, "down_gap": down.longest_interruption_s, "down_lost": down.lost,
            "up_gap": up.longest_interruption_s, "up_lost": up.lost, "sent": down.sent,
            "wall": time.perf_counter() - wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval-ms", type=float, default=0.2)
    ap.add_argument("--delay-ms", type=float, default=20.0, help="Internet delay of the mode table")
    args = ap.parse_args()
    interval = args.interval_ms / 1000
    print(f"stream: one datagram per {args.interval_ms} ms each way; gaps in ms")
    print(f"{'delay':>6} {'mode':>4} {'RTT ref':>8} {'down gap':>9} {'gap/RTT':>8} {'down lost':>10} "
          f"{'up gap':>7} {'up lost':>8} {'wall s':>7}")
    ok = True
    for delay_ms in (0.0, 5.0, 20.0, 50.0, 100.0):
        for mbb in (False, True):
            r = one(delay_ms / 1000, interval, mbb)
            ratio = r["down_gap"] / r["rtt"] if r["rtt"] else float("nan")
            print(f"{delay_ms:>5.0f}ms {'MBB' if mbb else 'BBM':>4} {r['rtt'] * 1e3:>8.2f} "
                  f"{r['down_gap'] * 1e3:>9.2f} {ratio:>8.2f} {r['down_lost']:>10} "
                  f"{r['up_gap'] * 1e3:>7.2f} {r['up_lost']:>8} {r['wall']:>7.2f}")
            if mbb:
                ok = ok and r["down_lost"] == 0 and r["up_lost"] == 0
            else:
                ok = ok and r["down_gap"] <= r["rtt"] + 0.001
    print("bounds held (BBM gap <= RTT + 1 ms, MBB lossless):", ok)

    print(f"\nhandover modes, IKEv2 SAs, break-before-make, {args.delay_ms:.0f} ms Internet delay")
    print(f"{'LAN':>6} {'RTT ref':>8} {'SIU gap':>8} {'lost':>5} {'MOBIKE gap':>11} {'lost':>5} "
          f"{'MOBIKE/SIU':>11}")
    for lan_ms in (0.1, 2.0, 10.0):
        r = {mode: one(args.delay_ms / 1000, interval, False, lan_delay_s=lan_ms / 1000,
                       sa_source="ikev2", handover_mode=mode) for mode in ("siu", "mobike")}
        siu, mob = r["siu"], r["mobike"]
        print(f"{lan_ms:>4.1f}ms {siu['rtt'] * 1e3:>8.2f} {siu['down_gap'] * 1e3:>8.2f} "
              f"{siu['down_lost']:>5} {mob['down_gap'] * 1e3:>11.2f} {mob['down_lost']:>5} "
              f"{mob['down_gap'] / siu['down_gap']:>11.2f}")
        ok = ok and siu["down_gap"] <= siu["rtt"] + 0.001 and mob["down_gap"] <= siu["down_gap"]
    print("bounds held (SIU gap <= RTT + 1 ms, MOBIKE gap <= SIU gap):", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
