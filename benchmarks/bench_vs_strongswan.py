"""mipsec against strongSwan's userspace ESP (charon + kernel-libipsec) on the same lab (root).

One topology for every system (mipsec.lab.topology: CN and HA on the home link, GW, a router,
the MN in visited network a), traffic CN -> MN:

* **mipsec ESP** / **mipsec UDP**: the lab's daemons (HA, GW, MN; IKEv2, AES-GCM-128), ESP
  directly over IP or in UDP 4500; the CN's packets reach the HA (proxy ARP), are tunnelled
  (IP-in-IP) to the GW, which encrypts them to the MN;
* **strongSwan**: no mipsec daemon; two charons (kernel-libipsec: ESP in C in userspace over
  its TUN ``ipsec0``, always ESP in UDP 4500; AES-GCM-128, MOBIKE), one in the GW namespace and
  one in the MN's, with the MN's home address on its loopback; the HA forwards in its kernel
  (CN -> HA -> GW by routes), so the path has the same hops;
* **plain**: the same namespaces and hops without IPsec (a second MN address routed in clear).

Loads, from a small C sender/sink (benchmarks/udpload.c, compiled at run time with ``cc -O2``):
maximum rate ("blast": sendmmsg as fast as the socket takes) and fixed rates, at 64 and 1372-byte
UDP payloads (1372 + 28 = libipsec's TUN MTU of 1400).  Delivered packets/s, loss, and the CPU
time per delivered packet of the IPsec processes (/proc/PID/stat utime + stime: mipsec's HA, GW
and MN daemons; strongSwan's two charons), read before and after each run.  Repetitions are
interleaved (each load runs on every system in turn, the order rotating), and every ratio is
formed within one repetition; the table shows the median over repetitions.

Handover: a 1,000 packets/s stream each way (mipsec.lab.stream), the MN moves a -> b
(break-before-make) for mipsec SIU, mipsec MOBIKE mode and strongSwan MOBIKE, at 0 and 10 ms
one-way Internet delay (the lab's delay forwarder): interruption (longest gap minus the sending
interval) and packets lost per direction.

Usage:  sudo python3 benchmarks/bench_vs_strongswan.py [--reps 3] [--seconds 1]
            [--out benchmarks/figures] [--json FILE] [--no-handover]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mipsec.lab import topology as topo  # noqa: E402
from mipsec.lab.demo import Streams  # noqa: E402
from mipsec.lab.lab import Lab, requirements_problem  # noqa: E402
from mipsec.lab.stream import analyse  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LIBIPSEC = "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so"
PLAIN_MN = "10.3.0.100"          # the MN's second address, routed in clear (plain path)
PORT = 5003
SIZES = (64, 1372)
RATES = {64: (2000, 5000, 10000, 20000, 40000), 1372: (2000, 5000, 10000, 20000, 40000)}
CPU_RATES = (5000, 20000)         # fixed rates at which the CPU per packet is quoted (64 B)
LOSS_FREE = 0.01                  # "loss-free" rate: at most 1 % lost
SYSTEMS = ("mipsec-esp", "mipsec-udp", "strongswan", "plain")
PROCESSES = {"mipsec": ("HA", "GW", "MN"), "strongswan": ("GW charon", "MN charon")}
HZ = os.sysconf("SC_CLK_TCK")

STRONGSWAN_CONF = """charon {
  load = random nonce openssl aes sha1 sha2 hmac gcm kdf pem pkcs1 x509 gmp stroke kernel-libipsec kernel-netlink socket-default updown
  install_routes = yes
  filelog {
    main {
      path = $log
      time_format = %T
      default = 1
      flush_line = yes
    }
  }
}
"""  # noqa: E501 (charon reads its plugin list from one line)
IPSEC_CONF = """config setup

