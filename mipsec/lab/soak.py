"""A soak run of the lab: the daemons left running as a user would, and what must hold over time.

``run_soak(SoakPlan(...))`` builds a lab (IKEv2 with short child and IKE SA lifetimes) with
``mobiles`` MNs, runs a steady UDP stream each way between the CN and each MN's home address
(one port per MN), moves each MN between the two visited networks and home on its own seeded
schedule (one thread per MN), and every ``sample_s`` records each daemon's RSS, open fds, CPU
time and status counters (drops, table sizes).  A sniffer in the GW's
namespace keeps the first ESP packet of every SPI seen on the GW's outside link (one packet per
SPI: bounded).  At the end it replays each of those packets to its receiver, with the outer
destination set to where that MN is now, and asks which were still known.

``analyse`` turns that into the figures the acceptance criteria name (``verdict``):

* per MN and in all: loss inside that MN's handover windows (from a move to its registration,
  plus ``HANDOVER_TAIL_S``) and outside them (another MN's handover does not excuse a loss); a
  lost datagram's time is interpolated from the arrivals of its neighbours;
* loss per child SA re-key (the GW's ``gw-sas-rekeyed`` events of that MN; its IKE SA re-keys
  too), counted in ``[t - REKEY_BEFORE_S, t + REKEY_AFTER_S]`` outside handover windows;
* the RSS slope of each daemon after the warm-up (least squares, MB/h);
* every table size after the warm-up: growing if its smallest value in the last third of the
  samples is above its largest in the first third (timelines are bounded by their cap);
* SPIs left behind: replayed SPIs that the receiver still knew, other than its current one.

Times are CLOCK_MONOTONIC, which the daemons' timelines and the stream reports share.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from mipsec.io import control
from mipsec.lab import stop_on_signals
from mipsec.lab import topology as topo
from mipsec.lab.lab import Lab, LabError

HANDOVER_BEFORE_S = 0.2      # a handover window opens this long before the move command
HANDOVER_TAIL_S = 1.0        # and closes this long after the registration completed
REKEY_BEFORE_S = 0.5         # a re-key's window around its GW timeline event
REKEY_AFTER_S = 1.5
EDGE_S = 2.0                 # datagrams sent in the first / last seconds are not judged
RSS_SLOPE_LIMIT_MB_H = 2.0
STREAM_PORT = 5011
ESP = 50
NON_ESP_MARKER = bytes(4)


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


# --- the sniffer: first ESP packet of every SPI (runs in the GW's namespace) -------------------

def esp_spi(packet: bytes) -> int | None:
    """The SPI of an ESP packet (plain, or in UDP 4500 without the non-ESP marker)."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if packet[9] == ESP and len(packet) >= ihl + 8:
        return int.from_bytes(packet[ihl:ihl + 4], "big")
    if packet[9] == 17 and len(packet) >= ihl + 16 \
            and int.from_bytes(packet[ihl + 2:ihl + 4], "big") == 4500 \
            and packet[ihl + 8:ihl + 12] != NON_ESP_MARKER:
        return int.from_bytes(packet[ihl + 8:ihl + 12], "big")
    return None


def sniff(iface: str, out: str, stop: list[bool]) -> None:
    # ETH_P_ALL: packets the GW sends reach only the taps of every protocol
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
    sock.bind((iface, 0x0003))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    seen: dict[int, dict[str, Any]] = {}

    def write() -> None:
        with open(out + ".tmp", "w") as f:
            json.dump({f"{k:08x}": v for k, v in seen.items()}, f)
        os.replace(out + ".tmp", out)

    last_write = time.monotonic()
    while not stop[0]:
        for _key, _ in sel.select(0.2):
            while True:
                try:
                    data, addr = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[1] != 0x0800:
                    continue                                 # not IPv4
                spi = esp_spi(data)
                if spi is None:
                    continue
                now = time.monotonic()
                entry = seen.get(spi)
                if entry is None:
                    seen[spi] = {"packet": data.hex(), "src": socket.inet_ntoa(data[12:16]),
                                 "dst": socket.inet_ntoa(data[16:20]), "first": now,
                                 "last": now, "count": 1}
                else:
                    entry["last"] = now
                    entry["count"] += 1
        if time.monotonic() - last_write > 5.0:
            write()
            last_write = time.monotonic()
    write()


# --- the replayer: sends raw IPv4 packets read from stdin (runs in the router's namespace) ---

