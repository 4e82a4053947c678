"""rtnetlink: the MN's address watcher, and the address / route / rule / proxy-ARP changes the
daemons make (through pyroute2).

**Address watcher** (MN).  A netlink socket subscribed to ``RTMGRP_IPV4_IFADDR`` (rtnetlink(7));
messages are decoded with pyroute2's ``ifaddrmsg``.  (pyroute2's own ``IPRoute.get()`` buffers
messages in an asyncio core, so its file descriptor is not a reliable readiness signal for our
selector loop: we own the socket and use pyroute2 for the decoding.)  Rules:

* a new IPv4 address on a configured *visited* interface -> ``CareOfAddressChanged(addr, ifname)``;
* a new address inside the home prefix on the configured *home* interface ->
  ``ReturnedHome(ifname)`` (RFC 5944 §3.6.1.1: the MN may be home; the role leaves the tunnel only
  once the HA's authenticated reply arrives);
* an address inside the home prefix on any other interface (a visited network's DHCP handing
  one out) is logged as a warning and ignored: it is neither proof of being home nor usable as a
  care-of address;
* removal of the address currently used as care-of address, with no other one left ->
  ``CareOfAddressChanged(None, ifname)`` is *not* sent: the MN keeps its registration until a new
  address appears (a break-before-make move removes the old address first), and the removal is
  only logged;
* a new care-of address while another visited interface still has one is a make-before-break
  move (``make_before_break=True``): the old address keeps working while the MN registers, so the
  MN keeps accepting packets sent to it (the lab's ``handover --make-before-break``).

Addresses on other interfaces (the MN's own TUN device carries the home address) are ignored.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from typing import Iterable

from mipsec.node.actions import CareOfAddressChanged, ReturnedHome

log = logging.getLogger("mipsec.io.netlink")

RTMGRP_IPV4_IFADDR = 0x10      # rtnetlink(7) multicast group
RTM_NEWADDR = 20
RTM_DELADDR = 21
NTF_PROXY = 0x08               # neighbour flag: proxy ARP entry (ip neigh add proxy)
_NLMSGHDR = struct.Struct("=IHHII")


class AddressWatcher:
    """Turns kernel address notifications into MN events (see module doc)."""

    def __init__(self, visited_interfaces: Iterable[str], home_prefix: str,
                 home_interfaces: Iterable[str] = ()):
        self.visited = set(visited_interfaces)
        self.home_interfaces = set(home_interfaces)
        self.home_prefix = ipaddress.IPv4Network(home_prefix, strict=False)
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   socket.NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_IPV4_IFADDR))
        self.name = "netlink"
        self._present: dict[str, set[str]] = {}    # visited interface -> its IPv4 addresses

    def fileno(self) -> int:
        return self._sock.fileno()

    def classify(self, kind: int, ifname: str | None, address: str | None):
        """The event for one notification (pure: tested without a kernel)."""
        if not ifname or not address:
            return None
        watched = ifname in self.visited or ifname in self.home_interfaces
        if not watched:
            return None
        at_home = ipaddress.IPv4Address(address) in self.home_prefix
        if kind == RTM_NEWADDR:
            if at_home:
                if ifname in self.home_interfaces:
                    return ReturnedHome(interface=ifname)
                # any DHCP server can hand out a home-prefix address: that is no proof of being
                # home, and it cannot serve as a care-of address either (docs/security.md)
                log.warning("address %s on %s is inside the home prefix %s but %s is not the "
                            "home interface: ignored (neither home nor a care-of address)",
                            address, ifname, self.home_prefix, ifname)
                return None
            if ifname in self.visited:
                others = any(addrs for name, addrs in self._present.items() if name != ifname)
                self._present.setdefault(ifname, set()).add(address)
                return CareOfAddressChanged(care_of_address=address, interface=ifname,
                                            make_before_break=others)
        elif kind == RTM_DELADDR:
            self._present.get(ifname, set()).discard(address)
            log.info("address %s removed from %s", address, ifname)
        return None

    def receive(self) -> list:
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

        events = []
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped notifications (socket buffer overrun): rescan what is there.
                log.warning("netlink overrun: rescanning the addresses")
                self._present.clear()
                events += self.initial_events()
                continue
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    break
                if kind in (RTM_NEWADDR, RTM_DELADDR):
                    msg = ifaddrmsg(data[off:off + length])
                    msg.decode()
                    if msg["family"] == socket.AF_INET:
                        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                        ifname = msg.get_attr("IFA_LABEL") or _ifname(msg["index"])
                        event = self.classify(kind, ifname, address)
                        if event is not None:
                            events.append(event)
                off += (length + 3) & ~3
        return events

    def initial_events(self) -> list:
        """Events for the addresses already present when the daemon starts."""
        events = []
        for ifname, address in current_addresses():
            event = self.classify(RTM_NEWADDR, ifname, address)
            if event is not None:
                events.append(event)
        # At most one: home wins (the MN is at home), else the last care-of address found.
        home = [e for e in events if isinstance(e, ReturnedHome)]
        return home[:1] if home else events[-1:]

    def close(self) -> None:
        self._sock.close()


def _ifname(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


def current_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) pairs of this network namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        out = []
        for msg in ipr.get_addr(family=socket.AF_INET):
            ifname = msg.get_attr("IFA_LABEL") or _ifname(msg["index"])
            out.append((ifname, msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")))
        return out


class Netlink:
    """The route / address / rule / proxy-neighbour changes a daemon makes, each one undone by
    ``undo_all()`` at shutdown (in reverse order)."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._ipr = IPRoute()
        self._undo: list[tuple[str, tuple, dict]] = []

    def _index(self, ifname: str) -> int:
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            raise OSError(f"no interface {ifname!r}")
        return found[0]

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
                      src: str | None = None) -> None:
        kw: dict = dict(dst=dst, oif=self._index(ifname))
        if table is not None:
            kw["table"] = table
        if src is not None:
            kw["prefsrc"] = src
        self._forget("route", kw)
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
