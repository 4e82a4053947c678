"""rtnetlink: the MN's movement detector, and the address / route / rule / proxy-ARP changes the
daemons make (through pyroute2).

**Movement detector** (MN).  A netlink socket subscribed to link, IPv4 address and IPv4 route
notifications (``RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE``, rtnetlink(7)); messages
are decoded with pyroute2's ``ifinfmsg`` / ``ifaddrmsg`` / ``rtmsg``.  (pyroute2's own
``IPRoute.get()`` buffers messages in an asyncio core, so its file descriptor is not a reliable
readiness signal for our selector loop: we own the socket and use pyroute2 for the decoding.)
``MovementClassifier`` keeps what the kernel said (links up, addresses, main-table routes) and,
after each change, decides (pure: tested without a kernel):

* a visited interface is *usable* when its link is up, it has an IPv4 address outside the home
  prefix, and the GW can be reached through it: a default route or a route covering the GW's
  address leaves through it (or the GW is on-link).  A care-of address is reported
  (``CareOfAddressChanged``) only then, so the Registration Request goes out when it can reach
  the GW: a DHCP client that adds the address before the default route costs nothing (the event
  comes with the route), whatever the order of address, route and link events;
* the reported care-of address is kept while it stays usable: a route replaced, DHCP renewals
  (RTM_NEWADDR for a known address) report nothing (the registration still holds);
* a *new* address on another interface that is usable (at once or when its route comes) is a
  move; ``make_before_break`` when the old care-of address is still there on an up link (two
  addresses at once: the new one wins, the old keeps receiving until the registration is done);
* when the reported address stops being usable and another one is, the MN moves there (break
  before make); when none is and the address itself went (removed, or its link down),
  ``CareOfAddressChanged(None)``: the MN sends nothing more from it, its registration stands, and
  the same or a new address is reported when usable (one registration); a visited network that
  only lost its route to the GW is waited on (logged once);
* a home-prefix address on the configured *home* interface with its link up ->
  ``ReturnedHome(ifname)`` (RFC 5944 §3.6.1.1: the MN may be home; the role leaves the tunnel only
  once the HA's authenticated reply arrives); home wins over visited interfaces while it holds;
* an address inside the home prefix on any other interface (a visited network's DHCP handing
  one out) is logged as a warning and ignored: it is neither proof of being home nor usable as a
  care-of address.

IPv4 does not notify routes it flushes when a link goes down or an address goes (only their
addition): the watcher forgets a downed link's routes itself and re-reads the route table after
an address removal or a link change.  Addresses on other interfaces (the MN's own TUN device
carries the home address) are ignored.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable

from mipsec.node.actions import CareOfAddressChanged, ReturnedHome

log = logging.getLogger("mipsec.io.netlink")

RTMGRP_LINK = 0x01             # rtnetlink(7) multicast groups
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
NLM_F_REPLACE = 0x100          # netlink(7): a new route replacing the one with the same key
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
IFF_UP = 0x1                   # netdevice(7)
IFF_RUNNING = 0x40
NTF_PROXY = 0x08               # neighbour flag: proxy ARP entry (ip neigh add proxy)
_NLMSGHDR = struct.Struct("=IHHII")

RouteKey = tuple[str, int, int, int]      # (destination, prefix length, tos, priority)


class MovementClassifier:
    """What the kernel says about links, addresses and routes -> MN events (see module doc)."""

    def __init__(self, visited_interfaces: Iterable[str], home_prefix: str,
                 home_interfaces: Iterable[str] = (), gateway: str | None = None):
        self.visited = list(visited_interfaces)
        self.home_interfaces = set(home_interfaces)
        self.home_prefix = ipaddress.IPv4Network(home_prefix, strict=False)
        self.gateway = ipaddress.IPv4Address(gateway) if gateway else None
        self._up: dict[str, bool] = {}                   # interface -> link up (unknown: up)
        self._addrs: dict[str, dict[str, int]] = {}      # interface -> address -> prefix length
        self._routes: dict[RouteKey, set[str]] = {}      # main table: key -> interfaces
        self._fresh: list[tuple[str, str]] = []          # addresses added, not yet reported
        self.current: tuple[str, str] | None = None      # (interface, care-of address) reported
        self._home_reported = False
        self._waiting_logged: set[tuple[str, str]] = set()

    # --- what the kernel said --------------------------------------------------------------
    def watched(self, ifname: str | None) -> bool:
        return bool(ifname) and (ifname in self.visited or ifname in self.home_interfaces)

    def link(self, ifname: str | None, up: bool) -> list:
        if ifname is None or not self.watched(ifname):
            return []
        was = self._up.get(ifname, True)
        self._up[ifname] = up
        if was and not up:
            self.forget_routes(ifname)    # the kernel flushes them without telling
        return self.decide()

    def address(self, kind: int, ifname: str | None, address: str | None,
                prefixlen: int = 32) -> list:
        if ifname is None or not self.watched(ifname) or not address:
            return []
        addrs = self._addrs.setdefault(ifname, {})
        if kind == RTM_NEWADDR:
            if ipaddress.IPv4Address(address) in self.home_prefix \
                    and ifname not in self.home_interfaces:
                # any DHCP server can hand out a home-prefix address: that is no proof of being
                # home, and it cannot serve as a care-of address either (docs/security.md)
                log.warning("address %s on %s is inside the home prefix %s but %s is not the "
                            "home interface: ignored (neither home nor a care-of address)",
                            address, ifname, self.home_prefix, ifname)
                return []
            if address not in addrs:
                self._fresh.append((ifname, address))
            addrs[address] = prefixlen
        elif kind == RTM_DELADDR:
            if addrs.pop(address, None) is not None:
                log.info("address %s removed from %s", address, ifname)
            self._fresh = [f for f in self._fresh if f != (ifname, address)]
        return self.decide()

    def route(self, kind: int, ifname: str | None, dst: str | None, dst_len: int, *,
              tos: int = 0, priority: int = 0, replace: bool = False) -> list:
        key = (dst or "0.0.0.0", dst_len, tos, priority)
        if kind == RTM_NEWROUTE:
            if replace:
                self._routes[key] = set()
            if ifname:
                self._routes.setdefault(key, set()).add(ifname)
        elif kind == RTM_DELROUTE:
            oifs = self._routes.get(key)
            if oifs is not None:
                if ifname:
                    oifs.discard(ifname)
                else:
                    oifs.clear()
                if not oifs:
                    del self._routes[key]
        return self.decide()

    def forget_routes(self, ifname: str) -> None:
        for key in list(self._routes):
            self._routes[key].discard(ifname)
            if not self._routes[key]:
                del self._routes[key]

    def set_routes(self, routes: Iterable[tuple[RouteKey, str]]) -> None:
        """The whole main table (after a dump)."""
        self._routes = {}
        for key, ifname in routes:
            self._routes.setdefault(key, set()).add(ifname)

    # --- the decision ------------------------------------------------------------------------
    def reaches_gateway(self, ifname: str) -> bool:
        if self.gateway is None:
            return True
        gw = self.gateway
        for (dst, dst_len, _tos, _prio), oifs in self._routes.items():
            if ifname in oifs and gw in ipaddress.IPv4Network(f"{dst}/{dst_len}", strict=False):
                return True
        return any(gw in ipaddress.IPv4Network(f"{a}/{n}", strict=False)
                   for a, n in self._addrs.get(ifname, {}).items())

    def usable(self, ifname: str) -> list[str]:
        """The care-of addresses of a visited interface that can reach the GW now."""
        if ifname not in self.visited or not self._up.get(ifname, True):
            return []
        addrs = [a for a in self._addrs.get(ifname, {})
                 if ipaddress.IPv4Address(a) not in self.home_prefix]
        if addrs and not self.reaches_gateway(ifname):
            for a in addrs:
                if (ifname, a) not in self._waiting_logged:
                    self._waiting_logged.add((ifname, a))
                    log.info("address %s on %s: no route to the GW %s through %s yet; waiting",
                             a, ifname, self.gateway, ifname)
            return []
        return addrs

    def at_home(self) -> str | None:
        for ifname in self.home_interfaces:
            if self._up.get(ifname, True) and any(
                    ipaddress.IPv4Address(a) in self.home_prefix
                    for a in self._addrs.get(ifname, {})):
                return ifname
        return None

    def decide(self) -> list:
        home = self.at_home()
        if home is not None:
            self._fresh.clear()
            if self._home_reported:
                return []
            self._home_reported = True
            self.current = None
            return [ReturnedHome(interface=home)]
        self._home_reported = False
        cur = self.current
        cur_ok = cur is not None and cur[1] in self.usable(cur[0])
        # the old address still receives (make-before-break) while it is there on an up link,
        # even without a route of its own to the GW
        cur_there = cur is not None and self._up.get(cur[0], True) \
            and cur[1] in self._addrs.get(cur[0], {})
        # a new address on another interface that can reach the GW: a move (the newest wins)
        for ifname, addr in reversed(self._fresh):
            if (cur is None or ifname != cur[0]) and addr in self.usable(ifname):
                return self._report(ifname, addr, make_before_break=cur_there)
        if cur is not None and cur_ok:
            self._fresh = [f for f in self._fresh if f[0] != cur[0]]
            return []
        # the current one is gone: another address of the same interface, else the newest
        # usable interface, else wait (the registration holds until something is usable)
        if cur is not None and self.usable(cur[0]):
            return self._report(cur[0], self.usable(cur[0])[-1], make_before_break=False)
        for ifname in reversed(self.visited):
            found = self.usable(ifname)
            if found:
                return self._report(ifname, found[-1], make_before_break=cur_there)
        if cur is not None and not cur_there:
            # the care-of address itself went (removed, or its link down): the MN must not
            # send from it any more; the same address coming back is reported again
            self.current = None
            return [CareOfAddressChanged(care_of_address=None, interface=cur[0])]
        return []

    def _report(self, ifname: str, addr: str, make_before_break: bool) -> list:
        self._fresh = [f for f in self._fresh if f[0] != ifname]
        if self.current == (ifname, addr):
            return []                         # the same care-of address, back: nothing moved
        self.current = (ifname, addr)
        return [CareOfAddressChanged(care_of_address=addr, interface=ifname,
                                     make_before_break=make_before_break)]


class AddressWatcher(MovementClassifier):
    """The classifier on a netlink socket (see module doc)."""

    def __init__(self, visited_interfaces: Iterable[str], home_prefix: str,
                 home_interfaces: Iterable[str] = (), gateway: str | None = None):
        super().__init__(visited_interfaces, home_prefix, home_interfaces, gateway)
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   socket.NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))
        self.name = "netlink"

    def fileno(self) -> int:
        return self._sock.fileno()

    def classify(self, kind: int, ifname: str | None, address: str | None):
        """The event for one address notification, or None (tests and the handover command)."""
        events = self.address(kind, ifname, address)
        return events[-1] if events else None

    def receive(self) -> list:
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
        from pyroute2.netlink.rtnl.rtmsg import rtmsg

        events: list = []
        reread = False
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped notifications (socket buffer overrun): read it all again.
                log.warning("netlink overrun: re-reading links, addresses and routes")
                events += self.initial_events()
                continue
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    break
                chunk = data[off:off + length]
                off += (length + 3) & ~3
                if kind in (RTM_NEWADDR, RTM_DELADDR):
                    msg = ifaddrmsg(chunk)
                    msg.decode()
                    if msg["family"] != socket.AF_INET:
                        continue
                    address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                    ifname = msg.get_attr("IFA_LABEL") or _ifname(msg["index"])
                    if kind == RTM_DELADDR and self.watched(ifname):
                        reread = True
                    events += self.address(kind, ifname, address, msg["prefixlen"])
                elif kind in (RTM_NEWLINK, RTM_DELLINK):
                    msg = ifinfmsg(chunk)
                    msg.decode()
                    ifname = msg.get_attr("IFLA_IFNAME") or _ifname(msg["index"])
                    up = kind == RTM_NEWLINK and _link_up(msg["flags"])
                    if ifname is not None and self.watched(ifname) \
                            and up != self._up.get(ifname, True):
                        reread = True
                    events += self.link(ifname, up)
                elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
                    msg = rtmsg(chunk)
                    msg.decode()
                    for key, ifname in _route_entries(msg):
                        events += self.route(kind, ifname, key[0], key[1], tos=key[2],
                                             priority=key[3], replace=bool(flags & NLM_F_REPLACE))
        if reread:
            try:
                self.set_routes(current_routes())
            except OSError as exc:
                log.warning("re-reading the routes failed: %s", exc)
            events += self.decide()
        return events

    def initial_events(self) -> list:
        """Read links, addresses and routes as they are now; the event(s) they call for."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for msg in ipr.get_links():
                name = msg.get_attr("IFLA_IFNAME")
                if self.watched(name):
                    self._up[name] = _link_up(msg["flags"])
            self._addrs = {}
            self._fresh = []
            routes = [entry for msg in ipr.get_routes(family=socket.AF_INET)
                      for entry in _route_entries(msg)]
            self.set_routes(routes)
            addrs = [(msg.get_attr("IFA_LABEL") or _ifname(msg["index"]),
                      msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"), msg["prefixlen"])
                     for msg in ipr.get_addr(family=socket.AF_INET)]
        events: list = []
        for ifname, address, prefixlen in addrs:
            events += self.address(RTM_NEWADDR, ifname, address, prefixlen)
        return events[-1:]

    def close(self) -> None:
        self._sock.close()


def _link_up(flags: int) -> bool:
    return bool(flags & IFF_UP) and bool(flags & IFF_RUNNING)


def _route_entries(msg) -> list[tuple[RouteKey, str]]:
    """((dst, len, tos, priority), interface) for each next hop of a main-table unicast route."""
    table = msg.get_attr("RTA_TABLE") or msg["table"]
    if table != RT_TABLE_MAIN or msg["type"] != RTN_UNICAST:
        return []
    key = (msg.get_attr("RTA_DST") or "0.0.0.0", msg["dst_len"], msg["tos"],
           msg.get_attr("RTA_PRIORITY") or 0)
    oifs = [msg.get_attr("RTA_OIF")]
    multipath = msg.get_attr("RTA_MULTIPATH")
    if multipath:
        oifs += [hop["oif"] for hop in multipath]
    return [(key, name) for name in (_ifname(o) for o in oifs if o) if name]


def current_routes() -> list[tuple[RouteKey, str]]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [entry for msg in ipr.get_routes(family=socket.AF_INET)
                for entry in _route_entries(msg)]


def _ifname(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


def current_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) pairs of this network namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        out: list[tuple[str, str]] = []
        for msg in ipr.get_addr(family=socket.AF_INET):
            ifname = msg.get_attr("IFA_LABEL") or _ifname(msg["index"])
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if ifname and address:       # an interface gone meanwhile has no name any more
                out.append((ifname, address))
        return out


class Netlink:
    """The route / address / rule / proxy-neighbour changes a daemon makes, each one undone by
    ``undo_all()`` at shutdown (in reverse order)."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._ipr = IPRoute()
        self._undo: list[tuple[str, tuple, dict]] = []

    @staticmethod
    def _index(ifname: str) -> int:
        """The interface's index, from the kernel at each call (an interface may be re-created
        with a new index) and without a netlink dump: pyroute2's ``link_lookup`` on a long-lived
        IPRoute kept about 2 kB per call (0.9.7), which grew the HA by each binding change and
        the MN by each return home; ``if_nametoindex`` (one ioctl) keeps nothing."""
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            raise OSError(f"no interface {ifname!r}") from None

    def _do(self, method: str, command: str, undo: str | None, **kw) -> None:
        getattr(self._ipr, method)(command, **kw)
        if undo:
            self._undo.append((method, (undo,), kw))

    def add_address(self, ifname: str, address: str, prefixlen: int) -> None:
        kw = dict(index=self._index(ifname), address=address, prefixlen=prefixlen)
        try:
            self._do("addr", "add", "del", **kw)
        except Exception as exc:  # already there (EEXIST): fine, but then it is not ours to undo
            if "exists" not in str(exc).lower():
                raise

    def del_address(self, ifname: str, address: str, prefixlen: int) -> None:
        kw = dict(index=self._index(ifname), address=address, prefixlen=prefixlen)
        self._forget("addr", kw)
        try:
            self._ipr.addr("del", **kw)
        except Exception as exc:
            log.debug("del address %s/%s on %s: %s", address, prefixlen, ifname, exc)

    def replace_route(self, dst: str, ifname: str, table: int | None = None,
                      src: str | None = None, via: str | None = None) -> None:
        kw: dict = dict(dst=dst, oif=self._index(ifname))
        if table is not None:
            kw["table"] = table
        if src is not None:
            kw["prefsrc"] = src
        if via is not None:
            kw["gateway"] = via
        self._forget("route", kw, match=("dst", "oif", "table"))
        self._do("route", "replace", "del", **kw)

    def del_route(self, dst: str, ifname: str, table: int | None = None) -> None:
        kw: dict = dict(dst=dst, oif=self._index(ifname))
        if table is not None:
            kw["table"] = table
        self._forget("route", kw, match=("dst", "oif", "table"))
        try:
            self._ipr.route("del", **kw)
        except Exception as exc:
            log.debug("del route %s dev %s: %s", dst, ifname, exc)

    def add_rule(self, iifname: str, table: int, priority: int) -> None:
        kw = dict(iifname=iifname, table=table, priority=priority)
        try:
            self._ipr.rule("del", **kw)     # left over by a killed daemon
        except Exception:
            pass
        self._do("rule", "add", "del", **kw)

    def add_proxy_arp(self, address: str, ifname: str) -> None:
        kw = dict(dst=address, ifindex=self._index(ifname), flags=NTF_PROXY)
        self._forget("neigh", kw)
        self._do("neigh", "replace", "del", **kw)

    def del_proxy_arp(self, address: str, ifname: str) -> None:
        kw = dict(dst=address, ifindex=self._index(ifname), flags=NTF_PROXY)
        self._forget("neigh", kw)
        try:
            self._ipr.neigh("del", **kw)
        except Exception as exc:
            log.debug("del proxy %s on %s: %s", address, ifname, exc)

    def _forget(self, method: str, kw: dict, match: tuple[str, ...] | None = None) -> None:
        keys = match or tuple(kw)
        self._undo = [u for u in self._undo
                      if not (u[0] == method and all(u[2].get(k) == kw.get(k) for k in keys))]

    def undo_all(self) -> None:
        for method, args, kw in reversed(self._undo):
            try:
                getattr(self._ipr, method)(*args, **kw)
            except Exception as exc:
                log.debug("undo %s %s %s: %s", method, args, kw, exc)
        self._undo.clear()

    def close(self) -> None:
        self._ipr.close()


def set_sysctl(name: str, value: str | int) -> None:
    """Write /proc/sys/<name with dots as slashes> (this network namespace's copy)."""
    path = "/proc/sys/" + name.replace(".", "/")
    with open(path, "w") as f:
        f.write(f"{value}\n")
