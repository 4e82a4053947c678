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

Several MNs (``mobiles > 1``): MN ``k`` lives in ``{p}mn<k>`` with its own home-link port and
home address 10.1.0.(99 + k); in the router each visited network becomes a bridge (named like the
single-MN link, ``va0`` / ``vb0``, so the router keeps its addresses) with one port per MN, and
MN ``k``'s care-of address there is 172.16.x.(9 + k).  With one MN nothing changes.

A GW pool (``gateways > 1``): GW ``k`` lives in ``{p}gw<k>`` (k >= 2) with a port ``in0`` on the
home bridge (10.1.0.(20 + k)) and its ``out0`` on the Internet side: the router's ``out0`` becomes
a bridge (named like the single-GW link, so it keeps 172.16.0.254) with one port per GW, GW k's
outside address 172.16.0.k.  The delaying forwarder sits on one GW's link, so a pool has no
``delay_ms``.  With one GW nothing changes.

HA group (``build_ha_group``, ``mipsec lab up --ha-standbys K``): the HA and K standbys
``{p}ha2`` ... each on the home link with an address of their own 10.1.0.(3 + i) and none of
them with the HA service address 10.1.0.2 (the active one holds it, mipsec.io.hagroup); a
private store network 10.2.0.0/24 (bridge ``br1`` in the switch namespace) joins each HA's
``st0`` (10.2.0.(10 + i)) to ``{p}db`` (10.2.0.1), where the lab's 3-member etcd cluster runs.
Cutting an HA off its store is ``ip link set st0 down`` in its namespace.

NAT (``nat``): a third visited network ``n``, private 192.168.0.0/24 behind the router's bridge
``vn0`` (192.168.0.1), which the router masquerades (nftables, ``masquerade`` in a ``srcnat``
postrouting chain) to its own outside address 172.16.0.254 on ``out0``: every MN there reaches
the GW from that one public address, with the ports the NAT's conntrack chose (different ports
for different MNs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from mipsec.node.config import MAX_LAB_GATEWAYS, lab_gateway_addresses, lab_home_address

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
# The NAT'd visited network (``build(nat=True)``): private side in the router, masqueraded to
# ROUTER["out0"] on the way out.
NAT_PLACE = "n"
NAT_IFACE = "vn0"
NAT_ROUTER = "192.168.0.1"
NAT_PREFIX = "192.168.0.0/24"
NAT_PUBLIC = ROUTER["out0"]
NFT = "nft"
NFT_TABLE = "mipsec_lab_nat"
# Where each visited network's router is (the MN's default route there).
PLACE_ROUTER = {"a": ROUTER["va0"], "b": ROUTER["vb0"], NAT_PLACE: NAT_ROUTER}
PLACE_IFACE = {**MN_IFACE, NAT_PLACE: NAT_IFACE}
MAX_MOBILES = 100
# every namespace name a lab gives a node (after its prefix): the nodes above, mn<N> for more MNs
LAB_NODE = re.compile("(?:" + "|".join((*NODES, "db")) + r")[0-9]*")
# the HA group's store network and etcd members (``build_ha_group``)
STORE_DB = "10.2.0.1"
ETCD_CLIENT_PORTS = (2379, 2389, 2399)
ETCD_PEER_PORTS = (2380, 2390, 2400)
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


def mn_node(k: int, mobiles: int) -> str:
    """The node (namespace suffix, daemon and config name) of MN ``k`` (1-based): ``mn`` in a
    one-MN lab, ``mn1`` ... ``mnN`` with several (the names ``make_key_set`` gives them)."""
    if not 1 <= k <= mobiles:
        raise LabError(f"no mobile node {k}: the lab has {mobiles} (1..{mobiles})")
    return "mn" if mobiles == 1 else f"mn{k}"


def gw_node(k: int) -> str:
    """The node of GW ``k`` (1-based): ``gw``, then ``gw2`` ... (the names ``make_key_set``
    gives them)."""
    return "gw" if k == 1 else f"gw{k}"


def nodes(mobiles: int = 1, gateways: int = 1) -> tuple[str, ...]:
    return (*NODES[:-1], *(gw_node(k) for k in range(2, gateways + 1)),
            *(mn_node(k, mobiles) for k in range(1, mobiles + 1)))


def places(nat: bool = False) -> tuple[str, ...]:
    """The visited networks an MN can attach to."""
    return (*MN_IFACE, NAT_PLACE) if nat else tuple(MN_IFACE)


