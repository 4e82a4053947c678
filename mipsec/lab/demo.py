"""``mipsec lab demo``: live handovers with a UDP stream, timelines, interruption and loss.

Scenario: the lab comes up with the MN registered in visited network a; a UDP stream runs both
ways between the CN (10.1.0.10) and the MN's home address (10.1.0.100); the MN moves a -> b,
b -> a, then home (two handovers and a return home), ``dwell`` seconds apart.  For each move we
print the merged MN / GW / HA timeline (milliseconds after the move) and, per direction, the
longest interruption (largest gap between two arrivals) and the packets lost in that phase.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from itertools import pairwise
from typing import Any, TextIO

from mipsec.io.pcap import ike_keyfile_path
from mipsec.lab.lab import Lab
from mipsec.lab.stream import analyse

STREAM_PORT = 5001
MOVES = ("b", "a", "home")


def print_timeline(events: list[dict[str, Any]], t0: float, out: TextIO) -> None:
    from mipsec.node.timeline import format_timeline
    print(f"    {'after move':>12}  {'node':<6} {'event':<26} details", file=out)
    for line in format_timeline(events, t0):
        print("    " + line, file=out)


CAPTURE_FILES = ("gw.pcap", "gw.pcap.esp_sa", ike_keyfile_path("gw.pcap.esp_sa"))


def keep_capture(state_dir: str, where: str | None = None) -> str:
    """Move the GW's capture and its key files out of the lab's state directory (which `down`
    removes) into ``where``: by default a fresh private directory from ``tempfile.mkdtemp``
    (mode 0700, a random name nobody can create in advance); a ``where`` given must not exist
    yet (it is created 0700), so the key files never land in a directory someone else made.
    /run is a tmpfs and /tmp usually is not: a rename cannot cross that, so this copies where it
    must (shutil.move)."""
    if where is None:
        where = tempfile.mkdtemp(prefix="mipsec-demo-capture-")
    else:
        os.mkdir(where, 0o700)
    for name in CAPTURE_FILES:
        source = os.path.join(state_dir, name)
        if os.path.exists(source):
            shutil.move(source, os.path.join(where, name))
    return where


class Streams:
    """The CN <-> MN stream pair, each a `python -m mipsec.lab.stream` in its namespace."""

    def __init__(self, lab: Lab, rate: float, duration: float, size: int = 64):
        self.lab = lab
        self.reports = {"cn": lab.path("stream-cn.json"), "mn": lab.path("stream-mn.json")}
        self.procs = {}
        peers = {"cn": "10.1.0.100", "mn": "10.1.0.10"}
        for node in ("cn", "mn"):
            self.procs[node] = lab.popen(
                node, lab.python, "-m", "mipsec.lab.stream", "--port", str(STREAM_PORT),
                "--peer", peers[node], "--rate", str(rate), "--duration", str(duration),
                "--size", str(size), "--out", self.reports[node])

    def wait(self, timeout: float) -> dict[str, dict[str, Any]]:
        for proc in self.procs.values():
            try:
                proc.wait(timeout=timeout)
            except Exception:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=5)
        out = {}
        for node, path in self.reports.items():
            with open(path) as f:
                out[node] = json.load(f)
        return out

    def stop(self, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        """End both streams now (SIGTERM: each writes its report) and read the reports."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def phase_figures(sender: dict[str, Any], receiver: dict[str, Any], start: float, end: float,
                  rate: float) -> dict[str, Any]:
    """Loss and longest gap of one direction for packets sent in [start, end)."""
    t0 = sender["start"]
    first = max(0, int((start - t0) * rate))
    last = min(sender["sent"], int((end - t0) * rate))
    arrivals = [(s, t) for s, t in receiver["received"] if first <= s < last]
    seqs = {s for s, _ in arrivals}
    times = sorted(t for _, t in arrivals)
    gaps = [b - a for a, b in pairwise(times)]
    return {"sent": max(0, last - first), "received": len(seqs),
            "lost": max(0, last - first - len(seqs)),
            "interruption_ms": (max(gaps) - 1.0 / rate) * 1000 if gaps else None}