def _ip_checksum(header: bytes) -> int:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def redirect(packet: bytes, dst: str) -> bytes:
    """``packet`` with its outer destination set to ``dst`` (IPv4 checksum redone; an ESP-in-UDP
    checksum zeroed, RFC 3948 §2.1 allows it).  ESP does not cover the outer header."""
    ihl = (packet[0] & 0x0F) * 4
    p = bytearray(packet)
    p[16:20] = socket.inet_aton(dst)
    p[10:12] = b"\0\0"
    p[10:12] = _ip_checksum(bytes(p[:ihl])).to_bytes(2, "big")
    if p[9] == 17:
        p[ihl + 6:ihl + 8] = b"\0\0"
    return bytes(p)


def replayer() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for line in sys.stdin:
        packet = bytes.fromhex(line.strip())
        try:
            sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
            print("sent", flush=True)
        except OSError as exc:
            print(f"error {exc}", flush=True)
    return 0


# --- sampling -----------------------------------------------------------------------------------

def process_figures(pid: int) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": pid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / tick
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        out["gone"] = True
    return out


def sizes_of(role: str, status: dict[str, Any]) -> dict[str, int]:
    node = status.get("node", {})
    sizes = dict(node.get("sizes", {}))
    if role == "ha":
        sizes["bindings"] = len(node.get("bindings", {}))
    return sizes


def counters_of(status: dict[str, Any]) -> dict[str, Any]:
    node = status.get("node", {})
    return {"drops": node.get("drops", {}), "sad_drops": node.get("sad_drops", {}),
            "io": {k: v for k, v in status.get("io", {}).items() if isinstance(v, (int, float))}}


class Sampler(threading.Thread):
    """Every ``period`` s: process figures, sizes and counters of each daemon; the timelines
    accumulate (deduplicated) so that nothing is missed if a daemon bounds its own.  Each
    daemon is asked only for the events since the newest one already seen (a whole copy of a
    long timeline costs the daemon memory and time)."""

    def __init__(self, lab: Lab, period: float):
        super().__init__(daemon=True)
        self.lab, self.period = lab, period
        self.samples: list[dict[str, Any]] = []
        self.events: dict[tuple, dict[str, Any]] = {}
        self._since: dict[str, float] = {}
        self._stop = threading.Event()

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"time": time.monotonic(), "roles": {}}
        for role in self.lab.daemons:
            pid = self.lab.pid(role)
            fig: dict[str, Any] = process_figures(pid) if pid is not None else {"gone": True}
            try:
                st = control.request(self.lab.socket(role), "status", 10.0)
                fig["sizes"] = sizes_of(role, st)
                fig.update(counters_of(st))
                since = self._since.get(role, 0.0)
                tl = control.request(self.lab.socket(role), f"timeline since {since!r}",
                                     10.0).get("timeline", [])
                for ev in tl:
                    key = (ev.get("time"), ev.get("node"), ev.get("kind"))
                    self.events.setdefault(key, ev)
                    self._since[role] = max(self._since.get(role, 0.0), ev.get("time", 0.0))
            except (OSError, ValueError) as exc:
                fig["status_error"] = str(exc)
            row["roles"][role] = fig
        self.samples.append(row)
        return row

    def run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._stop.set()

    def timeline(self) -> list[dict[str, Any]]:
        return sorted(self.events.values(), key=lambda e: e.get("time", 0.0))


