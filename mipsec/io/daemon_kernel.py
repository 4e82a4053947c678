"""A role daemon's kernel side: the sockets each role receives on, forwarding protection for
the GW and the HA (docs/security.md §3.1), and the per-role routes, rules, addresses and ARP
entries that follow the role's actions (the MN's tunnel, the HA's intercepted home addresses)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

from mipsec.constants import IKE_PORT, IPPROTO_ESP, IPPROTO_IPIP, MIP_PORT, NAT_T_PORT
from mipsec.errors import ConfigError
from mipsec.io import arp, hostguard, netlink, transports
from mipsec.io.daemon_state import DaemonState
from mipsec.node.actions import (
    BindingChanged,
    CareOfAddressChanged,
    UseHomeLink,
)

log = logging.getLogger("mipsec.daemon")

IP_FREEBIND = 15               # linux/in.h: bind an address not (yet) on an interface


def siu_port() -> int:
    from mipsec.mip.constants import SIU_PORT
    return SIU_PORT


def mn_tunnel_routes(home_prefix: str) -> list[str]:
    """The MN's routes into its TUN while away: the home prefix as its two halves (a /32 stays
    itself), so that they win over a connected route for the whole prefix on any interface."""
    net = ipaddress.IPv4Network(home_prefix)
    halves = [net] if net.prefixlen == 32 else list(net.subnets(prefixlen_diff=1))
    return [str(h) for h in halves]


class KernelWiring(DaemonState):
    """Sockets, forwarding protection and per-role kernel state (undone by ``Netlink.undo_all``)."""

    def _open_receivers(self) -> list[Any]:
        cfg = self.cfg
        out: list[Any] = []
        # a GW with worker processes: ESP goes to the workers (mipsec.io.gw_workers), UDP 4500
        # is a reuseport group whose first socket, this one, gets IKE and keepalives
        workers = cfg.daemon.workers if cfg.role == "gw" else 0
        if cfg.role in ("mn", "gw"):
            if not workers:
                out.append(transports.RawReceiver(IPPROTO_ESP, "esp"))
            if self._uses_ike():
                # IKEv2 (RFC 7296 §2): UDP 500, and 4500 for NAT-T (IKE with the non-ESP
                # marker and ESP in UDP, RFC 3948), both rebuilt into whole IPv4 + UDP packets
                where = cfg.node.outside_address if cfg.role == "gw" else "0.0.0.0"
                out.append(transports.UdpReceiver(IKE_PORT, where, name="ike"))
                out.append(transports.UdpReceiver(NAT_T_PORT, where, name="ike-esp-udp",
                                                  udp_checksum=False,
                                                  sock=self._nat_t_socket(where, workers)))
            elif self._uses_udp_encap():
                # ESP in UDP: the rebuilt packet carries UDP checksum 0 (RFC 3948 §2.1)
                out.append(transports.UdpReceiver(NAT_T_PORT, name="esp-udp",
                                                  udp_checksum=False,
                                                  sock=self._nat_t_socket("0.0.0.0", workers)))
        if cfg.role == "mn":
            out.append(transports.UdpReceiver(MIP_PORT, name="mip"))
        if cfg.role == "gw":
            # SIUs only on the inside interface at the inside address (docs/security.md)
            out.append(transports.UdpReceiver(
                siu_port(), cfg.node.inside_address, name="siu",
                interface=cfg.daemon.inside_interface if self.manage_kernel else None,
                role_entry="receive_siu"))
        if cfg.role == "ha":
            out.append(transports.UdpReceiver(MIP_PORT, name="mip"))
            out.append(transports.RawReceiver(IPPROTO_IPIP, "ipip",
                                              sock=self._home_link_raw(IPPROTO_IPIP)))
            # the GWs' SIU ACKs (docs/protocol.md) come to the HA's address, SIU port (in an HA
            # group a standby does not hold that address yet: bind it all the same, FREEBIND)
            sock = None
            if cfg.daemon.ha_group:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.IPPROTO_IP, transports.IP_PKTINFO, 1)
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
                try:
                    sock.bind((cfg.node.address, siu_port()))
                except OSError as exc:
                    sock.close()
                    raise ConfigError(f"cannot bind UDP {cfg.node.address}:{siu_port()}: "
                                      f"{exc}") from exc
            out.append(transports.UdpReceiver(siu_port(), cfg.node.address, name="siu-ack",
                                              sock=sock))
        return out

    def _nat_t_socket(self, address: str, workers: int) -> socket.socket | None:
        """UDP 4500: a plain socket (None: the receiver opens it), or with workers the first
        of the reuseport group the workers join (mipsec.io.gw_workers)."""
        if not workers:
            return None
        from mipsec.io.gw_workers import open_reuseport_udp
        self._nat_t_bind = (address, NAT_T_PORT)
        return open_reuseport_udp(address, NAT_T_PORT)

    def _home_link_raw(self, protocol: int) -> socket.socket | None:
        """HA: the reverse tunnel is trusted only from the home link (docs/security.md §3.1),
        so its raw socket sees only packets that arrived on ``home_interface``."""
        if not self.manage_kernel:
            return None
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, protocol)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                            self.cfg.daemon.home_interface.encode())
        except OSError:
            sock.close()
            raise
        return sock

    # --- per-role kernel wiring ----------------------------------------------------------------

    def _setup_mn(self) -> None:
        d, node = self.cfg.daemon, self.cfg.node
        homes = [d.home_interface] if d.home_interface else []
        self.watcher = netlink.AddressWatcher(d.interfaces, node.home_prefix, homes,
                                              gateway=node.gateway)
        if d.home_interface and d.gratuitous_arp:
            self.announcer = arp.Announcer(d.home_interface)
        self._loop.on_event.append(self._mn_before_event)
        self._loop.on_action[UseHomeLink] = self._mn_use_home_link
        # The MN starts in the tunnel: home-network traffic is never sent in the clear until the
        # HA has confirmed, on the home link, that we are home (UseHomeLink).
        self._mn_enter_tunnel()

    def _mn_enter_tunnel(self) -> None:
        """The home address on the TUN, the home prefix routed into it.  Two routes, each half
        of the prefix: more specific than any connected route a home-prefix address adds on a
        real interface (ours on the home link, or a hostile visited network's), which they
        neither replace nor lose to."""
        if self._tun_home_configured:
            return
        node = self.cfg.node
        self._nl.add_address(self.tun.name, node.home_address, 32)
        for half in mn_tunnel_routes(node.home_prefix):
            self._nl.replace_route(half, self.tun.name, src=node.home_address)
        self._tun_home_configured = True

    def _mn_before_event(self, event: Any) -> None:
        """Kernel side of an MN move, done before the role sees the event: leaving home puts
        the home address back into the tunnel (returning home changes nothing here: the role
        says when with UseHomeLink)."""
        if isinstance(event, CareOfAddressChanged) and event.care_of_address:
            self._mn_enter_tunnel()

    def _mn_use_home_link(self, action: UseHomeLink) -> None:
        """The HA confirmed the deregistration: the home network is reached on the home link."""
        node, d = self.cfg.node, self.cfg.daemon
        if self._tun_home_configured:
            for half in mn_tunnel_routes(node.home_prefix):
                self._nl.del_route(half, self.tun.name)
            self._nl.del_address(self.tun.name, node.home_address, 32)
            self._tun_home_configured = False
        if self.announcer is not None:
            try:   # RFC 5944 §4.6: the MN announces itself on the home link
                self.announcer.announce(node.home_address)
            except OSError as exc:
                log.warning("gratuitous ARP on %s failed: %s", d.home_interface, exc)

    def _protect_gw(self) -> None:
        """A security gateway, not a router (docs/security.md §3.1): forwarding only from the
        TUN device (decrypted inner packets) and the inside interface, never from the outside
        interface (the one holding outside_address); each value read back; exit status 2 with
        the file, the key and the problem when that cannot be set."""
        d, node = self.cfg.daemon, self.cfg.node
        where = f"{self.cfg.path}: [gateway] outside_address {node.outside_address}"
        risk = "the GW would forward packets from its outside interface into the home network"
        try:
            outside = hostguard.interface_of(node.outside_address)
        except hostguard.HostSetupError as exc:
            raise ConfigError(f"{where}: cannot find the outside interface: {exc}") from None
        if outside in (d.inside_interface, self.tun.name):
            raise ConfigError(f"{where}: the outside address is on {outside!r}, which is the "
                              f"inside interface or the TUN device")
        try:
            self.sysctls.ensure(hostguard.conf_key(outside, "forwarding"), 0)
            # loose reverse-path filter outside (a source must be routable at all), not strict:
            # a visited network may use addresses of the home prefix, and the MN then sends
            # from such an address (docs/security.md §3.2)
            self.sysctls.ensure(hostguard.conf_key(outside, "rp_filter"), 2)
            for ifname in (d.inside_interface, self.tun.name):
                self.sysctls.ensure(hostguard.conf_key(ifname, "forwarding"), 1)
            # asymmetric by design: home-side traffic for care-of addresses enters the TUN
            for scope in ("all", "default", d.inside_interface, self.tun.name):
                self.sysctls.ensure(hostguard.conf_key(scope, "rp_filter"), 0)
        except hostguard.HostSetupError as exc:
            raise ConfigError(f"{where}: on its interface {outside}: {exc} ({risk})") from None
        self.forward_filter = hostguard.ForwardFilter(f"mipsec_gw_{self.tun.name}", outside,
                                                      node.inside_address)
        try:
            self.forward_filter.install()
        except hostguard.HostSetupError as exc:
            self.forward_filter = None
            log.warning("no netfilter layer (%s): only net.ipv4.conf.%s.forwarding = 0 keeps "
                        "the outside from being forwarded", exc, outside)
        log.info("outside interface %s: not forwarded (forwarding 0, rp_filter 2%s)", outside,
                 ", nftables table ip " + self.forward_filter.table if self.forward_filter else "")

    def _protect_ha(self) -> None:
        """The HA forwards between its home interface and its TUN device only."""
        d = self.cfg.daemon
        try:
            for ifname in (d.home_interface, self.tun.name):
                self.sysctls.ensure(hostguard.conf_key(ifname, "forwarding"), 1)
            for scope in ("all", "default", d.home_interface, self.tun.name):
                self.sysctls.ensure(hostguard.conf_key(scope, "rp_filter"), 0)
            # Answer proxied ARP requests at once (the default waits up to 0.8 s, neigh(7)).
            self.sysctls.ensure(f"net.ipv4.neigh.{d.home_interface}.proxy_delay", 0)
        except hostguard.HostSetupError as exc:
            raise ConfigError(f"{self.cfg.path}: [daemon] home_interface {d.home_interface}: "
                              f"{exc}") from None

    def _setup_gw(self) -> None:
        d = self.cfg.daemon
        self._nl.replace_route("0.0.0.0/0", self.tun.name, table=d.route_table)
        self._nl.add_rule(d.inside_interface, d.route_table, d.rule_priority)

    def _setup_ha(self) -> None:
        d = self.cfg.daemon
        if d.gratuitous_arp:
            self.announcer = arp.Announcer(d.home_interface)
        self._loop.on_action[BindingChanged] = self._ha_binding_changed

    def _ha_binding_changed(self, action: BindingChanged) -> None:
        d = self.cfg.daemon
        home = action.home_address
        if action.care_of_address and home not in self._away:
            # Leaving home: intercept the home address (RFC 5944 §4.6 proxy + gratuitous ARP).
            # A move between two care-of addresses changes nothing here.
            self._away.add(home)
            self._nl.replace_route(f"{home}/32", self.tun.name)
            self._nl.add_proxy_arp(home, d.home_interface)
            if self.announcer is not None:
                try:
                    self.announcer.announce(home)
                except OSError as exc:
                    log.warning("gratuitous ARP for %s failed: %s", home, exc)
        elif not action.care_of_address and home in self._away:
            self._away.discard(home)
            self._nl.del_proxy_arp(home, d.home_interface)
            self._nl.del_route(f"{home}/32", self.tun.name)
        self._route_care_of(action)

    def _route_care_of(self, action: BindingChanged) -> None:
        """GW pool: the tunnelled downlink to a care-of address leaves via the GW that holds
        the MN's SAs (the HA learnt it from the path of the registration), by a host route on
        the home link.  Two MNs behind one NAT (one public CoA) served by two different GWs
        would need one route each: they share the last one (docs/scaling.md)."""
        d = self.cfg.daemon
        home = action.home_address
        old = self._care_of_routes.pop(home, None)
        if old is not None and old != action.care_of_address and \
                old not in self._care_of_routes.values():
            self._nl.del_route(f"{old}/32", d.home_interface)
        if action.care_of_address and action.gateway:
            self._nl.replace_route(f"{action.care_of_address}/32", d.home_interface,
                                  via=action.gateway)
            self._care_of_routes[home] = action.care_of_address
