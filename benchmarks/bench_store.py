"""Binding-store latency: what one registration waits for before its reply leaves.

For each backend (memory, SQLite on the temp directory's file system, etcd: a 3-member cluster
on loopback started here, ``--heartbeat-interval=50 --election-timeout=500``), the latency of

* ``put``: a registration or a refresh (binding + its MN-HA identification metadata);
* ``compare_and_swap``: a move (compare the stored care-of, write the new one).

Backends are timed round-robin in small rounds, so a noisy period on a shared machine hits all
of them; each figure is the median and the 99th percentile of single operations.  The memory
store is the reference (the cost of the interface itself).

    python3 benchmarks/bench_store.py [--ops 1000] [--json FILE|-]

Needs ``etcd`` (Debian ``etcd-server``); without it only memory and SQLite are measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from mipsec.store import BindingRecord, open_store  # noqa: E402

ROUND = 25          # operations of one kind on one backend before moving to the next
HOMES = 100


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=1000, help="operations of each kind per backend")
    ap.add_argument("--json", help="write the figures as JSON to FILE ('-': stdout)")
    args = ap.parse_args()

    base = tempfile.mkdtemp(prefix=f"mipsec-bench-store-{os.getpid()}-")
    cluster = None
    stores = {"memory": open_store("memory"),
              "sqlite": open_store("sqlite", os.path.join(base, "state", "ha.bindings.sqlite3"))}
    try:
        if shutil.which("etcd"):
            import etcd_cluster
            cluster = etcd_cluster.EtcdCluster(os.path.join(base, "etcd"),
                                               shutil.which("etcd")).start()
            stores["etcd"] = open_store("etcd", etcd={"endpoints": cluster.endpoints,
                                                      "prefix": "/bench"})
        else:
            print("etcd not installed (Debian etcd-server): memory and SQLite only",
                  file=sys.stderr)
        lat: dict[str, dict[str, list[float]]] = {k: {"put": [], "cas": []} for k in stores}
        care_of = {k: {} for k in stores}
        ident = 0
        done = 0
        while done < args.ops:
            for name, store in stores.items():
                for i in range(ROUND):
                    ident += 1
                    home = f"10.1.0.{(done + i) % HOMES + 1}"
                    rec = BindingRecord(home, "172.16.1.10", 600, time.time() + 600,
                                        identification=ident)
                    meta = {f"mn-ha-id/{home}": ident.to_bytes(8, "big")}
                    t = time.perf_counter_ns()
                    store.put(rec, meta)
                    lat[name]["put"].append((time.perf_counter_ns() - t) / 1e6)
                    care_of[name][home] = rec.care_of_address
                for i in range(ROUND):
                    ident += 1
                    home = f"10.1.0.{(done + i) % HOMES + 1}"
                    old = care_of[name][home]
                    new = "172.16.2.10" if old == "172.16.1.10" else "172.16.1.10"
                    rec = BindingRecord(home, new, 600, time.time() + 600, previous_care_of=old,
                                        identification=ident)
                    t = time.perf_counter_ns()
                    ok = store.compare_and_swap(home, old, rec,
                                                {f"mn-ha-id/{home}": ident.to_bytes(8, "big")})
                    lat[name]["cas"].append((time.perf_counter_ns() - t) / 1e6)
                    assert ok, (name, home)
                    care_of[name][home] = new
            done += ROUND
        figures = {name: {op: {"median_ms": statistics.median(v), "p99_ms": _pct(v, 0.99),
                               "n": len(v)} for op, v in ops.items()}
                   for name, ops in lat.items()}
    finally:
        for store in stores.values():
            store.close()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)

    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"binding store latency, {args.ops} operations of each kind per backend "
          f"(load average {os.getloadavg()[0]:.1f})", file=out)
    print(f"{'backend':<8} {'put median':>11} {'put p99':>9} {'CAS median':>11} {'CAS p99':>9}",
          file=out)
    for name, f in figures.items():
        print(f"{name:<8} {f['put']['median_ms']:>8.3f} ms {f['put']['p99_ms']:>6.2f} ms "
              f"{f['cas']['median_ms']:>8.3f} ms {f['cas']['p99_ms']:>6.2f} ms", file=out)
    if args.json:
        import json
        text = json.dumps(figures, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
