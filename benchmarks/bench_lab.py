"""End-to-end figures in the network-namespace lab (root): mipsec's daemons on TUN devices.

Measures, in one run:
* UDP throughput CN -> MN and MN -> CN (through HA, GW and the ESP tunnel) in packets/s and
  Mbit/s of UDP payload, for 64- and 1400-byte payloads, each beside a REFERENCE measured in the
  same run with the same tool and sizes between two plain namespaces without mipsec
  (CN <-> GW inside address, over the home bridge);
* the handover interruption (longest gap between two arrivals, minus the sending interval) and
  the packets lost per direction for a 1,000 packets/s stream during moves a -> b
  (break-before-make) and b -> a (make-before-break: the old address stays until registered);
* IKEv2 (the lab's default): the tunnel set-up at start (IKE_SA_INIT + IKE_AUTH, from the MN's
  first care-of address to its child SA installed) beside the registration that follows it
  (reference, same run), and the re-establishment after a GW daemon restart (from the MN giving
  up on its registrations to its accepted registration through the new SAs).

Usage:  sudo python3 benchmarks/bench_lab.py [--seconds 2] [--delay-ms 0] [--json] [--manual-keys]
The sender is one Python process sending as fast as its socket accepts (`mipsec.lab.stream
--blast`); the figure is what the receiver got, per second between its first and last arrival.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mipsec.lab.demo import Streams, phase_figures  # noqa: E402
from mipsec.lab.lab import Lab, requirements_problem  # noqa: E402

PORT = 5002


def blast(lab: Lab, src: str, dst_node: str, dst_addr: str, size: int, seconds: float) -> dict:
    """Receiver in ``dst_node``, a blasting sender in ``src``; returns pps and Mbit/s received."""
    rx_out, tx_out = lab.path(f"rx-{dst_node}.json"), lab.path(f"tx-{src}.json")
    rx = lab.popen(dst_node, lab.python, "-m", "mipsec.lab.stream", "--port", str(PORT),
                   "--duration", str(seconds + 1.0), "--size", str(size), "--out", rx_out)
    time.sleep(0.3)
    tx = lab.popen(src, lab.python, "-m", "mipsec.lab.stream", "--port", str(PORT),
                   "--peer", dst_addr, "--blast", "--duration", str(seconds), "--size", str(size),
                   "--out", tx_out)
    tx.wait(timeout=seconds + 30)
    rx.wait(timeout=seconds + 30)
    with open(rx_out) as f:
        got = json.load(f)
    with open(tx_out) as f:
        sent = json.load(f)
    times = sorted(t for _, t in got["received"])
    n = len(times)
    span = (times[-1] - times[0]) if n > 1 else float("nan")
    pps = (n - 1) / span if n > 1 else 0.0
    return {"sent": sent["sent"], "received": n, "pps": pps,
            "mbit_s": pps * size * 8 / 1e6, "size": size}


def handover_figures(lab: Lab, rate: float = 1000.0, dwell: float = 1.5) -> list[dict]:
    streams = Streams(lab, rate, dwell * 3)
    try:
        time.sleep(dwell)
        moves = []
        for where, mbb in (("b", False), ("a", True)):
            move = lab.move(where, wait=True, make_before_break=mbb)
            moves.append(move)
            time.sleep(max(0.0, dwell - (time.monotonic() - move["time"])))
        reports = streams.wait(timeout=dwell * 3 + 20)
    finally:
        streams.kill()
    out = []
    ends = [moves[1]["time"], reports["cn"]["start"] + dwell * 3]
    for move, end in zip(moves, ends, strict=False):   # the first two moves
        row = {"to": move["to"], "make_before_break": move["make_before_break"],
               "registration_ms": (move["registered"] - move["noticed"]) * 1000}
        for name, snd, rcv in (("downlink", "cn", "mn"), ("uplink", "mn", "cn")):
            fig = phase_figures(reports[snd], reports[rcv], move["time"] - 0.2, end - 0.2, rate)
            row[name] = {"interruption_ms": fig["interruption_ms"], "lost": fig["lost"],
                         "sent": fig["sent"]}
        out.append(row)
    return out


def mn_events(lab: Lab, since: float = 0.0) -> list[dict]:
    return [e for e in lab.status("mn")["timeline"] if e["time"] >= since]


def first(events: list[dict], kind: str, after: float = 0.0) -> float | None:
    return next((e["time"] for e in events if e["kind"] == kind and e["time"] >= after), None)


def ike_setup_figures(lab: Lab) -> dict:
    ev = mn_events(lab)
    t0 = first(ev, "ike-initiated")
    up = first(ev, "sas-installed")
    rrq = first(ev, "rrq-sent", up or 0.0)
    reg = first(ev, "rrp-received", up or 0.0)
    return {"ike_setup_ms": 1000 * (up - t0), "registration_ms": 1000 * (reg - rrq)}


def reestablish_figures(lab: Lab) -> dict:
    lab.restart_daemon("gw")
    t0 = time.monotonic()
    lab.move("b", wait=False)
    lab.wait_mn_event(t0, ("rrp-received",), timeout=30)
    ev = mn_events(lab, t0)
    gave_up = first(ev, "reestablish-requested")
    up = first(ev, "sas-installed", gave_up)
    reg = first(ev, "rrp-received", gave_up)
    return {"reestablish_ms": 1000 * (reg - gave_up), "ike_ms": 1000 * (up - gave_up),
            "from_move_ms": 1000 * (reg - t0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per throughput measurement")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="lab one-way Internet delay")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--manual-keys", action="store_true", help="no IKEv2: keys in the configs")
    args = ap.parse_args()
    problem = requirements_problem()
    if problem:
        print(f"bench_lab: {problem}", file=sys.stderr)
        return 1
    lab = Lab(prefix=f"mb{os.getpid()}-")
    results: dict = {"throughput": [], "handover": []}
    try:
        ike = not args.manual_keys
        lab.up(delay_ms=args.delay_ms, place="a", sa_source="ikev2" if ike else "manual",
               retransmit_initial_s=0.2, max_attempts=3,
               **({"ike": {"dpd_interval_s": 0}} if ike else {}))
        if ike:
            results["ike"] = ike_setup_figures(lab)
        for size in (64, 1400):
            for label, src, dst, addr in (("CN->MN", "cn", "mn", "10.1.0.100"),
                                          ("MN->CN", "mn", "cn", "10.1.0.10")):
                fig = blast(lab, src, dst, addr, size, args.seconds)
                results["throughput"].append({"path": label, **fig})
            for label, src, dst, addr in (("reference CN->GW inside", "cn", "gw", "10.1.0.1"),
                                          ("reference GW inside->CN", "gw", "cn", "10.1.0.10")):
                fig = blast(lab, src, dst, addr, size, args.seconds)
                results["throughput"].append({"path": label, **fig})
        results["handover"] = handover_figures(lab)
        if ike:                                   # the MN is at a after handover_figures
            results["ike"].update(reestablish_figures(lab))
    finally:
        lab.down()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"UDP throughput in the lab ({args.seconds:g} s each, one-way delay {args.delay_ms:g} ms)")
    print(f"{'path':<26} {'payload':>7} {'pkt/s':>10} {'Mbit/s':>8} {'vs ref':>7}")
    # Each direction is compared with the plain path in the same direction: CN->MN with
    # CN->GW inside (the CN sends), MN->CN with GW inside->CN (the CN receives).
    refs = {(r["size"], r["path"].endswith("->CN")): r["pps"] for r in results["throughput"]
            if r["path"].startswith("reference")}
    for row in results["throughput"]:
        ref = refs.get((row["size"], row["path"].endswith("->CN")))
        ratio = row["pps"] / ref if ref else float("nan")
        print(f"{row['path']:<26} {row['size']:>7} {row['pps']:>10.0f} {row['mbit_s']:>8.1f} "
              f"{ratio:>6.2f}x")
    print("\nHandover at 1,000 packets/s per direction:")
    for row in results["handover"]:
        d, u = row["downlink"], row["uplink"]
        mode = "make-before-break" if row["make_before_break"] else "break-before-make"
        print(f"  to {row['to']} ({mode}): registration {row['registration_ms']:.1f} ms after the "
              f"MN noticed the new address; downlink "
              f"interruption {d['interruption_ms']:.1f} ms, lost {d['lost']}/{d['sent']}; uplink "
              f"interruption {u['interruption_ms']:.1f} ms, lost {u['lost']}/{u['sent']}")
    if "ike" in results:
        r = results["ike"]
        print(f"\nIKEv2: tunnel set-up (IKE_SA_INIT + IKE_AUTH to child installed) "
              f"{r['ike_setup_ms']:.1f} ms; the registration after it (reference) "
              f"{r['registration_ms']:.1f} ms; ratio {r['ike_setup_ms'] / r['registration_ms']:.1f}x")
        print(f"  re-establishment after a GW restart: {r['reestablish_ms']:.1f} ms from giving up "
              f"to registered (IKE {r['ike_ms']:.1f} ms of it); {r['from_move_ms']:.0f} ms after "
              f"the move (3 refused RRQs at 0.2/0.4/0.8 s first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
