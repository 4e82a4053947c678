"""A soak run of the lab: the daemons left running as a user would, and what must hold over time.

``run_soak(SoakPlan(...))`` builds a lab (IKEv2 with short child and IKE SA lifetimes) with
``mobiles`` MNs, runs a steady UDP stream each way between the CN and each MN's home address
(one port per MN), moves each MN between the two visited networks and home on its own seeded
schedule (one thread per MN), and every ``sample_s`` records each daemon's RSS, open fds, CPU
time and status counters (``soak_sampling``).  A sniffer keeps one packet of every SPI used;
at the end they are replayed to ask which SPIs are still known (``soak_spis``).  The record it
returns is what ``soak_analysis.analyse`` turns into figures and a verdict.

Times are CLOCK_MONOTONIC, which the daemons' timelines and the stream reports share.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from mipsec.io import memory
from mipsec.lab import topology as topo
from mipsec.lab.lab import Lab, LabError
from mipsec.lab.soak_analysis import EDGE_S
from mipsec.lab.soak_sampling import Sampler
from mipsec.lab.soak_spis import captured, control_traffic, replay_spis

STREAM_PORT = 5011



@dataclass
class SoakPlan:
    minutes: float = 20.0
    rate: float = 500.0                   # datagrams/s each way
    child_lifetime_s: float = 30.0
    ike_lifetime_s: float = 90.0
    delay_ms: float = 5.0                 # one-way Internet delay in the lab
    dwell_s: tuple[float, float] = (10.0, 20.0)
    home_share: float = 0.2               # share of moves that return home
    seed: int = 1
    sample_s: float = 30.0
    warmup_s: float | None = None         # default: a quarter of the run, at most 5 minutes
    prefix: str = ""
    schedule: list[tuple[float, str]] | None = None   # (seconds from start, place): fixed plan
    ike: dict[str, Any] = field(default_factory=dict)  # more IKE settings
    mobiles: int = 1
    stagger_s: float = 5.0                # a fixed plan: MN k moves (k - 1) x stagger_s later
    trace_memory: int = 0                 # > 0: daemons under tracemalloc, this many frames

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    @property
    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(300.0, self.duration_s / 4)


def make_schedule(plan: SoakPlan, k: int = 1) -> list[tuple[float, str]]:
    """MN ``k``'s moves (seconds from the start, place), seeded (MN 1 with ``plan.seed``, the
    others with seeds of their own): each MN starts at ``a``; never home twice in a row; the
    last move leaves it away.  A fixed ``plan.schedule`` is MN 1's; MN ``k`` follows it
    ``(k - 1) x stagger_s`` later (moves that would come too late are left out)."""
    if plan.schedule is not None:
        shift = (k - 1) * plan.stagger_s
        last = plan.duration_s - EDGE_S - 1.0
        fixed = [(t + shift, w) for t, w in plan.schedule if t + shift < last]
        while fixed and fixed[-1][1] == "home":
            fixed.pop()
        return fixed
    rng = random.Random(plan.seed if k == 1 else plan.seed * 7919 + k)
    out: list[tuple[float, str]] = []
    t, here = 0.0, "a"
    end = plan.duration_s - EDGE_S - plan.dwell_s[0]
    while True:
        t += rng.uniform(*plan.dwell_s)
        if t >= end:
            break
        if here != "home" and rng.random() < plan.home_share:
            where = "home"
        else:
            where = "b" if here == "a" else "a" if here == "b" else rng.choice("ab")
        out.append((t, where))
        here = where
    if out and out[-1][1] == "home":
        out.pop()
    return out


def _wait_stream(proc: subprocess.Popen, timeout: float, say: Callable[[str], None]) -> None:
    """Wait for a stream to end by itself; one that overruns its duration (a stalled sender on
    a busy machine) is told to stop with SIGTERM, and writes its report all the same, so that
    an hour of samples is never lost to one late process."""
    try:
        proc.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        say(f"a stream (pid {proc.pid}) overran its duration; stopping it")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def run_soak(plan: SoakPlan, out: TextIO | None = sys.stderr,
             lab_kwargs: dict[str, Any] | None = None,
             on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the soak; returns the raw record (``analyse`` makes the figures).  The lab is
    always removed, also when something fails."""
    def say(msg: str) -> None:
        if out is not None:
            print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=out, flush=True)
        if on_progress is not None:
            on_progress(msg)

    lab = Lab(prefix=plan.prefix or f"sk{os.getpid() % 100000}-",
              daemon_env={memory.ENV_VAR: str(plan.trace_memory)} if plan.trace_memory else {})
    ike = {"child_lifetime_s": plan.child_lifetime_s, "ike_lifetime_s": plan.ike_lifetime_s,
           **plan.ike}
    record: dict[str, Any] = {"plan": {**asdict(plan), "schedule": None}, "mobiles": {}}
    procs: list[subprocess.Popen] = []
    sampler = None
    finished = threading.Event()
    try:
        lab.up(delay_ms=plan.delay_ms, place="a", ike=ike, mobiles=plan.mobiles,
               **(lab_kwargs or {}))
        names = [lab.mn(k) for k in range(1, plan.mobiles + 1)]
        record["daemons"] = list(lab.daemons)
        say(f"lab {lab.prefix} up with {plan.mobiles} MN(s); {plan.minutes:g} min, "
            f"{plan.rate:g} datagrams/s each way per MN, child SA {plan.child_lifetime_s:g} s, "
            f"IKE SA {plan.ike_lifetime_s:g} s")
        spi_file = lab.path("spis.json")
        sniffer = lab.popen("gw", lab.python, "-m", "mipsec.lab.soak_spis", "--sniff", "out0",
                            "--out", spi_file)
        procs.append(sniffer)
        reports: dict[str, dict[str, str]] = {}
        streams: list[subprocess.Popen] = []
        for k, name in enumerate(names, 1):
            port = str(STREAM_PORT + k - 1)          # one stream pair per MN
            reports[name] = {"cn": lab.path(f"soak-cn-{name}.json"),
                             "mn": lab.path(f"soak-{name}.json")}
            record["mobiles"][name] = {"k": k, "home": lab.home_address(k), "moves": []}
            for node, peer in (("cn", lab.home_address(k)), (name, topo.CN)):
                streams.append(lab.popen(
                    node, lab.python, "-m", "mipsec.lab.stream", "--port", port,
                    "--peer", peer, "--rate", str(plan.rate), "--duration",
                    str(plan.duration_s), "--steady",
                    "--out", reports[name]["cn" if node == "cn" else "mn"]))
                procs.append(streams[-1])
        t0 = time.monotonic()
        record["start"] = t0
        # the CN's namespace through its first stream; the router's through the forwarder
        others = {"cn": streams[0].pid, "rt": lab.pid("delay")}
        sampler = Sampler(lab, plan.sample_s, memory=plan.trace_memory > 0,
                          namespaces={k: v for k, v in others.items() if v is not None})
        sampler.sample()
        sampler.start()
        places = {name: "a" for name in names}
        state_lock = threading.Lock()           # the lab's state file is read and rewritten

        def mover(k: int, name: str) -> None:
            """MN ``k``'s schedule; each move waits for its registration, other MNs move on
            their own schedules meanwhile."""
            for at, where in make_schedule(plan, k):
                if finished.wait(max(0.0, t0 + at - time.monotonic())):
                    return
                move: dict[str, Any] = {"to": where}
                try:
                    with state_lock:
                        got = lab.move(where, wait=False, k=k)
                        places[name] = where
                    _noticed, done = lab.wait_mn_event(
                        got["time"], ("rrp-received", "deregistered"), 30.0, k)
                    move.update(time=got["time"], registered=done)
                except (LabError, OSError, subprocess.SubprocessError) as exc:
                    move.update(time=time.monotonic(), registered=None,
                                error=str(exc)[:300])
                    say(f"{name}: move to {where} did not complete: "
                        f"{str(exc).splitlines()[0]}")
                record["mobiles"][name]["moves"].append(move)

        movers = [threading.Thread(target=mover, args=(k, name), daemon=True)
                  for k, name in enumerate(names, 1)]
        for th in movers:
            th.start()
        for proc in streams:
            _wait_stream(proc, max(1.0, t0 + plan.duration_s - time.monotonic()) + 60, say)
        finished.set()
        for th in movers:
            th.join(timeout=60)
        record["end"] = time.monotonic()
        sampler.stop()
        sampler.sample()
        for name, paths in reports.items():
            for node, path in paths.items():
                with open(path) as f:
                    record["mobiles"][name][f"stream_{node}"] = json.load(f)
        say("streams done; waiting out the grace period of the last re-keyed SAs")
        from mipsec.ike.constants import CHILD_SA_DELETE_GRACE_S
        time.sleep(CHILD_SA_DELETE_GRACE_S + 1.0)
        # a few datagrams each way on the SAs of now, so that the replay has a current SPI
        # of each receiver to show it tells known from unknown
        record["control_pings"] = control_traffic(lab, spi_file)
        spis = captured(spi_file)
        record["places"] = dict(places)
        # the sniffer keeps running through the replay: each receiver's control needs a packet
        # of the SPI it holds at that moment (soak_spis.replay_spis)
        record["replay"] = replay_spis(lab, spis, places, spi_file)
        sniffer.send_signal(signal.SIGTERM)
        sniffer.wait(timeout=10)
        record["samples"] = sampler.samples
        record["timeline"] = sampler.timeline()
        say(f"replayed one packet of each of {len(spis)} SPIs")
    finally:
        finished.set()
        if sampler is not None:
            sampler.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lab.down()
    return record

