"""The live GW daemon with workers = 0, 1, 2 (``bench_workers.py --live``, root; see there).

One lab per configuration, all up at once (prefixes ``bw0-``, ``bw1-`` ...); per run and
configuration: pre-built uplink ESP (from each MN's care-of address, with the MN's manual keys
and sequence numbers above every earlier run's) and downlink IP-in-IP (HA -> care-of address,
inner CN -> home address) replayed by ``rawload`` at ``--rate`` each; the GW's counters and CPU
time before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mipsec.config import load_config  # noqa: E402
from mipsec.ipsec.sa import Direction  # noqa: E402
from mipsec.lab import topology as topo  # noqa: E402
from mipsec.lab.lab import Lab  # noqa: E402
from mipsec.mip import ipip  # noqa: E402
from mipsec.node.mobile_node import make_sa  # noqa: E402
from mipsec.node.packet import a2b, build_udp_packet  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = (0, 1, 2)
HA = "10.1.0.2"
PAYLOAD = 64
SEQ_BASE = 1 << 24        # above anything the MN daemons sent on their SAs
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_rawload(tmp: str) -> str:
    exe = os.path.join(tmp, "rawload")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(HERE, "rawload.c")], check=True)
    return exe


def records(packets: list[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(2, "big") + p for p in packets)


class LiveGw:
    """One lab whose GW runs with ``workers`` and the pre-built loads for it."""

    def __init__(self, workers: int, mobiles: int):
        self.workers = workers
        self.lab = Lab(prefix=f"bw{workers}-")
        self.lab.down()
        self.lab.up(mobiles=mobiles, sa_source="manual", gw_workers=workers)
        gw_cfg = load_config(self.lab.path("gw.toml")).node
        self.senders = []
        for k, m in enumerate(gw_cfg.mobiles, 1):
            coa = self.lab.care_of("a", k)
            sa = make_sa(m.esp_in, Direction.OUTBOUND, local=coa, remote=gw_cfg.outside_address)
            sa.sequence = SEQ_BASE
            self.senders.append((sa, m.home_address, coa))

    def loads(self, count: int, tmp: str) -> tuple[str, str]:
        """(uplink file, downlink file) of ``count`` packets each, round robin over the MNs."""
        up, down = [], []
        n = len(self.senders)
        for i in range(count):
            sa, home, coa = self.senders[i % n]
            inner = build_udp_packet(a2b(home), a2b(topo.CN), 6000, 5001, bytes(PAYLOAD),
                                     identification=i & 0xFFFF)
            up.append(sa.encapsulate(inner, 1.0))
            back = build_udp_packet(a2b(topo.CN), a2b(home), 5001, 6000, bytes(PAYLOAD),
                                    identification=i & 0xFFFF)
            down.append(ipip.encapsulate(back, HA, coa))
        paths = []
        for name, packets in (("up", up), ("down", down)):
            path = os.path.join(tmp, f"{self.lab.prefix}{name}.bin")
            with open(path, "wb") as f:
                f.write(records(packets))
            paths.append(path)
        return paths[0], paths[1]

    def pids(self) -> list[int]:
        status = self.lab.status("gw")
        rows = status.get("workers", {}).get("workers", [])
        return [status["pid"], *(r["pid"] for r in rows if r.get("pid"))]

    def counters(self) -> tuple[int, dict]:
        """(packets the GW forwarded so far, its status)."""
        status = self.lab.status("gw")
        io = status["io"]
        total = io["to_tun"] + io["to_net"]
        workers = status.get("workers")
        if workers:
            total += workers["totals"]["to_tun"] + workers["totals"]["to_net"]
        return total, status

    def cpu_s(self, pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        return total

    def freeze_mobiles(self, stop: bool) -> None:
        for k in range(1, self.lab.mobiles + 1):
            pid = self.lab.pid(self.lab.mn(k))
            if pid is not None:
                os.kill(pid, signal.SIGSTOP if stop else signal.SIGCONT)


def measure(gw: LiveGw, exe: str, rate: float, seconds: float, tmp: str) -> dict:
    up, down = gw.loads(int(rate * seconds), tmp)
    pids = gw.pids()
    sink = gw.lab.popen("cn", exe.replace("rawload", "udpload"), "recv", "5001",
                        str(seconds + 2), stdout=subprocess.PIPE, text=True)
    gw.freeze_mobiles(True)
    try:
        time.sleep(0.3)
        before, _ = gw.counters()
        cpu0 = gw.cpu_s(pids)
        t0 = time.monotonic()
        senders = [gw.lab.popen(node, exe, path, str(rate), str(seconds),
                                stdout=subprocess.PIPE, text=True)
                   for node, path in (("rt", up), ("ha", down))]
        loads = [json.loads(p.communicate(timeout=seconds + 30)[0]) for p in senders]
        time.sleep(1.2)                    # the last packets through, the workers' reports
        after, status = gw.counters()
        cpu1 = gw.cpu_s(pids)
        elapsed = time.monotonic() - t0 - 1.2
    finally:
        gw.freeze_mobiles(False)
        sink.communicate(timeout=seconds + 30)
    forwarded = after - before
    return {"workers": gw.workers, "offered": sum(x["sent"] for x in loads),
            "forwarded": forwarded, "pps": forwarded / elapsed,
            "cpu_us": (cpu1 - cpu0) / max(1, forwarded) * 1e6,
            "cpu_cores": (cpu1 - cpu0) / elapsed,
            "sender_cpu_s": sum(x["cpu_s"] for x in loads),
            "handoffs": status.get("workers", {}).get("totals", {}).get("handoffs_out", 0)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_workers.py --live")
    ap.add_argument("--mobiles", type=int, default=4)
    ap.add_argument("--rate", type=float, default=30000.0, help="offered packets/s each way")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("--live needs root (network namespaces)")
    gws: list[LiveGw] = []
    rows: list[list[dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_rawload(tmp)
        subprocess.run(["cc", "-O2", "-o", os.path.join(tmp, "udpload"),
                        os.path.join(HERE, "udpload.c")], check=True)
        try:
            for n in CONFIGS:
                gws.append(LiveGw(n, args.mobiles))
            for _ in range(args.runs):
                rows.append([measure(gw, exe, args.rate, args.seconds, tmp) for gw in gws])
        finally:
            for gw in gws:
                gw.lab.down()
    print(f"# live GW daemon, {args.mobiles} MNs, manual keys (AES-CBC + HMAC-SHA-256), "
          f"{PAYLOAD}-byte inner payload; offered {args.rate:g} packets/s each way for "
          f"{args.seconds:g} s; {args.runs} interleaved runs; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'workers':>7}{'kpkt/s':>9}{'CPU us/pkt':>12}{'cores':>7}{'vs 0':>7}"
          f"{'hand-offs':>11}")
    for run in rows:
        base = run[0]["pps"]
        for r in run:
            print(f"{r['workers']:>7}{r['pps'] / 1e3:>9.1f}{r['cpu_us']:>12.1f}"
                  f"{r['cpu_cores']:>7.2f}{r['pps'] / base:>6.2f}x{r['handoffs']:>11}")
        print()
    for n, _ in enumerate(CONFIGS):
        ratios = sorted(run[n]["pps"] / run[0]["pps"] for run in rows)
        print(f"workers {CONFIGS[n]}: median ratio to one process {ratios[len(ratios) // 2]:.2f}x")
    sender = sum(r["sender_cpu_s"] for run in rows for r in run)
    sent = sum(r["offered"] for run in rows for r in run)
    print(f"# the C sender cost {sender / max(1, sent) * 1e6:.2f} us CPU per packet sent")
    return 0