def mn_care_of(where: str, k: int = 1) -> str:
    """MN ``k``'s care-of address on visited network ``where`` (MN 1: ``MN_COA``)."""
    base = {**MN_COA, NAT_PLACE: "192.168.0.10"}[where]
    head, last = base.rsplit(".", 1)
    return f"{head}.{int(last) + k - 1}"


def mn_home_address(k: int = 1) -> str:
    """MN ``k``'s home address (the one ``make_lab_configs`` gives it)."""
    return lab_home_address(k - 1)


@dataclass(frozen=True)
class Names:
    prefix: str
    mobiles: int = 1
    gateways: int = 1

    def ns(self, node: str) -> str:
        return f"{self.prefix}{node}"

    def mn(self, k: int = 1) -> str:
        """MN ``k``'s namespace."""
        return self.ns(mn_node(k, self.mobiles))

    @property
    def all(self) -> list[str]:
        return [self.ns(n) for n in nodes(self.mobiles, self.gateways)]


def is_lab_namespace(prefix: str, name: str) -> bool:
    """Exactly ``prefix`` + a lab node name (``mn2`` ... for more mobiles): ``X-`` is not a
    prefix of lab ``X-b-``'s namespaces (``X-b-cn``), so ``down --prefix X-`` leaves them."""
    return name.startswith(prefix) and LAB_NODE.fullmatch(name[len(prefix):]) is not None


def existing_namespaces(prefix: str) -> list[str]:
    proc = subprocess.run([IP, "netns", "list"], capture_output=True, text=True)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return [n for n in names if is_lab_namespace(prefix, n)]


def _veth(a_ns: str, a: str, b_ns: str, b: str) -> None:
    run("link", "add", a, "mtu", str(LINK_MTU), "type", "veth", "peer", "name", b,
        "mtu", str(LINK_MTU), "netns", b_ns, ns=a_ns)
    run("link", "set", a, "up", ns=a_ns)
    run("link", "set", b, "up", ns=b_ns)


def build(names: Names, delay_ms: float = 0.0, nat: bool = False) -> None:
    """Create the namespaces and links (no daemons) for ``names.mobiles`` MNs, with the NAT'd
    visited network when ``nat``.  Raises LabError if any step fails."""
    if not 1 <= names.mobiles <= MAX_MOBILES:
        raise LabError(f"mobiles: 1..{MAX_MOBILES}, got {names.mobiles}")
    if not 1 <= names.gateways <= MAX_LAB_GATEWAYS:
        raise LabError(f"gateways: 1..{MAX_LAB_GATEWAYS}, got {names.gateways}")
    if names.gateways > 1 and delay_ms > 0:
        raise LabError("a GW pool (gateways > 1) has no Internet delay: the delaying forwarder "
                       "sits on one GW's link")
    if nat and shutil.which(NFT) is None:
        raise LabError("the NAT'd visited network needs nftables' `nft` (Debian package nftables)")
    left = existing_namespaces(names.prefix)
    if left:
        raise LabError(f"namespaces with prefix {names.prefix!r} exist already ({', '.join(left)}):"
                       f" run `mipsec lab down --prefix {names.prefix}` first")
    for node in nodes(names.mobiles, names.gateways):
        run("netns", "add", names.ns(node))
        run("link", "set", "lo", "up", ns=names.ns(node))
    sw, cn, ha, gw, rt = (names.ns(n) for n in NODES[:-1])
    mns = [names.mn(k) for k in range(1, names.mobiles + 1)]
    pool = [names.ns(gw_node(k)) for k in range(2, names.gateways + 1)]

    # Home link: a bridge in the switch namespace, one port per host.
    run("link", "add", "br0", "type", "bridge", ns=sw)
    run("link", "set", "br0", "up", ns=sw)
    ports = [("p-cn", cn, "eth0"), ("p-ha", ha, "eth0"), ("p-gw", gw, "in0")]
    ports += [(f"p-{gw_node(k)}", g, "in0") for k, g in enumerate(pool, 2)]
    ports += [(f"p-{mn_node(k, names.mobiles)}", mn, MN_HOME_INTERFACE)
              for k, mn in enumerate(mns, 1)]
    for port, host, ifname in ports:
        _veth(sw, port, host, ifname)
        run("link", "set", port, "master", "br0", ns=sw)

    run("addr", "add", f"{CN}/24", "dev", "eth0", ns=cn)
    run("route", "add", "default", "via", GW_INSIDE, ns=cn)
    run("addr", "add", f"{HA}/24", "dev", "eth0", ns=ha)
    run("route", "add", "default", "via", GW_INSIDE, ns=ha)
    run("addr", "add", f"{GW_INSIDE}/24", "dev", "in0", ns=gw)
    for k, g in enumerate(pool, 2):
        run("addr", "add", f"{lab_gateway_addresses(k)[0]}/24", "dev", "in0", ns=g)

    # GW outside -> router (through the delaying forwarder when asked).
    if delay_ms > 0:
        _veth(gw, "out0", rt, "dl0")
        _veth(rt, "dl1", rt, "out0")
        for dev in ("dl0", "dl1"):
            sysctl(rt, f"net.ipv6.conf.{dev}.disable_ipv6", 1)
    elif pool:
        # the Internet side of a GW pool: a bridge in the router, one port per GW
        run("link", "add", "out0", "mtu", str(LINK_MTU), "type", "bridge", ns=rt)
        run("link", "set", "out0", "up", ns=rt)
        for k, g in enumerate([gw, *pool], 1):
            _veth(g, "out0", rt, f"out0p{k}")
            run("link", "set", f"out0p{k}", "master", "out0", ns=rt)
    else:
        _veth(gw, "out0", rt, "out0")
    run("addr", "add", f"{GW_OUTSIDE}/24", "dev", "out0", ns=gw)
    run("route", "add", "default", "via", ROUTER["out0"], ns=gw)
    for k, g in enumerate(pool, 2):
        run("addr", "add", f"{lab_gateway_addresses(k)[1]}/24", "dev", "out0", ns=g)
        run("route", "add", "default", "via", ROUTER["out0"], ns=g)

    # Router with the outside and the visited networks: one MN hangs on a veth of the router,
    # several on a bridge of the same name.
    for ifname, addr in ROUTER.items():
        if ifname != "out0":
            _visited_link(rt, ifname, mns)
        run("addr", "add", f"{addr}/24", "dev", ifname, ns=rt)
    if nat:
        _visited_link(rt, NAT_IFACE, mns, bridge=True)
        run("addr", "add", f"{NAT_ROUTER}/24", "dev", NAT_IFACE, ns=rt)
        masquerade(rt)

    for node in (gw, *pool, rt, ha):
        sysctl(node, "net.ipv4.ip_forward", 1)
    for node in (gw, *pool, ha, rt, *mns):
        for scope in ("all", "default"):
            sysctl(node, f"net.ipv4.conf.{scope}.rp_filter", 0)
    # The MNs start detached: no address anywhere until `handover a|b` or `home`.
    for mn in mns:
        run("link", "set", MN_HOME_INTERFACE, "down", ns=mn)


