"""Several HAs on etcd: failover time and loss per fault, and registrations with each store.

1. **Failover** (root, the live lab with ``--ha-standbys 1``: a 3-member etcd cluster, two HA
   daemons, one MN, a CN <-> MN UDP stream of ``--rate`` datagrams/s each way), per fault of
   ``mipsec.lab.hafail``, ``--runs`` times each, a fresh lab every time:

   * ``kill-active-ha``: SIGKILL to the active HA; ``takeover`` is from the kill to the moment
     the standby reports serving, ``downlink gap`` the longest silence of the CN -> MN stream
     around it, ``lost`` the datagrams lost each way;
   * ``kill-etcd-leader``: SIGKILL to the etcd leader, then the MN roams; ``registered`` is
     from the kill to the accepted registration (the election is inside);
   * ``partition-active-ha``: the active HA's store link goes down; ``takeover`` as above
     (the old one fences itself first).

   Reference, same run: the lab's single-HA ``ha-restart`` scenario (kill -9 of the only HA and
   a restart with its on-disk store), the failover a standby replaces.

2. **Registrations with each store** (no root needed; etcd: a 3-member cluster on loopback
   started here): the HA role driven in-process with signed Registration Requests of
   ``--mobiles`` MNs, each a move (compare-and-swap), every store write carried out the way the
   daemon does before the reply may leave; registrations per second and per-registration
   latency (median, p99) with the memory (reference), SQLite and etcd stores, round-robin in
   small rounds so a noisy moment hits all three.

3. **A GW of a pool killed** (root, the live lab with ``--gateways 2 --mobiles 4``, IKEv2, SIU
   mode; ``mipsec.lab.gateways.gw_killed``): every MN pings the CN every 50 ms, GW 1 gets
   SIGKILL, and the run waits until its MNs are registered through the next GW of their lists.
   Per MN group: the longest gap between two ping replies and the replies lost (the liveness
   check noticing the silence, a new IKE SA with the next GW, the registration through it),
   beside the MNs whose GW stayed up (the reference: they should lose nothing).

    sudo python3 benchmarks/bench_cluster.py [--runs 3] [--rate 200] [--registrations 600]
        [--mobiles 50] [--skip-failover] [--skip-stores] [--skip-gateways] [--json FILE|-]

Needs ``etcd`` (Debian ``etcd-server``, tools/setup.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

ROUND = 20            # registrations on one backend before moving to the next


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --- 1. failover ------------------------------------------------------------------------------

def failover(runs: int, rate: float, log) -> dict[str, Any]:
    from mipsec.lab import hafail
    from mipsec.lab.recovery import SCENARIOS as SINGLE
    from mipsec.lab.recovery import run_scenario
    out: dict[str, Any] = {}
    plan = [("ha-restart (reference)", SINGLE["ha-restart"])] + \
        [(name, s) for name, s in hafail.SCENARIOS.items()]
    for label, scenario in plan:
        rows = []
        for i in range(runs):
            prefix = f"bc{os.getpid() % 10000}{i}-"
            o = run_scenario(scenario, rate, prefix, log=log)
            d = o.detail
            rows.append({
                "error": o.error,
                "recovered": o.recovered,
                # a restarted single HA: from the kill to the restarted daemon being up
                "takeover_ms": d.get("takeover_ms", None if "registered_ms" in d
                                     else d.get("ready_after_event_ms")),
                "registered_ms": d.get("registered_ms"),
                "down_gap_ms": o.directions.get("down", {}).get("interruption_ms"),
                "up_gap_ms": o.directions.get("up", {}).get("interruption_ms"),
                "down_lost": o.directions.get("down", {}).get("lost"),
                "up_lost": o.directions.get("up", {}).get("lost"),
                "mn_registrations": d.get("mn_registrations"),
                "bindings_kept": (d["bindings_after"] == d["bindings_before"])
                if "bindings_before" in d else None,
                "serving_after": d.get("serving"),
            })
            log(f"{label} run {i + 1}: {json.dumps(rows[-1])}")
        out[label] = rows
    return out


def _span(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None and not r.get("error")]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def print_failover(fig: dict[str, Any], rate: float, runs: int) -> None:
    print(f"\nfailover, {runs} run(s) each, stream {rate:g} datagrams/s each way; "
          f"median (min-max), ms")
    print(f"{'fault':<24} {'takeover':>16} {'registered':>16} {'downlink gap':>16} "
          f"{'lost down/up':>13} {'MN re-reg':>9} {'bindings':>9} {'errors':>6}")
    for label, rows in fig.items():
        ok = [r for r in rows if not r["error"]]
        lost = "/".join(_span(rows, k) for k in ("down_lost", "up_lost"))
        rereg = ",".join(str(r["mn_registrations"]) for r in ok) or "-"
        kept = ",".join("kept" if r["bindings_kept"] else "LOST" for r in ok
                        if r["bindings_kept"] is not None) or "-"
        print(f"{label:<24} {_span(rows, 'takeover_ms'):>16} {_span(rows, 'registered_ms'):>16} "
              f"{_span(rows, 'down_gap_ms'):>16} {lost:>13} {rereg:>9} {kept:>9} "
              f"{sum(1 for r in rows if r['error']):>6}")
        for r in rows:
            if r["error"]:
                print(f"    error: {r['error']}")


# --- 2. registrations with each store ---------------------------------------------------------

def _carry(store: Any, actions: list[Any]) -> None:
    """The daemon's store actions (mipsec.io.daemon_store: the loop's steps), synchronously."""
    from mipsec.node.actions import PersistBinding, ReserveSiuSequence
    for a in actions:
        if isinstance(a, PersistBinding):
            meta = dict(a.meta)
            if a.conditional:
                if not store.compare_and_swap(a.home_address, a.expected_care_of, a.record, meta):
                    raise RuntimeError(f"compare-and-swap refused for {a.home_address}")
            elif a.record is None:
                store.delete(a.home_address, meta)
            else:
                store.put(a.record, meta)
        elif isinstance(a, ReserveSiuSequence):
            if not store.compare_and_swap_meta(a.key, a.expected, a.end.to_bytes(8, "big")):
                raise RuntimeError("SIU block refused")


def registrations(n: int, mobiles: int, log) -> dict[str, Any]:
    from mipsec import config as mconfig
    from mipsec.mip.security import MobilitySecurityAssociation
    from mipsec.node.home_agent import HomeAgent
    from mipsec.node.packet import a2b, build_udp_packet
    from mipsec.store import open_store
    from mipsec.wire.mip import RegistrationRequest, RequestFlags, build_registration_request

    base = tempfile.mkdtemp(prefix=f"mipsec-bench-cluster-{os.getpid()}-")
    sets = mconfig.make_key_set(mobiles, mconfig.KeySetLayout(run_dir=base),
                                keys_from=random.Random(1))
    ha_cfg = sets["ha"].node
    mns = [c.node for name, c in sorted(sets.items()) if c.role == "mn"]
    cluster = None
    stores = {"memory": open_store("memory"),
              "sqlite": open_store("sqlite", os.path.join(base, "state", "ha.bindings.sqlite3"))}
    try:
        if shutil.which("etcd"):
            import etcd_cluster
            cluster = etcd_cluster.EtcdCluster(os.path.join(base, "etcd"),
                                               shutil.which("etcd")).start()
            stores["etcd"] = open_store("etcd", etcd={"endpoints": cluster.endpoints,
                                                      "prefix": "/bench-cluster"})
        else:
            log("etcd not installed (Debian etcd-server): memory and SQLite only")
        has = {}
        for name, store in stores.items():
            has[name] = HomeAgent(ha_cfg, wallclock=time.time)
            has[name].restore([], store.meta(), time.monotonic())
        msas = {name: [MobilitySecurityAssociation(m.msa.spi, m.msa.key, m.msa.algorithm)
                       for m in mns] for name in stores}
        lat: dict[str, list[float]] = {name: [] for name in stores}
        busy: dict[str, float] = dict.fromkeys(stores, 0.0)
        done = 0
        while done < n:
            for name, store in stores.items():
                ha = has[name]
                for i in range(done, min(n, done + ROUND)):
                    k = i % mobiles
                    m, msa = mns[k], msas[name][k]
                    coa = f"172.16.{1 + (i // mobiles) % 2}.{10 + k % 200}"
                    rrq = RegistrationRequest(
                        home_address=m.home_address, home_agent=ha_cfg.address,
                        care_of_address=coa, identification=msa.new_identification(time.time()),
                        lifetime=600, flags=RequestFlags.D | RequestFlags.T)
                    packet = build_udp_packet(a2b(coa), a2b(ha_cfg.address), 434, 434,
                                              msa.sign(build_registration_request(rrq)))
                    t = time.perf_counter()
                    actions = ha.receive_from_net(packet, time.monotonic())
                    _carry(store, actions)
                    dt = time.perf_counter() - t
                    if not any(type(a).__name__ == "SendToNet" for a in actions):
                        raise RuntimeError(f"{name}: registration {i} not answered: "
                                           f"{dict(ha.drops)}")
                    lat[name].append(dt * 1000)
                    busy[name] += dt
            done += ROUND
        return {name: {"registrations": len(v), "per_s": len(v) / busy[name],
                       "median_ms": statistics.median(v), "p99_ms": _pct(v, 0.99)}
                for name, v in lat.items()}
    finally:
        for store in stores.values():
            store.close()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def print_registrations(fig: dict[str, Any], mobiles: int) -> None:
    n = next(iter(fig.values()))["registrations"] if fig else 0
    print(f"\nregistrations through the HA role, {n} per store ({mobiles} MNs, each a move: "
          f"compare-and-swap before the reply)")
    print(f"{'store':<22} {'registrations/s':>16} {'latency median':>15} {'p99':>9}")
    for name, f in fig.items():
        label = name + (" (reference)" if name == "memory" else "")
        print(f"{label:<22} {f['per_s']:>16.0f} {f['median_ms']:>12.3f} ms {f['p99_ms']:>6.2f} ms")


def gateway_failover(runs: int, log) -> dict[str, Any]:
    """Section 3: a fresh ``--gateways 2 --mobiles 4`` lab per run, GW 1 killed in each."""
    from mipsec.lab.gateways import gw_killed
    from mipsec.lab.lab import Lab
    rows: list[dict[str, Any]] = []
    prefix = f"bcg{os.getpid()}-"
    for run in range(runs):
        log(f"gateways: run {run + 1}/{runs}")
        lab = Lab(prefix=prefix)
        lab.down()
        try:
            lab.up(mobiles=4, gateways=2)
            outcomes = gw_killed(lab, 1)
        finally:
            lab.down()
        rows += [{"run": run + 1, "mn": o.mn, "on_killed_gw": o.on_killed_gw,
                  "gateway_before": o.gateway_before, "gateway_after": o.gateway_after,
                  "longest_gap_ms": o.longest_gap_s * 1e3, "sent": o.sent,
                  "lost": o.sent - o.received, "recovered": o.recovered} for o in outcomes]
    return {"runs": runs, "rows": rows}


def print_gateway_failover(fig: dict[str, Any]) -> None:
    print(f"\na GW of a pool of 2 killed (SIGKILL), 4 MNs pinging the CN every 50 ms, "
          f"{fig['runs']} run(s)")
    for r in fig["rows"]:
        print(f"  run {r['run']} {r['mn']:>4} {'GW killed' if r['on_killed_gw'] else 'GW kept  '} "
              f"{r['gateway_before']} -> {r['gateway_after']}: longest gap "
              f"{r['longest_gap_ms']:7.0f} ms, lost {r['lost']:3d} of {r['sent']}, "
              f"recovered {r['recovered']}")
    for name, killed in (("MNs of the killed GW", True), ("MNs of the other GW (reference)", False)):
        group = [r for r in fig["rows"] if r["on_killed_gw"] is killed]
        if not group:
            continue
        print(f"{name:>32}: longest gap median "
              f"{statistics.median(r['longest_gap_ms'] for r in group):.0f} ms "
              f"(max {max(r['longest_gap_ms'] for r in group):.0f}), lost median "
              f"{statistics.median(r['lost'] for r in group):.0f} pings of "
              f"{statistics.median(r['sent'] for r in group):.0f}, all recovered "
              f"{all(r['recovered'] for r in group)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of each fault (a fresh lab each)")
    ap.add_argument("--rate", type=float, default=200.0, help="stream datagrams/s each way")
    ap.add_argument("--registrations", type=int, default=600, help="per store")
    ap.add_argument("--mobiles", type=int, default=50)
    ap.add_argument("--skip-failover", action="store_true")
    ap.add_argument("--skip-stores", action="store_true")
    ap.add_argument("--skip-gateways", action="store_true")
    ap.add_argument("--json", help="write the figures as JSON to FILE ('-': stdout)")
    args = ap.parse_args()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    figures: dict[str, Any] = {"load_average_start": os.getloadavg()[0]}
    if not args.skip_failover:
        from mipsec.lab.lab import requirements_problem
        problem = requirements_problem() or (None if shutil.which("etcd") else "no etcd")
        if problem:
            print(f"failover: {problem}", file=sys.stderr)
            return 1
        figures["failover"] = failover(args.runs, args.rate, log)
    if not args.skip_stores:
        figures["registrations"] = registrations(args.registrations, args.mobiles, log)
    if not args.skip_gateways:
        from mipsec.lab.lab import requirements_problem
        problem = requirements_problem()
        if problem:
            print(f"gateways: {problem}", file=sys.stderr)
            return 1
        figures["gateways"] = gateway_failover(args.runs, log)
    figures["load_average_end"] = os.getloadavg()[0]
    print(f"load average {figures['load_average_start']:.1f} at start, "
          f"{figures['load_average_end']:.1f} at the end")
    if "failover" in figures:
        print_failover(figures["failover"], args.rate, args.runs)
    if "registrations" in figures:
        print_registrations(figures["registrations"], args.mobiles)
    if "gateways" in figures:
        print_gateway_failover(figures["gateways"])
    if args.json:
        text = json.dumps(figures, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    recovered = all(r["recovered"] for r in figures.get("gateways", {}).get("rows", []))
    return 0 if recovered else 1


if __name__ == "__main__":
    sys.exit(main())