def run_lab_demo(prefix: str = "mipsec-demo-", delay_ms: float = 10.0, rate: float = 200.0,
                 dwell_s: float = 2.0, keep: bool = False, out: TextIO = sys.stdout,
                 sa_source: str = "ikev2", handover_mode: str = "siu",
                 plot_dir: str | None = None) -> int:
    """The demo; ``plot_dir``: also write a sequence chart per move and the packet arrivals
    around the moves there (PNG, ``mipsec.plot``)."""
    lab = Lab(prefix=prefix)
    # SIGTERM / SIGHUP (a closed terminal) unwind like Ctrl-C, so the `finally` removes the lab.
    def interrupted(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    print(f"mipsec lab demo: building the lab (prefix {prefix!r}, one-way Internet delay "
          f"{delay_ms:g} ms) ...", file=out, flush=True)
    streams = None
    try:
        lab.up(delay_ms=delay_ms, place="a", sa_source=sa_source, handover_mode=handover_mode)
        how = ("SAs negotiated by IKEv2" if sa_source == "ikev2" else "manual keys") + \
            (", MOBIKE handovers" if handover_mode == "mobike" else ", SIU handovers")
        print(f"  MN registered in visited network a (CoA 172.16.1.10); {how}", file=out,
              flush=True)
        duration = dwell_s * (len(MOVES) + 1)
        streams = Streams(lab, rate, duration)
        time.sleep(dwell_s)
        moves = []
        for where in MOVES:
            result = lab.move(where, wait=True)
            moves.append(result)
            time.sleep(max(0.0, dwell_s - (time.monotonic() - result["time"])))
        reports = streams.wait(timeout=duration + 10)
        streams = None
        bounds = [m["time"] for m in moves] + [time.monotonic()]
        worst = 0
        for i, move in enumerate(moves):
            label = {"a": "to visited network a (CoA 172.16.1.10)",
                     "b": "to visited network b (CoA 172.16.2.10)",
                     "home": "back home (home address on the home link)"}[move["to"]]
            print(f"\nMove {i + 1}: {label}; the MN noticed it after "
                  f"{(move['noticed'] - move['time']) * 1000:.1f} ms, registration complete "
                  f"{(move['registered'] - move['noticed']) * 1000:.1f} ms later", file=out)
            print_timeline(lab.timelines(move["time"] - 0.001, bounds[i + 1]), move["time"], out)
            for name, snd, rcv in (("downlink CN->MN", "cn", "mn"), ("uplink   MN->CN", "mn", "cn")):
                fig = phase_figures(reports[snd], reports[rcv], move["time"] - 0.5,
                                    bounds[i + 1] - 0.5, rate)
                inter = ("n/a" if fig["interruption_ms"] is None
                         else f"{max(0.0, fig['interruption_ms']):.1f} ms")
                print(f"    {name}: interruption {inter}, lost {fig['lost']} of {fig['sent']}",
                      file=out)
                worst = max(worst, fig["lost"])
        if plot_dir:
            from mipsec.plot import write_demo_plots
            titles = {"a": "to visited network a", "b": "to visited network b",
                      "home": "back home"}
            marks = [(m["time"], f"move {i + 1}: {titles[m['to']]}") for i, m in enumerate(moves)]
            parts = [lab.timelines(m["time"] - 0.001, bounds[i + 1]) for i, m in enumerate(moves)]
            streams_in = {"downlink CN->MN": [(int(s), float(t)) for s, t in reports["mn"]["received"]],
                          "uplink MN->CN": [(int(s), float(t)) for s, t in reports["cn"]["received"]]}
            label = f"lab, {handover_mode.upper()}, {delay_ms:g} ms one way"
            for path in write_demo_plots(plot_dir, marks, parts, streams_in, label):
                print(f"plot: {path}", file=out)
        print(file=out)
        for name, snd, rcv in (("CN->MN", "cn", "mn"), ("MN->CN", "mn", "cn")):
            total = analyse(reports[snd]["sent"], reports[rcv]["received"])
            print(f"whole run {name}: {total['received']} of {reports[snd]['sent']} received, "
                  f"{total['lost']} lost, longest gap {total['longest_gap_s'] * 1000:.1f} ms",
                  file=out)
        where = lab.state_dir
        if not keep:
            where = keep_capture(lab.state_dir)      # a fresh private directory
        pcap, keys = os.path.join(where, "gw.pcap"), os.path.join(where, "gw.pcap.esp_sa")
        ike_keys = ike_keyfile_path(keys)
        print(f"\ncapture of the GW's outside: {pcap} (ESP keys for Wireshark: {keys})\n"
              f"  mkdir -p ~/.config/wireshark && cp {keys} ~/.config/wireshark/esp_sa\n"
              + (f"  cp {ike_keys} ~/.config/wireshark/ikev2_decryption_table\n"
                 if os.path.exists(ike_keys) else "")
              + f"  tshark -r {pcap} -o esp.enable_encryption_decode:TRUE "
              f"-o esp.enable_authentication_check:TRUE -Y mip", file=out)
        return 0
    finally:
        if streams is not None:
            streams.kill()
        if not keep:
            lab.down()