def ha_node(i: int) -> str:
    """The namespace suffix of HA ``i`` of a group (0: the lab's ``ha``)."""
    return "ha" if i == 0 else f"ha{i + 1}"


def ha_link_address(i: int) -> str:
    return f"10.1.0.{3 + i}"


def ha_store_address(i: int) -> str:
    return f"10.2.0.{10 + i}"


def etcd_endpoints() -> tuple[str, ...]:
    return tuple(f"http://{STORE_DB}:{p}" for p in ETCD_CLIENT_PORTS)


def build_ha_group(names: Names, standbys: int) -> None:
    """Turn the lab's single HA into a group of ``1 + standbys`` HAs with a store network and
    the ``db`` namespace (see the module doc); after ``build``."""
    sw = names.ns("sw")
    run("link", "add", "br1", "type", "bridge", ns=sw)
    run("link", "set", "br1", "up", ns=sw)
    db = names.ns("db")
    run("netns", "add", db)
    run("link", "set", "lo", "up", ns=db)
    _veth(sw, "s-db", db, "st0")
    run("link", "set", "s-db", "master", "br1", ns=sw)
    run("addr", "add", f"{STORE_DB}/24", "dev", "st0", ns=db)
    for i in range(standbys + 1):
        node = names.ns(ha_node(i))
        if i > 0:
            run("netns", "add", node)
            run("link", "set", "lo", "up", ns=node)
            _veth(sw, f"p-{ha_node(i)}", node, "eth0")
            run("link", "set", f"p-{ha_node(i)}", "master", "br0", ns=sw)
            sysctl(node, "net.ipv4.ip_forward", 1)
            for scope in ("all", "default"):
                sysctl(node, f"net.ipv4.conf.{scope}.rp_filter", 0)
        else:
            run("addr", "del", f"{HA}/24", "dev", "eth0", ns=node)   # the active will hold it
        run("addr", "add", f"{ha_link_address(i)}/24", "dev", "eth0", ns=node)
        run("route", "replace", "default", "via", GW_INSIDE, ns=node)
        _veth(sw, f"s-{ha_node(i)}", node, "st0")
        run("link", "set", f"s-{ha_node(i)}", "master", "br1", ns=sw)
        run("addr", "add", f"{ha_store_address(i)}/24", "dev", "st0", ns=node)


