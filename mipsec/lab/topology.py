"""The lab's network: namespaces, veth links, a home bridge, addresses and routes.

Built with iproute2 (``ip``) on the docs/design.md addressing plan; every namespace name starts
with a prefix so that several labs (tests) coexist and ``down`` finds everything by that prefix::

        {p}cn 10.1.0.10        {p}ha 10.1.0.2         {p}gw in0 10.1.0.1
            eth0 ---------+        eth0 ------+        in0 ----+
                          |                   |                |
                     [ {p}sw: Linux bridge br0, the home link ]
                          |                                    gw out0 172.16.0.1
                      mn home0 (10.1.0.100 when at home)           |
                                                          {p}rt dl0 ~~delay~~ dl1 -- out0
                                                          172.16.0.254 (out0)
                                           va0 172.16.1.254 /      \\ vb0 172.16.2.254
                                                 {p}mn va0          {p}mn vb0
                                               CoA 172.16.1.10      CoA 172.16.2.10

Delay: the kernel here has no netem, so a one-way Internet delay is emulated in the router
namespace by ``mipsec.lab.delay``: the GW's outside link ends on ``dl0``, a second veth pair
``dl1``/``out0`` carries the router's address, and the forwarder copies every frame between
``dl0`` and ``dl1`` after ``delay_ms`` (both directions, so MN -> GW and GW -> MN each take the
delay once).  With ``delay_ms = 0`` the forwarder is not started and the GW's link ends directly on
the router's ``out0``.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

HOME_PREFIX = "10.1.0.0/24"
CN = "10.1.0.10"
HA = "10.1.0.2"
GW_INSIDE = "10.1.0.1"
GW_OUTSIDE = "172.16.0.1"
ROUTER = {"out0": "172.16.0.254", "va0": "172.16.1.254", "vb0": "172.16.2.254"}
MN_COA = {"a": "172.16.1.10", "b": "172.16.2.10"}
MN_IFACE = {"a": "va0", "b": "vb0"}
MN_HOME_ADDRESS = "10.1.0.100"
MN_HOME_INTERFACE = "home0"
NODES = ("sw", "cn", "ha", "gw", "rt", "mn")
# Lab links carry 1600-byte frames and the lab's TUN devices have MTU 1500, so a 1400-byte UDP
# payload crosses the tunnels (inner 1428 + IP-in-IP 20 + ESP ~40 + outer 20) unfragmented.
LINK_MTU = 1600
LAB_TUN_MTU = 1500
IP = "ip"


class LabError(RuntimeError):
    pass


def run(*args: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = [IP, "-n", ns, *args] if ns else [IP, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def sysctl(ns: str, name: str, value: str | int) -> None:
    proc = subprocess.run([IP, "netns", "exec", ns, "sysctl", "-q", "-w", f"{name}={value}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        # Fall back to /proc (works for the per-namespace net.* keys without the sysctl tool).
        path = "/proc/sys/" + name.replace(".", "/")
        proc = subprocess.run([IP, "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise LabError(f"sysctl {name}={value} in {ns}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Names:
    prefix: str

    def ns(self, node: str) -> str:
        return f"{self.prefix}{node}"

    @property
    def all(self) -> list[str]:
        return [self.ns(n) for n in NODES]


def existing_namespaces(prefix: str) -> list[str]:
    proc = subprocess.run([IP, "netns", "list"], capture_output=True, text=True)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def _veth(a_ns: str, a: str, b_ns: str, b: str) -> None:
    run("link", "add", a, "mtu", str(LINK_MTU), "type", "veth", "peer", "name", b,
        "mtu", str(LINK_MTU), "netns", b_ns, ns=a_ns)
    run("link", "set", a, "up", ns=a_ns)
    run("link", "set", b, "up", ns=b_ns)


def build(names: Names, delay_ms: float = 0.0) -> None:
    """Create the namespaces and links (no daemons).  Raises LabError if any step fails."""
    left = existing_namespaces(names.prefix)
    if left:
        raise LabError(f"namespaces with prefix {names.prefix!r} exist already ({', '.join(left)}):"
                       f" run `mipsec lab down --prefix {names.prefix}` first")
    for node in NODES:
        run("netns", "add", names.ns(node))
        run("link", "set", "lo", "up", ns=names.ns(node))
    sw, cn, ha, gw, rt, mn = (names.ns(n) for n in NODES)

    # Home link: a bridge in the switch namespace, one port per host.
    run("link", "add", "br0", "type", "bridge", ns=sw)
    run("link", "set", "br0", "up", ns=sw)
    for port, host, ifname in (("p-cn", cn, "eth0"), ("p-ha", ha, "eth0"), ("p-gw", gw, "in0"),
                               ("p-mn", mn, MN_HOME_INTERFACE)):
        _veth(sw, port, host, ifname)
        run("link", "set", port, "master", "br0", ns=sw)

    run("addr", "add", f"{CN}/24", "dev", "eth0", ns=cn)
    run("route", "add", "default", "via", GW_INSIDE, ns=cn)
    run("addr", "add", f"{HA}/24", "dev", "eth0", ns=ha)
    run("route", "add", "default", "via", GW_INSIDE, ns=ha)
    run("addr", "add", f"{GW_INSIDE}/24", "dev", "in0", ns=gw)

    # GW outside -> router (through the delaying forwarder when asked).
    if delay_ms > 0:
        _veth(gw, "out0", rt, "dl0")
        _veth(rt, "dl1", rt, "out0")
        for dev in ("dl0", "dl1"):
            sysctl(rt, f"net.ipv6.conf.{dev}.disable_ipv6", 1)
    else:
        _veth(gw, "out0", rt, "out0")
    run("addr", "add", f"{GW_OUTSIDE}/24", "dev", "out0", ns=gw)
    run("route", "add", "default", "via", ROUTER["out0"], ns=gw)

    # Router with the outside and the two visited networks.
    for ifname, addr in ROUTER.items():
        if ifname != "out0":
            _veth(rt, ifname, mn, MN_IFACE["a" if ifname == "va0" else "b"])
        run("addr", "add", f"{addr}/24", "dev", ifname, ns=rt)

    for node in (gw, rt, ha):
        sysctl(node, "net.ipv4.ip_forward", 1)
    for node in (gw, ha, mn, rt):
        for scope in ("all", "default"):
            sysctl(node, f"net.ipv4.conf.{scope}.rp_filter", 0)
    # The MN starts detached: no address anywhere until `handover a|b` or `home`.
    run("link", "set", MN_HOME_INTERFACE, "down", ns=mn)


def move_mn(names: Names, where: str, make_before_break: bool = False) -> None:
    """Attach the MN to visited network ``a``/``b`` or to ``home``.

    Visited: remove the other addresses (break-before-make; with ``make_before_break`` they stay
    until ``drop_old_coas``), point the default route at the visited router (``onlink``, so it
    exists before the address appears: the MN's netlink watcher reacts to the address, and its
    Registration Request must find a route at once), then add the care-of address.  Home: remove
    the care-of addresses and bring up the home link with the home address.
    """
    if where not in MN_IFACE and where != "home":
        raise LabError(f"unknown place {where!r}: a, b or home")
    # One `ip -batch` process for the whole move: the move itself takes about a millisecond,
    # not one process start per step (which would lengthen the interruption we measure).
    lines = []
    for key, ifname in MN_IFACE.items():
        if key != where and not (make_before_break and where in MN_IFACE):
            lines.append(f"addr flush dev {ifname}")
    if where in MN_IFACE:
        ifname = MN_IFACE[where]
        lines += [f"addr flush dev {MN_HOME_INTERFACE}",
                  f"link set {MN_HOME_INTERFACE} down",
                  f"route replace default via {ROUTER[ifname]} dev {ifname} onlink",
                  f"addr replace {MN_COA[where]}/24 dev {ifname}"]
    else:
        lines += ["route flush exact 0.0.0.0/0",
                  f"link set {MN_HOME_INTERFACE} up",
                  f"addr replace {MN_HOME_ADDRESS}/24 dev {MN_HOME_INTERFACE}",
                  f"route replace default via {GW_INSIDE} dev {MN_HOME_INTERFACE}"]
    run_batch(names.ns("mn"), lines)


def run_batch(ns: str, lines: list[str]) -> None:
    cmd = [IP, "-n", ns, "-batch", "-"]
    proc = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} <<< {lines}: {proc.stderr.strip() or proc.returncode}")


def drop_old_coas(names: Names, where: str) -> None:
    """End of a make-before-break move: remove the care-of addresses other than ``where``'s."""
    for key, ifname in MN_IFACE.items():
        if key != where:
            run("addr", "flush", "dev", ifname, ns=names.ns("mn"))


def namespace_pids(ns: str) -> list[int]:
    """Live processes in a namespace (zombies, already dead, are reaped if ours and skipped)."""
    proc = subprocess.run([IP, "netns", "pids", ns], capture_output=True, text=True)
    out = []
    for pid in (int(p) for p in proc.stdout.split() if p.isdigit()):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                continue
        except ChildProcessError:
            pass
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        out.append(pid)
    return out


def destroy(prefix: str) -> list[str]:
    """Kill every process left in the prefix's namespaces and delete them; returns their names."""
    import signal
    import time

    removed = []
    for ns in existing_namespaces(prefix):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for p in namespace_pids(ns) if p != os.getpid()]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 2.0
            while pids and time.monotonic() < deadline and namespace_pids(ns):
                time.sleep(0.05)
        run("netns", "del", ns, check=False)
        removed.append(ns)
    return removed
