#!/usr/bin/env python3
"""IKE_SA_INIT + IKE_AUTH cost per tunnel, mipsec as the responder (one GW process).

Many initiators (one ``IkeEndpoint`` each, as many MNs would be) set up a tunnel (IKE SA + one
ESP child SA, PSK) with ONE responder endpoint, all in this process, in memory, no sockets.  Only
the responder's ``receive_datagram`` calls are timed (wall: ``perf_counter``; CPU:
``process_time``), so the figures are what one GW process spends per tunnel, and
``tunnels/s`` is how many tunnels per second it could set up back to back.

Reference, measured in the same run: the Diffie-Hellman work a responder cannot avoid per
tunnel (one key pair + one shared secret in the negotiated group, with ``cryptography``), so the
ratio shows how much of the cost is protocol handling rather than the DH itself.

    python3 benchmarks/bench_ike.py [--tunnels N] [--cookies] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import write_json  # noqa: E402

from mipsec.ike.codec import TrafficSelector as TS  # noqa: E402
from mipsec.ike.config import IkeConfig  # noqa: E402
from mipsec.ike.crypto import DhPrivate  # noqa: E402
from mipsec.ike.endpoint import IkeEndpoint  # noqa: E402
from mipsec.ike.events import ChildSaEstablished, SendDatagram  # noqa: E402
from mipsec.ike.proposals import parse_esp_suite, parse_ike_suite  # noqa: E402

GW = ("172.16.0.1", 500)
PSK = b"a pre-shared key for the benchmark"
CASES = [
    ("x25519 / aes128gcm16 / esp aes256gcm16", "aes128gcm16-prfsha256-x25519", "aes256gcm16"),
    ("ecp256 / aes256-sha256 / esp aes128-sha256", "aes256-sha256-prfsha256-ecp256",
     "aes128-sha256"),
    ("modp2048 / aes256-sha256 / esp aes128-sha256", "aes256-sha256-prfsha256-modp2048",
     "aes128-sha256"),
]


def configs(ike: str, esp: str, cookies: bool):
    suites = (parse_ike_suite(ike),)
    esps = (parse_esp_suite(esp),)
    common = dict(ike_suites=suites, esp_suites=esps, dpd_interval_s=None, ike_lifetime_s=None,
                  child_lifetime_s=None)
    ci = IkeConfig(local_id="mn@example", remote_id="gw.example", psks={"gw.example": PSK},
                   local_ts=(TS.from_network("10.1.0.100/32"),), **common)
    cr = IkeConfig(local_id="gw.example", psks={"*": PSK}, cookie_threshold=0 if cookies else None,
                   remote_ts=(TS.from_network("10.1.0.0/24"),), **common)
    return ci, cr


def run_tunnels(ike: str, esp: str, n: int, cookies: bool) -> dict:
    ci, cr = configs(ike, esp, cookies)
    responder = IkeEndpoint(cr)
    wall = cpu = 0.0
    established = 0
    gc.disable()
    try:
        for k in range(n):
            addr = (f"172.17.{k // 250}.{k % 250 + 1}", 500)
            ini = IkeEndpoint(replace(ci, local_id=f"mn{k}@example"))   # one identity per MN
            queue = list(ini.initiate(addr, GW, 0.0))
            while queue:
                o = queue.pop(0)
                if not isinstance(o, SendDatagram):
                    continue
                if o.remote[0] == GW[0]:
                    w0, c0 = time.perf_counter(), time.process_time()
                    out = responder.receive_datagram(o.data, o.remote, o.local, 0.0)
                    wall += time.perf_counter() - w0
                    cpu += time.process_time() - c0
                    established += sum(isinstance(e, ChildSaEstablished) for e in out)
                else:
                    out = ini.receive_datagram(o.data, o.remote, o.local, 0.0)
                queue += out
    finally:
        gc.enable()
    if established != n:
        raise SystemExit(f"only {established} of {n} tunnels came up")
    return {"wall_us": wall / n * 1e6, "cpu_us": cpu / n * 1e6, "tunnels_per_s": n / wall}


def dh_reference(ike: str, n: int) -> float:
    """Microseconds for one responder-side DH (key pair + shared secret), best of 3."""
    group = parse_ike_suite(ike).dh
    peer = DhPrivate.generate(group).public
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            DhPrivate.generate(group).shared_secret(peer)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tunnels", type=int, default=200)
    ap.add_argument("--cookies", action="store_true", help="responder demands cookies (§2.6)")
    ap.add_argument("--json", help="write the figures as JSON to this file ('-' = stdout)")
    args = ap.parse_args()
    rows = []
    print(f"IKE_SA_INIT + IKE_AUTH (PSK, one child), responder side, {args.tunnels} initiators"
          f"{', cookies on' if args.cookies else ''}", file=sys.stderr)
    print(f"{'suite':48} {'wall us':>9} {'cpu us':>9} {'tunnels/s':>10} {'DH us':>8} {'ratio':>6}",
          file=sys.stderr)
    for name, ike, esp in CASES:
        n = args.tunnels if "modp" not in ike else max(20, args.tunnels // 4)
        res = run_tunnels(ike, esp, n, args.cookies)
        ref = dh_reference(ike, max(10, n // 4))
        res.update(suite=name, tunnels=n, dh_reference_us=ref, ratio=res["wall_us"] / ref)
        rows.append(res)
        print(f"{name:48} {res['wall_us']:9.0f} {res['cpu_us']:9.0f} {res['tunnels_per_s']:10.0f}"
              f" {ref:8.0f} {res['ratio']:6.1f}", file=sys.stderr)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