conn mip
  keyexchange=ikev2
  left=$left
  leftid=@$me
  leftsubnet=$left_subnet
  right=$right
  rightid=@$peer
  rightsubnet=$right_subnet
  authby=secret
  ike=aes128gcm16-prfsha256-x25519!
  esp=aes128gcm16!
  forceencaps=yes
  mobike=yes
  dpdaction=none
  auto=$auto
"""
PSK = "bench psk, not a secret"


# --- the load tool ---------------------------------------------------------------------------

def build_udpload(tmp: str) -> str:
    exe = os.path.join(tmp, "udpload")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(HERE, "udpload.c")], check=True)
    return exe


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(user, system) clock ticks of the processes (all their threads)."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])                          # utime
            system += int(fields[12])                        # stime
        except (OSError, IndexError, ValueError):
            pass
    return user, system


_runs = iter(range(10 ** 9))


def run_load(exe: str, ns_src: str, ns_dst: str, dst: str, size: int, rate: int, seconds: float,
             pids: list[int]) -> dict[str, Any]:
    # a port of its own per run: what a system still has queued (libipsec's queues, a slow
    # daemon) when its run ends must not reach the next run's sink in the same namespace
    port = PORT + next(_runs) % 2000
    sink = subprocess.Popen(["ip", "netns", "exec", ns_dst, exe, "recv", str(port),
                             str(seconds + 0.6)], stdout=subprocess.PIPE, text=True)
    assert json.loads(sink.stdout.readline()).get("ready")
    c0 = cpu_ticks(pids)
    per0 = [sum(cpu_ticks([p])) for p in pids]
    snd = subprocess.run(["ip", "netns", "exec", ns_src, exe, "send", dst, str(port), str(size),
                          str(rate), str(seconds)], capture_output=True, text=True, check=True)
    sent = json.loads(snd.stdout)
    got = json.loads(sink.communicate(timeout=seconds + 10)[0])
    c1 = cpu_ticks(pids)
    per1 = [sum(cpu_ticks([p])) for p in pids]
    user, system = c1[0] - c0[0], c1[1] - c0[1]
    span = sent["end"] - sent["start"]
    received = got["received"]
    return {"size": size, "rate": rate, "sent": sent["sent"], "received": received,
            "pps": received / span if span > 0 else 0.0,
            "loss": 1.0 - received / sent["sent"] if sent["sent"] else 1.0,
            "cpu_us_per_pkt": ((user + system) / HZ * 1e6 / received) if received and pids
            else None,
            "cpu_kernel_share": system / (user + system) if user + system else None,
            "cpu_us_by_process": [(b - a) / HZ * 1e6 / received if received else None
                                  for a, b in zip(per0, per1, strict=True)],
            "sender_cpu_us_per_pkt": sent["cpu_s"] * 1e6 / max(1, sent["sent"]),
            "sink_cpu_us_per_pkt": got["cpu_s"] * 1e6 / max(1, received)}


# --- the systems -----------------------------------------------------------------------------

class StrongSwanLab:
    """The lab's topology without mipsec's daemons: two charons, the HA as a kernel router, and
    the plain path to a second MN address."""

    def __init__(self, prefix: str, delay_ms: float = 0.0):
        self.lab = Lab(prefix=prefix)          # for its names, popen, path, _spawn and down
        self.names = self.lab.names
        self.delay_ms = delay_ms
        self.starters: dict[str, subprocess.Popen] = {}
        self.tmp = tempfile.mkdtemp(prefix="bench-sswan-")

    def ns(self, node: str) -> str:
        return self.names.ns(node)

    def up(self) -> None:
        os.makedirs(self.lab.state_dir, mode=0o700, exist_ok=True)
        try:
            topo.build(self.names, self.delay_ms)
            if self.delay_ms > 0:
                self.lab._spawn("delay", "rt", ["-m", "mipsec.lab.delay", "--a", "dl0", "--b",
                                                "dl1", "--delay-ms", str(self.delay_ms)])
            topo.move_mn(self.names, "a")
            ip = lambda node, *a: topo.run(*a, ns=self.ns(node))  # noqa: E731
            ip("mn", "addr", "add", f"{topo.MN_HOME_ADDRESS}/32", "dev", "lo")
            ip("mn", "addr", "add", f"{PLAIN_MN}/32", "dev", "lo")
            for addr in (topo.MN_HOME_ADDRESS, PLAIN_MN):
                ip("cn", "route", "add", f"{addr}/32", "via", topo.HA)
                ip("ha", "route", "add", f"{addr}/32", "via", topo.GW_INSIDE)
            for scope in ("all", "eth0"):
                topo.sysctl(self.ns("ha"), f"net.ipv4.conf.{scope}.send_redirects", 0)
            ip("gw", "route", "add", f"{PLAIN_MN}/32", "via", topo.ROUTER["out0"])
            ip("rt", "route", "add", f"{PLAIN_MN}/32", "via", topo.MN_COA["a"])
            self._charon("gw", left=topo.GW_OUTSIDE, me="gw", peer="mn", left_subnet="10.1.0.0/24",
                         right="%any", right_subnet=f"{topo.MN_HOME_ADDRESS}/32", auto="add")
            self._wait_log("gw", "added configuration 'mip'", 15)
            self._charon("mn", left="%defaultroute", me="mn", peer="gw",
                         left_subnet=f"{topo.MN_HOME_ADDRESS}/32", right=topo.GW_OUTSIDE,
                         right_subnet="10.1.0.0/24", auto="start")
            self._wait_log("mn", "CHILD_SA mip{1} established", 20)
            time.sleep(0.2)
        except BaseException:
            self.down()
            raise

    def _charon(self, node: str, **values: str) -> None:
        d = os.path.join(self.tmp, node)
        os.makedirs(os.path.join(d, "run"), exist_ok=True)
        log = os.path.join(d, "charon.log")
        for name, text in (("strongswan.conf", STRONGSWAN_CONF), ("ipsec.conf", IPSEC_CONF),
                           ("ipsec.secrets", '@gw @mn : PSK "$psk"\n')):
            with open(os.path.join(d, name), "w") as f:
                f.write(string.Template(text).substitute(values, log=log, psk=PSK))
        mounts = (f"mount --bind {d}/run /run && mount --bind {d}/ipsec.conf /etc/ipsec.conf"
                  f" && mount --bind {d}/ipsec.secrets /etc/ipsec.secrets")
        self.starters[node] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(node), "unshare", "-m", "--propagation", "private",
             "sh", "-c", mounts + " && exec ipsec start --nofork"],
            env=dict(os.environ, STRONGSWAN_CONF=os.path.join(d, "strongswan.conf")),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def log(self, node: str) -> str:
        try:
            with open(os.path.join(self.tmp, node, "charon.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _wait_log(self, node: str, text: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.log(node):
                return
            time.sleep(0.05)
        raise RuntimeError(f"charon in {node}: no {text!r} after {timeout} s:\n"
                           f"{self.log(node)[-2000:]}")

    def pids(self) -> list[int]:
        out = []
        for node in ("gw", "mn"):
            try:
                with open(os.path.join(self.tmp, node, "run", "charon.pid")) as f:
                    out.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
        return out

    def move(self, where: str) -> float:
        t0 = time.monotonic()
        topo.move_mn(self.names, where)
        return t0

    def down(self) -> None:
        for proc in self.starters.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.starters.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.lab.down()
        shutil.rmtree(self.tmp, ignore_errors=True)


def mipsec_lab(prefix: str, udp: bool, delay_ms: float = 0.0, mode: str = "siu") -> Lab:
    lab = Lab(prefix=prefix)
    lab.up(delay_ms=delay_ms, place="a", udp_encap=udp, handover_mode=mode,
           ike={"dpd_interval_s": 0})
    return lab


def mipsec_pids(lab: Lab) -> list[int]:
    return [p for p in (lab.pid(r) for r in ("ha", "gw", "mn")) if p is not None]


# --- measurements ----------------------------------------------------------------------------

def throughput(exe: str, labs: dict[str, Any], reps: int, seconds: float) -> list[dict]:
    """Every load on every system, repetitions interleaved; returns one row per run."""
    def target(system: str) -> tuple[str, str, str, list[int]]:
        if system.startswith("mipsec"):
            lab = labs[system]
            return (lab.names.ns("cn"), lab.names.ns("mn"), topo.MN_HOME_ADDRESS,
                    mipsec_pids(lab))
        s = labs["strongswan"]
        return (s.ns("cn"), s.ns("mn"),
                topo.MN_HOME_ADDRESS if system == "strongswan" else PLAIN_MN,
                s.pids() if system == "strongswan" else [])

    loads = [(size, 0) for size in SIZES] + [(size, r) for size in SIZES for r in RATES[size]]
    rows = []
    for rep in range(reps):
        order = list(SYSTEMS[rep % len(SYSTEMS):] + SYSTEMS[:rep % len(SYSTEMS)])
        for size, rate in loads:
            for system in order:
                src, dst, addr, pids = target(system)
                row = run_load(exe, src, dst, addr, size, rate, seconds, pids)
                row.update(system=system, rep=rep)
                rows.append(row)
                print(f"  rep {rep} {system:<11} {size:>5} B "
                      f"{'blast' if not rate else f'{rate / 1000:g}k pps':>9}: "
                      f"{row['pps']:>8.0f} pps delivered, loss {row['loss'] * 100:5.1f} %"
                      + (f", {row['cpu_us_per_pkt']:.1f} us CPU/pkt"
                         if row["cpu_us_per_pkt"] else ""), file=sys.stderr, flush=True)
    return rows


def tx_packets(ns: str, dev: str = "eth0") -> int:
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", dev], capture_output=True,
                         text=True).stdout
    try:
        return int(json.loads(out)[0]["stats64"]["tx"]["packets"])
    except (ValueError, IndexError, KeyError):
        return 0


def wait_flowing(ns: str, packets: int, timeout: float = 15.0) -> None:
    start = tx_packets(ns)
    end = time.monotonic() + timeout
    while time.monotonic() < end and tx_packets(ns) - start < packets:
        time.sleep(0.05)


def handover(system: str, delay_ms: float, prefix: str, rate: float = 1000.0,
             dwell: float = 0.5, lab: Any = None) -> dict[str, Any]:
    """One break-before-make move a -> b under a 1,000 pkt/s stream each way."""
    own = lab is None
    if own:
        lab = (StrongSwanLab(prefix, delay_ms) if system == "strongswan" else
               mipsec_lab(prefix, False, delay_ms, "mobike" if system == "mipsec-mobike" else "siu"))
        if system == "strongswan":
            lab.up()
    try:
        base = lab.lab if system == "strongswan" else lab
        streams = Streams(base, rate, dwell + 4.0)
        try:
            # a loaded machine can take seconds to start the stream tools: move only once the
            # CN has sent a few hundred packets
            wait_flowing(base.names.ns("cn"), 200)
            time.sleep(dwell)
            if system == "strongswan":
                t0 = lab.move("b")
            else:
                t0 = lab.move("b", wait=True)["time"]
            reports = streams.wait(timeout=dwell + 30)
        finally:
            streams.kill()
        if system == "strongswan":
            topo.move_mn(lab.names, "a")       # back, for the next user of this lab
        else:
            lab.move("a", wait=True)
    finally:
        if own:
            lab.down()
    out: dict[str, Any] = {"system": system, "delay_ms": delay_ms, "move_time": t0}
    for name, snd, rcv in (("downlink", "cn", "mn"), ("uplink", "mn", "cn")):
        # packets received between 0.3 s before and 0.7 s after the move: the lost ones are the
        # sequence numbers missing in that range (the sender's own pace does not matter)
        fig = analyse(reports[snd]["sent"], reports[rcv]["received"], t0 - 0.3, t0 + 0.7)
        out[name] = {"interruption_ms": ((fig["longest_gap_s"] - 1.0 / rate) * 1000
                                         if fig["received"] > 1 else None),
                     "lost": fig["lost"], "sent": fig["expected"],
                     "arrivals": [(s, t - t0) for s, t in reports[rcv]["received"]
                                  if -0.3 <= t - t0 <= 0.7]}
    return out


# --- the table and the figures ---------------------------------------------------------------

def median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def summarise(rows: list[dict], reps: int) -> dict[str, Any]:
    by = {}
    for r in rows:
        by[(r["system"], r["rep"], r["size"], r["rate"])] = r

    def loss_free(system: str, rep: int, size: int) -> float:
        # the rate must also have been delivered: a sender that could not keep it (the plain
        # path runs the kernel's forwarding in the sender's context) does not count
        ok = [rate for rate in RATES[size] if by[(system, rep, size, rate)]["loss"] <= LOSS_FREE
              and by[(system, rep, size, rate)]["pps"] >= (1 - 3 * LOSS_FREE) * rate]
        return max(ok) if ok else 0.0

    metrics = {}
    for system in SYSTEMS:
        m = {}
        for size in SIZES:
            m[f"blast_pps_{size}"] = [by[(system, k, size, 0)]["pps"] for k in range(reps)]
            m[f"blast_loss_{size}"] = [by[(system, k, size, 0)]["loss"] for k in range(reps)]
            m[f"loss_free_{size}"] = [loss_free(system, k, size) for k in range(reps)]
        for rate in CPU_RATES:
            m[f"cpu_{rate}"] = [by[(system, k, 64, rate)]["cpu_us_per_pkt"] for k in range(reps)]
            m[f"kernel_share_{rate}"] = [by[(system, k, 64, rate)]["cpu_kernel_share"]
                                         for k in range(reps)]
            m[f"cpu_by_process_{rate}"] = [by[(system, k, 64, rate)].get("cpu_us_by_process", [])
                                           for k in range(reps)]
        metrics[system] = m
    return metrics


def print_table(metrics: dict[str, Any], reps: int, out=sys.stdout) -> None:
    ref = "strongswan"
    lines = [("blast, delivered pps, 64 B", "blast_pps_64", "{:.0f}", False),
             ("blast, delivered pps, 1372 B", "blast_pps_1372", "{:.0f}", False),
             ("blast, loss, 64 B (%)", "blast_loss_64", "{:.1%}", None),
             ("blast, loss, 1372 B (%)", "blast_loss_1372", "{:.1%}", None),
             ("highest rate with <= 1 % loss, 64 B", "loss_free_64", "{:.0f}", False),
             ("highest rate with <= 1 % loss, 1372 B", "loss_free_1372", "{:.0f}", False),
             ("IPsec CPU us/packet at 5k pps (64 B)", "cpu_5000", "{:.1f}", True),
             ("IPsec CPU us/packet at 20k pps (64 B)", "cpu_20000", "{:.1f}", True),
             ("  of which in the kernel, 5k pps (%)", "kernel_share_5000", "{:.0%}", None),
             ("  of which in the kernel, 20k pps (%)", "kernel_share_20000", "{:.0%}", None)]
    head = f"{'(median of ' + str(reps) + ' interleaved repetitions)':<40}"
    print(head + "".join(f"{s:>13}" for s in SYSTEMS) + f"{'ESP/sswan':>11}{'UDP/sswan':>11}",
          file=out)
    for label, key, fmt, _lower_better in lines:
        cells = []
        for system in SYSTEMS:
            v = median(metrics[system][key])
            cells.append(f"{'-' if v != v else fmt.format(v).replace('%', ''):>13}")
        ratios = []
        if _lower_better is not None:
            for mine in ("mipsec-esp", "mipsec-udp"):
                rs = [a / b for a, b in zip(metrics[mine][key], metrics[ref][key], strict=False)
                      if a is not None and b]
                ratios.append(f"{median(rs):>10.2f}x" if rs else f"{'-':>11}")
        print(f"{label:<40}" + "".join(cells) + "".join(ratios), file=out)
    for rate in CPU_RATES:
        parts = []
        for system, names in (("mipsec-esp", PROCESSES["mipsec"]),
                              ("mipsec-udp", PROCESSES["mipsec"]),
                              ("strongswan", PROCESSES["strongswan"])):
            per = metrics[system][f"cpu_by_process_{rate}"]
            cells = [median([r[i] for r in per if len(r) > i]) for i in range(len(names))]
            parts.append(f"{system} " + " / ".join(f"{n} {v:.1f}" for n, v in zip(names, cells, strict=True)))
        print(f"CPU us/packet per process at {rate / 1000:g}k pps (64 B): " + "; ".join(parts),
              file=out)
    print("ratios: mipsec / strongSwan formed within each repetition, then the median; pps and"
          " rates: higher is better, CPU: lower is better.  CPU = utime + stime of mipsec's HA,"
          " GW and MN daemons / of both charons, per delivered packet.", file=out)


def print_handover(results: list[dict], out=sys.stdout) -> None:
    print("\nHandover a -> b (break-before-make), 1,000 packets/s each way:", file=out)
    print(f"{'system':<16}{'delay':>7}{'down ms':>10}{'lost':>6}{'up ms':>9}{'lost':>6}"
          f"{'vs sswan (down)':>17}", file=out)
    refs = {r["delay_ms"]: r["downlink"]["interruption_ms"] for r in results
            if r["system"] == "strongswan"}
    for r in results:
        d, u = r["downlink"], r["uplink"]
        ref = refs.get(r["delay_ms"])
        ratio = (d["interruption_ms"] / ref) if ref and ref > 0 and d["interruption_ms"] is not None \
            else None
        fmt = lambda v: "-" if v is None else f"{max(0.0, v):.1f}"  # noqa: E731
        print(f"{r['system']:<16}{r['delay_ms']:>5g}ms{fmt(d['interruption_ms']):>10}"
              f"{d['lost']:>6}{fmt(u['interruption_ms']):>9}{u['lost']:>6}"
              f"{'' if ratio is None else f'{ratio:.2f}x':>17}", file=out)


def plot(metrics: dict[str, Any], handovers: list[dict], out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, keys) in zip(axes, (  # noqa: B905 (three axes, three panels)
            ("delivered packets/s, maximum rate", ("blast_pps_64", "blast_pps_1372")),
            ("highest rate with <= 1 % loss", ("loss_free_64", "loss_free_1372")),
            ("IPsec CPU us per packet (64 B)", ("cpu_5000", "cpu_20000")))):
        width = 0.8 / len(SYSTEMS)
        for i, system in enumerate(SYSTEMS):
            vals = [median(metrics[system][k]) for k in keys]
            ax.bar([j + i * width for j in range(len(keys))],
                   [0 if v != v else v for v in vals], width, label=system)
        ax.set_xticks([j + width * (len(SYSTEMS) - 1) / 2 for j in range(len(keys))])
        ax.set_xticklabels([k.split("_")[-1] + (" B" if "cpu" not in k else " pps") for k in keys])
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "vs_strongswan_throughput.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    if handovers:
        delays = sorted({r["delay_ms"] for r in handovers})
        systems = list(dict.fromkeys(r["system"] for r in handovers))
        fig, axes = plt.subplots(len(delays), len(systems), figsize=(4 * len(systems),
                                                                     3 * len(delays)),
                                 squeeze=False, sharex=True)
        for r in handovers:
            ax = axes[delays.index(r["delay_ms"])][systems.index(r["system"])]
            for name, color in (("downlink", "tab:blue"), ("uplink", "tab:orange")):
                pts = r[name]["arrivals"]
                if pts:
                    seq0 = min(s for s, _ in pts)
                    ax.plot([t * 1000 for _, t in pts], [s - seq0 for s, _ in pts], ".",
                            ms=2, color=color, label=name)
            ax.axvline(0, color="grey", lw=0.8)
            ax.set_title(f"{r['system']}, {r['delay_ms']:g} ms one way", fontsize=9)
            ax.set_xlabel("ms after the move")
            ax.set_ylabel("packet number")
        axes[0][0].legend(fontsize=8, markerscale=4)
        fig.tight_layout()
        path = os.path.join(out_dir, "vs_strongswan_handover.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--seconds", type=float, default=1.0, help="per load")
    ap.add_argument("--out", default=os.path.join(HERE, "figures"), help="PNG directory")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    ap.add_argument("--no-handover", action="store_true")
    ap.add_argument("--from-json", default=None, metavar="FILE",
                    help="print the table and draw the figures of an earlier run's --json")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        reps = 1 + max(r["rep"] for r in saved["rows"])
        metrics = summarise(saved["rows"], reps)
        print_table(metrics, reps)
        if saved["handover"]:
            print_handover(saved["handover"])
        for path in plot(metrics, saved["handover"], args.out):
            print(f"figure: {path}")
        return 0
    problem = requirements_problem()
    if problem is None and not os.path.exists(LIBIPSEC):
        problem = "strongSwan's kernel-libipsec plugin is missing (libcharon-extra-plugins)"
    if problem is None and shutil.which("cc") is None:
        problem = "a C compiler (cc) is needed for the load generator"
    if problem:
        print(f"bench_vs_strongswan: {problem}", file=sys.stderr)
        return 1
    t_start = time.monotonic()

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):   # unwind: the labs come down
        signal.signal(sig, interrupted)
    tmp = tempfile.mkdtemp(prefix="bench-vs-")
    pid = os.getpid() % 100000
    labs: dict[str, Any] = {}
    try:
        exe = build_udpload(tmp)
        print("bringing up: mipsec (raw ESP), mipsec (ESP in UDP), strongSwan + plain ...",
              file=sys.stderr, flush=True)
        labs["mipsec-esp"] = mipsec_lab(f"bve{pid}-", udp=False)
        labs["mipsec-udp"] = mipsec_lab(f"bvu{pid}-", udp=True)
        labs["strongswan"] = StrongSwanLab(f"bvs{pid}-")
        labs["strongswan"].up()
        rows = throughput(exe, labs, args.reps, args.seconds)
        handovers = []
        if not args.no_handover:
            print("handovers ...", file=sys.stderr, flush=True)
            handovers.append(handover("mipsec-siu", 0.0, "", lab=labs["mipsec-esp"]))
            handovers.append(handover("strongswan", 0.0, "", lab=labs["strongswan"]))
        for lab in labs.values():
            lab.down()
        labs.clear()
        if not args.no_handover:
            handovers.append(handover("mipsec-mobike", 0.0, f"bvm{pid}-"))
            for system in ("mipsec-siu", "mipsec-mobike", "strongswan"):
                handovers.append(handover(system, 10.0, f"bvd{pid}-"))
    finally:
        for lab in labs.values():
            lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
    metrics = summarise(rows, args.reps)
    print_table(metrics, args.reps)
    if handovers:
        print_handover(handovers)
    plain = [r for r in rows if r["system"] == "plain" and r["rate"] == 0]
    print(f"\nload tool cost (plain path, maximum rate): sender "
          f"{median([r['sender_cpu_us_per_pkt'] for r in plain]):.2f} us CPU/packet, sink "
          f"{median([r['sink_cpu_us_per_pkt'] for r in plain]):.2f} us CPU/packet "
          f"(kernel path of the sender included)")
    for path in plot(metrics, handovers, args.out):
        print(f"figure: {path}")
    print(f"total time {time.monotonic() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "metrics": metrics,
                       "handover": [{k: v for k, v in h.items()} for h in handovers]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