# --- the run ------------------------------------------------------------------------------------

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

    lab = Lab(prefix=plan.prefix or f"sk{os.getpid() % 100000}-")
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
        sniffer = lab.popen("gw", lab.python, "-m", "mipsec.lab.soak", "--sniff", "out0",
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
        sampler = Sampler(lab, plan.sample_s)
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
            proc.wait(timeout=max(1.0, t0 + plan.duration_s - time.monotonic()) + 60)
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
        for k in range(1, plan.mobiles + 1):
            lab.exec("cn", "ping", "-c", "3", "-i", "0.2", "-W", "1", lab.home_address(k))
        time.sleep(0.5)
        sniffer.send_signal(signal.SIGTERM)
        sniffer.wait(timeout=10)
        with open(spi_file) as f:
            spis = json.load(f)
        record["places"] = dict(places)
        record["replay"] = replay_spis(lab, spis, places)
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


def _mn_inbound(node: dict[str, Any]) -> set[int]:
    sa = (node.get("sas") or {}).get("inbound")
    return {int(sa["spi"], 16)} if sa else set()


def _allowed_spis(lab: Lab, role: str) -> tuple[set[int], set[int]]:
    """(current inbound SPIs, re-keyed ones still in their grace period) of ``role`` (the GW:
    of every MN)."""
    node = lab.status(role).get("node", {})
    if role == "gw":
        current = {int(m["sas"]["inbound"]["spi"], 16) for m in node.get("mobiles", {}).values()}
    else:
        current = _mn_inbound(node)
    return current, {int(s, 16) for s in node.get("inbound_retiring", [])}


def _unknown_spi_count(lab: Lab, role: str) -> int:
    node = lab.status(role).get("node", {})
    return int(node.get("drops", {}).get("unknown-spi", 0)) + \
        int(node.get("sad_drops", {}).get("unknown-spi", 0))


def _any_drop_count(lab: Lab, role: str) -> int:
    node = lab.status(role).get("node", {})
    return sum(node.get("drops", {}).values()) + sum(node.get("sad_drops", {}).values())


def replay_spis(lab: Lab, spis: dict[str, dict[str, Any]],
                places: dict[str, str] | None = None) -> dict[str, Any]:
    """Send one captured packet of every SPI again (from the router's namespace) to whoever
    received it: the GW, or the MN whose care-of address it went to, at that MN's current
    care-of address (``places``: where each MN is now); which SPIs are still known?"""
    places = places if places is not None else {lab.mn(1): lab.load_state().get("place", "a")}
    mn_of = {lab.care_of(p, k): lab.mn(k) for k in range(1, lab.mobiles + 1)
             for p in lab.places}
    number = {lab.mn(k): k for k in range(1, lab.mobiles + 1)}
    current = {role: _allowed_spis(lab, role)[0] for role in lab.daemons if role != "ha"}
    proc = lab.popen("rt", lab.python, "-m", "mipsec.lab.soak", "--replay",
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    results: list[dict[str, Any]] = []
    try:
        # newest first: the SPIs of the last traffic are still current when they are replayed
        for spi_hex, entry in sorted(spis.items(), key=lambda kv: -kv[1]["last"]):
            spi = int(spi_hex, 16)
            to_gw = entry["dst"] == topo.GW_OUTSIDE
            role = "gw" if to_gw else mn_of.get(entry["dst"])
            packet = bytes.fromhex(entry["packet"])
            if role is None:
                results.append({"spi": spi_hex, "role": None,
                                "skipped": f"sent to {entry['dst']}, no MN's care-of address"})
                continue
            if not to_gw:
                where = places.get(role)
                if where not in lab.places:
                    results.append({"spi": spi_hex, "role": role, "skipped": "MN at home"})
                    continue
                packet = redirect(packet, lab.care_of(where, number[role]))
            cur_before, grace_before = _allowed_spis(lab, role)
            before_unknown = _unknown_spi_count(lab, role)
            before_any = _any_drop_count(lab, role)
            proc.stdin.write(packet.hex() + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline().strip()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and _any_drop_count(lab, role) == before_any:
                time.sleep(0.02)
            unknown = _unknown_spi_count(lab, role) > before_unknown
            cur_after, grace_after = _allowed_spis(lab, role)
            results.append({"spi": spi_hex, "role": role, "sent": answer,
                            "known": not unknown, "current": spi in cur_before | cur_after,
                            "in_grace": spi in grace_before | grace_after,
                            "first": entry["first"], "last": entry["last"],
                            "count": entry["count"]})
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    # known is right for a current SPI and for one in its grace period, for no other
    left = [r for r in results if r.get("known") and not r.get("current")
            and not r.get("in_grace")]
    return {"spis": len(spis), "results": results, "left_behind": left,
            "current": {k: [f"{s:08x}" for s in v] for k, v in current.items()}}


# --- analysis -----------------------------------------------------------------------------------

def lost_with_times(sender: dict[str, Any], receiver: dict[str, Any], rate: float
                    ) -> tuple[list[tuple[int, float]], int]:
    """(lost (seq, estimated time)..., judged count) for datagrams sent between EDGE_S after
    the start and EDGE_S before the end.  A lost datagram's time is interpolated between the
    arrivals of the nearest received sequence numbers around it."""
    sent = sender["sent"]
    span = max(1e-9, sender["end"] - sender["start"])
    first = int(EDGE_S * sent / span)
    last = max(first, sent - int(EDGE_S * sent / span) - int(rate * 0.5))
    got: dict[int, float] = {}
    for seq, t in receiver["received"]:
        got.setdefault(seq, t)
    seqs = sorted(got)
    lost = []
    for seq in range(first, last):
        if seq in got:
            continue
        i = bisect.bisect_left(seqs, seq)
        lo = seqs[i - 1] if i > 0 else None
        hi = seqs[i] if i < len(seqs) else None
        if lo is not None and hi is not None:
            t = got[lo] + (got[hi] - got[lo]) * (seq - lo) / (hi - lo)
        elif lo is not None:
            t = got[lo] + (seq - lo) / rate
        elif hi is not None:
            t = got[hi] - (hi - seq) / rate
        else:
            t = sender["start"] + seq / rate
        lost.append((seq, t))
    return lost, last - first


def _slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx * 3600.0


def _analyse_mobile(mobile: dict[str, Any], events: list[dict[str, Any]], rate: float,
                    t0: float, end: float) -> dict[str, Any]:
    """One MN's figures: its moves, its streams judged against its own handover windows, and
    its re-keys (events that name its home address)."""
    moves = mobile["moves"]
    windows = []
    for i, mv in enumerate(moves):
        nxt = moves[i + 1]["time"] if i + 1 < len(moves) else end
        stop = (mv["registered"] + HANDOVER_TAIL_S) if mv.get("registered") else nxt
        windows.append((mv["time"] - HANDOVER_BEFORE_S, min(stop, nxt), mv["to"]))

    def in_handover(t: float) -> bool:
        return any(a <= t <= b for a, b, _ in windows)

    home = mobile["home"]
    mine = [e for e in events if (e.get("detail") or {}).get("home_address") == home]
    rekeys = [e for e in mine if e.get("kind") == "gw-sas-rekeyed"]
    ike_rekeys = [e for e in mine if e.get("kind") == "ike-rekeyed"]
    ends = [e for e in mine if e.get("kind") == "ike-ended"]
    fig: dict[str, Any] = {
        "moves": len(moves), "returns_home": sum(1 for m in moves if m["to"] == "home"),
        "failed_moves": sum(1 for m in moves if m.get("error")), "child_rekeys": len(rekeys),
        "ike_rekeys": len(ike_rekeys), "ike_sas_ended": len(ends), "directions": {},
        "per_rekey": []}
    per_rekey = {id(e): 0 for e in rekeys + ike_rekeys}
    for name, snd, rcv in (("downlink", "cn", "mn"), ("uplink", "mn", "cn")):
        sender, receiver = mobile[f"stream_{snd}"], mobile[f"stream_{rcv}"]
        lost, judged = lost_with_times(sender, receiver, rate)
        inside = [t for _s, t in lost if in_handover(t)]
        outside = [t for _s, t in lost if not in_handover(t)]
        for t in outside:
            for e in rekeys + ike_rekeys:
                if e["time"] - REKEY_BEFORE_S <= t <= e["time"] + REKEY_AFTER_S:
                    per_rekey[id(e)] += 1
                    break
        fig["directions"][name] = {
            "judged": judged, "lost": len(lost), "sender_skipped": sender.get("skipped", 0),
            "lost_in_handover": len(inside), "lost_outside_handover": len(outside),
            "outside_at": [round(t - t0, 2) for t in outside[:50]]}
    for e in rekeys + ike_rekeys:
        fig["per_rekey"].append({"at_s": round(e["time"] - t0, 2), "kind": e["kind"],
                                 "in_handover": in_handover(e["time"]),
                                 "lost": per_rekey[id(e)]})
    fig["rekey_loss"] = sum(per_rekey.values())
    fig["rekeys_in_handover"] = sum(1 for r in fig["per_rekey"] if r["in_handover"])
    return fig


def analyse(record: dict[str, Any]) -> dict[str, Any]:
    plan = record["plan"]
    rate = plan["rate"]
    t0 = record["start"]
    warm = t0 + (plan["warmup_s"] if plan.get("warmup_s") is not None
                 else min(300.0, plan["minutes"] * 15.0))
    events = record.get("timeline", [])
    per_mobile = {name: _analyse_mobile(m, events, rate, t0, record["end"])
                  for name, m in record["mobiles"].items()}
    figures: dict[str, Any] = {"mobiles": per_mobile, "directions": {}, "per_rekey": []}
    for key in ("moves", "returns_home", "failed_moves", "child_rekeys", "ike_rekeys",
                "ike_sas_ended", "rekey_loss", "rekeys_in_handover"):
        figures[key] = sum(m[key] for m in per_mobile.values())
    for name in ("downlink", "uplink"):
        rows = [m["directions"][name] for m in per_mobile.values()]
        figures["directions"][name] = {
            key: sum(r[key] for r in rows) for key in
            ("judged", "lost", "sender_skipped", "lost_in_handover", "lost_outside_handover")}
        figures["directions"][name]["outside_at"] = [
            t for r in rows for t in r["outside_at"]][:50]
    for mobile_name, m in per_mobile.items():
        figures["per_rekey"] += [{**r, "mobile": mobile_name} for r in m["per_rekey"]]
    # processes
    samples = record.get("samples", [])
    procs: dict[str, Any] = {}
    for role in record.get("daemons", ("ha", "gw", "mn")):
        pts = [(s["time"], s["roles"][role]["rss_kb"] / 1024.0) for s in samples
               if role in s["roles"] and "rss_kb" in s["roles"][role]]
        after = [p for p in pts if p[0] >= warm]
        fds = [s["roles"][role].get("fds") for s in samples if role in s["roles"]]
        cpu = [(s["time"], s["roles"][role].get("cpu_s")) for s in samples
               if role in s["roles"] and s["roles"][role].get("cpu_s") is not None]
        cpu_share = ((cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0])
                     if len(cpu) > 1 and cpu[-1][0] > cpu[0][0] else None)
        sizes = [(s["time"], s["roles"][role].get("sizes", {})) for s in samples
                 if role in s["roles"] and s["time"] >= warm]
        growing, table = [], {}
        if sizes:
            third = max(1, len(sizes) // 3)
            keys = sorted({k for _t, d in sizes for k in d})
            for k in keys:
                vals = [d.get(k, 0) for _t, d in sizes]
                table[k] = {"first": vals[0], "max": max(vals), "last": vals[-1]}
                if k == "timeline":
                    continue                 # bounded by its limit (mipsec.node.timeline)
                if len(vals) >= 3 and min(vals[-third:]) > max(vals[:third]):
                    growing.append(k)
        procs[role] = {
            "rss_mb_first": pts[0][1] if pts else None, "rss_mb_last": pts[-1][1] if pts else None,
            "rss_slope_mb_h": _slope_per_hour(after), "rss_points_after_warmup": len(after),
            "fds_first": fds[0] if fds else None, "fds_last": fds[-1] if fds else None,
            "fds_max": max((f for f in fds if f is not None), default=None),
            "cpu_share": cpu_share, "sizes": table, "growing": growing,
            "drops_last": samples[-1]["roles"][role].get("drops", {}) if samples else {},
            "sad_drops_last": samples[-1]["roles"][role].get("sad_drops", {}) if samples else {}}
    figures["processes"] = procs
    replay = record.get("replay", {})
    figures["spis_replayed"] = replay.get("spis", 0)
    figures["spis_known"] = [r["spi"] for r in replay.get("results", []) if r.get("known")]
    figures["spis_left_behind"] = [r["spi"] for r in replay.get("left_behind", [])]
    figures["spis_current"] = replay.get("current", {})
    # the replay tells known from unknown: a current (or retiring) SPI of each receiver was known
    receivers = [r for r in record.get("daemons", ("gw", "mn")) if r != "ha"]
    figures["replay_control"] = {
        role: any(r.get("known") and (r.get("current") or r.get("in_grace"))
                  for r in replay.get("results", []) if r["role"] == role)
        for role in receivers}
    figures["duration_s"] = record["end"] - t0
    return figures


def verdict(fig: dict[str, Any]) -> list[tuple[str, bool, str]]:
    out = []
    outside = sum(d["lost_outside_handover"] for d in fig["directions"].values())
    per_mn = "; ".join(f"{name} {sum(d['lost_outside_handover'] for d in m['directions'].values())}"
                       for name, m in fig["mobiles"].items()) if len(fig["mobiles"]) > 1 else ""
    out.append(("zero loss outside handover windows", outside == 0,
                f"{outside} lost" + (f" ({per_mn})" if per_mn else "")))
    out.append(("zero loss at re-keys", fig["rekey_loss"] == 0,
                f"{fig['rekey_loss']} lost over {fig['child_rekeys']} child and "
                f"{fig['ike_rekeys']} IKE SA re-keys"))
    for role, p in fig["processes"].items():
        slope = p["rss_slope_mb_h"]
        out.append((f"{role}: RSS slope after warm-up < {RSS_SLOPE_LIMIT_MB_H:g} MB/h",
                    slope is not None and slope < RSS_SLOPE_LIMIT_MB_H,
                    "n/a" if slope is None else f"{slope:+.2f} MB/h"))
        out.append((f"{role}: no growing structure", not p["growing"],
                    ", ".join(p["growing"]) or "none"))
    left = fig["spis_left_behind"]
    control = fig["replay_control"]
    out.append(("no SPI left behind", not left and all(control.values()),
                f"{fig['spis_replayed']} SPIs replayed, known: {len(fig['spis_known'])} "
                f"(each a current or retiring one), left behind: {', '.join(left) or 'none'}; "
                f"a current SPI known: "
                + ", ".join(f"{role} {ok}" for role, ok in control.items())))
    return out


def format_report(fig: dict[str, Any], plan: dict[str, Any]) -> str:
    n = len(fig["mobiles"])
    lines = [f"soak: {fig['duration_s'] / 60:.1f} min, {n} MN{'s' if n > 1 else ''}, "
             f"{plan['rate']:g} datagrams/s each way per MN, "
             f"child SA {plan['child_lifetime_s']:g} s, IKE SA {plan['ike_lifetime_s']:g} s, "
             f"one-way delay {plan['delay_ms']:g} ms",
             f"  {fig['moves']} moves ({fig['returns_home']} returns home, "
             f"{fig['failed_moves']} not completed), {fig['child_rekeys']} child and "
             f"{fig['ike_rekeys']} IKE SA re-keys ({fig['rekeys_in_handover']} inside a handover "
             f"window), {fig['ike_sas_ended']} IKE SA ends logged"]
    for name, d in fig["directions"].items():
        lines.append(f"  {name}: {d['judged']} judged, lost {d['lost']}: "
                     f"{d['lost_in_handover']} inside handover windows, "
                     f"{d['lost_outside_handover']} outside (the sender, held up by a busy "
                     f"machine, skipped {d['sender_skipped']} send slots)")
    if n > 1:
        for name, m in fig["mobiles"].items():
            dl, ul = m["directions"]["downlink"], m["directions"]["uplink"]
            lines.append(f"    {name}: {m['moves']} moves ({m['returns_home']} home, "
                         f"{m['failed_moves']} not completed), {m['child_rekeys']} child / "
                         f"{m['ike_rekeys']} IKE SA re-keys; downlink lost "
                         f"{dl['lost_in_handover']} in / {dl['lost_outside_handover']} outside "
                         f"handovers of {dl['judged']}, uplink {ul['lost_in_handover']} / "
                         f"{ul['lost_outside_handover']} of {ul['judged']}; at re-keys "
                         f"{m['rekey_loss']}")
    per = [r["lost"] for r in fig["per_rekey"] if not r["in_handover"]]
    if per:
        lines.append(f"  loss per re-key (outside handovers): max {max(per)}, total {sum(per)}, "
                     f"{sum(1 for x in per if x)} of {len(per)} re-keys lost any")
    for role, p in fig["processes"].items():
        slope = p["rss_slope_mb_h"]
        cpu = p["cpu_share"]
        first = "n/a" if p["rss_mb_first"] is None else f"{p['rss_mb_first']:.1f}"
        last = "n/a" if p["rss_mb_last"] is None else f"{p['rss_mb_last']:.1f}"
        lines.append(f"  {role}: RSS {first} -> {last} MB, slope "
                     f"after warm-up {'n/a' if slope is None else f'{slope:+.2f} MB/h'}; fds "
                     f"{p['fds_first']} -> {p['fds_last']} (max {p['fds_max']}); CPU "
                     f"{'n/a' if cpu is None else f'{100 * cpu:.0f} %'}")
        sizes = ", ".join(f"{k} {v['first']}->{v['last']} (max {v['max']})"
                          for k, v in p["sizes"].items())
        if sizes:
            lines.append(f"    sizes: {sizes}")
    lines.append("criteria:")
    for name, ok, detail in verdict(fig):
        lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m mipsec.lab.soak",
                                description="helpers of the lab soak run (benchmarks/bench_soak.py)")
    p.add_argument("--sniff", metavar="IFACE", help="keep the first ESP packet of each SPI")
    p.add_argument("--out", help="with --sniff: JSON file")
    p.add_argument("--replay", action="store_true", help="send hex IPv4 packets from stdin")
    a = p.parse_args(argv)
    if a.sniff:
        sniff(a.sniff, a.out, stop_on_signals())
        return 0
    if a.replay:
        return replayer()
    p.error("--sniff IFACE --out FILE or --replay")
    return 2


if __name__ == "__main__":
    sys.exit(main())