def _visited_link(rt: str, ifname: str, mns: list[str], bridge: bool = False) -> None:
    """Visited network ``ifname`` between the router and the MNs (each MN's end has that name)."""
    if len(mns) == 1 and not bridge:
        _veth(rt, ifname, mns[0], ifname)
        return
    run("link", "add", ifname, "mtu", str(LINK_MTU), "type", "bridge", ns=rt)
    run("link", "set", ifname, "up", ns=rt)
    for k, mn in enumerate(mns, 1):
        port = f"{ifname}p{k}"
        _veth(rt, port, mn, ifname)
        run("link", "set", port, "master", ifname, ns=rt)


def masquerade(rt: str) -> None:
    """Source NAT in the router: the private visited network leaves ``out0`` as NAT_PUBLIC, and,
    as behind a real NAT, nothing from outside reaches it but replies to what it sent (the
    router would otherwise route the private prefix it is attached to)."""
    rules = (f"table ip {NFT_TABLE} {{\n"
             f"  chain postrouting {{\n"
             f"    type nat hook postrouting priority srcnat; policy accept;\n"
             f"    ip saddr {NAT_PREFIX} oifname \"out0\" masquerade\n"
             f"  }}\n"
             f"  chain forward {{\n"
             f"    type filter hook forward priority filter; policy accept;\n"
             f"    oifname \"{NAT_IFACE}\" ct state established,related accept\n"
             f"    oifname \"{NAT_IFACE}\" drop\n"
             f"  }}\n"
             f"}}\n")
    proc = subprocess.run([IP, "netns", "exec", rt, NFT, "-f", "-"], input=rules,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"nft masquerade in {rt}: {proc.stderr.strip() or proc.returncode}")


def move_mn(names: Names, where: str, make_before_break: bool = False, k: int = 1,
            nat: bool = False, dhcp_order: bool = False) -> None:
    """Attach MN ``k`` to visited network ``a``/``b`` (``n``: behind the NAT) or to ``home``.

    Visited: remove the other addresses (break-before-make; with ``make_before_break`` they stay
    until ``drop_old_coas``), point the default route at the visited router (``onlink``, so it
    exists before the address appears: the MN's netlink watcher reacts to the address, and its
    Registration Request must find a route at once), then add the care-of address.  Home: remove
    the care-of addresses and bring up the home link with the home address.  ``dhcp_order``:
    the care-of address first, then the default route, as DHCP clients do.
    """
    visited = places(nat)
    if where not in visited and where != "home":
        raise LabError(f"unknown place {where!r}: {', '.join(visited)} or home")
    # One `ip -batch` process for the whole move: the move itself takes about a millisecond,
    # not one process start per step (which would lengthen the interruption we measure).
    lines = []
    for key in visited:
        if key != where and not (make_before_break and where in visited):
            lines.append(f"addr flush dev {PLACE_IFACE[key]}")
    if where in visited:
        ifname = PLACE_IFACE[where]
        lines += [f"addr flush dev {MN_HOME_INTERFACE}",
                  f"link set {MN_HOME_INTERFACE} down",
                  f"route replace default via {PLACE_ROUTER[where]} dev {ifname} onlink",
                  f"addr replace {mn_care_of(where, k)}/24 dev {ifname}"]
        if dhcp_order:
            lines[-2:] = lines[-1:] + lines[-2:-1]
    else:
        lines += ["route flush exact 0.0.0.0/0",
                  f"link set {MN_HOME_INTERFACE} up",
                  f"addr replace {mn_home_address(k)}/24 dev {MN_HOME_INTERFACE}",
                  f"route replace default via {GW_INSIDE} dev {MN_HOME_INTERFACE}"]
    run_batch(names.mn(k), lines)


def run_batch(ns: str, lines: list[str]) -> None:
    cmd = [IP, "-n", ns, "-batch", "-"]
    proc = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} <<< {lines}: {proc.stderr.strip() or proc.returncode}")


def drop_old_coas(names: Names, where: str, k: int = 1, nat: bool = False) -> None:
    """End of a make-before-break move: remove the care-of addresses other than ``where``'s."""
    for key in places(nat):
        if key != where:
            run("addr", "flush", "dev", PLACE_IFACE[key], ns=names.mn(k))


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
