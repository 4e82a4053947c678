"""``mipsec mn|gw|ha``: a role on a TUN device and sockets, driven by one event loop.

The daemon does not fork the role's logic: it builds the same sans-I/O object the simulator
drives (``mipsec.node``) from the TOML file and wires it to the machine (docs/design.md,
"What net and tun mean"):

* MN.  TUN device: the home address on it while away, the home prefix routed into it.
  Receives raw ESP (50), UDP 4500 if UDP-encapsulated, UDP 434 (the direct RRP at home).
  Reacts to netlink: a new address on a visited interface -> ``CareOfAddressChanged``; an
  address in the home prefix -> ``ReturnedHome`` (TUN address and routes removed, gratuitous
  ARP).
* GW.  TUN device: ``ip rule iif <inside> lookup <table>``, table: default dev TUN (home-side
  traffic for care-of addresses goes to the role).  Receives raw ESP (50), UDP 4500 if any MN
  uses it, the UDP SIU port on the inside address.  ``RebindSa`` is logged (the key file uses
  ``*`` addresses and stays valid).
* HA.  TUN device: the home addresses of MNs away are routed into it.  Receives UDP 434, raw
  IP-in-IP (4), the UDP SIU port (the GWs' ACKs).  ``BindingChanged``: a host route into the
  TUN + proxy ARP + gratuitous ARP while away; removed at home.

Start-up validates everything first (file, keys, interfaces) and stops with one message on the
first problem.  SIGTERM / SIGINT stop the loop; shutdown removes the routes, rules, proxy-ARP
entries and addresses the daemon added, closes the TUN device (the kernel deletes it), the
sockets and the control socket.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from mipsec.config import DaemonConfig, check_runtime, load_config
from mipsec.constants import IKE_PORT, IPPROTO_ESP, IPPROTO_IPIP, MIP_PORT, NAT_T_PORT
from mipsec.errors import ConfigError, UsageError
from mipsec.io import arp, control, hostguard, instance, logs, netlink, seqstate, transports
from mipsec.io import pcap as pcapmod
from mipsec.io import tun as tunmod
from mipsec.io.loop import EventLoop
from mipsec.node.actions import (
    BindingChanged,
    BindingNotStored,
    CareOfAddressChanged,
    PersistBinding,
    ReserveSiuSequence,
    ReturnedHome,
    SiuSequenceNotReserved,
    UseHomeLink,
)
from mipsec.node.role import build_role
from mipsec.store import StoreError, open_store

log = logging.getLogger("mipsec.daemon")

IP_FREEBIND = 15               # linux/in.h: bind an address not (yet) on an interface
FENCED_EXIT_STATUS = 3         # an HA group member that lost its lease: restart it (standby)
STATUS_TIMELINE_EVENTS = 256   # status carries the latest events; `timeline` has them all


def siu_port() -> int:
    from mipsec.mip.constants import SIU_PORT
    return SIU_PORT


def mn_tunnel_routes(home_prefix: str) -> list[str]:
    """The MN's routes into its TUN while away: the home prefix as its two halves (a /32 stays
    itself), so that they win over a connected route for the whole prefix on any interface."""
    net = ipaddress.IPv4Network(home_prefix)
    halves = [net] if net.prefixlen == 32 else list(net.subnets(prefixlen_diff=1))
    return [str(h) for h in halves]


def make_role(cfg: DaemonConfig, wallclock=time.time, now: float | None = None) -> Any:
    """The sans-I/O role object for a configuration (the same classes the simulator uses).

    It gets the injected wall clock (MIPv4 identification) and ``now`` (the loop's monotonic
    clock: SA lifetimes start there); see ``mipsec.node.role``.
    """
    return build_role(cfg.role, cfg.node, wallclock=wallclock,
                      now=time.monotonic() if now is None else now)


def esp_entries(cfg: DaemonConfig) -> list[pcapmod.EspSaEntry]:
    """The esp_sa key-file entries for this daemon's SAs, from its configuration (manual keys;
    IKEv2-negotiated SAs are added as they are installed, see ``role_sas``)."""
    sas = []
    if cfg.role == "mn":
        sas = [cfg.node.esp_in, cfg.node.esp_out]
    elif cfg.role == "gw":
        for m in cfg.node.mobiles:
            sas += [m.esp_in, m.esp_out]
    sas = [sa for sa in sas if sa is not None]
    out = []
    for sa in sas:
        if sa.encryption not in pcapmod.TSHARK_ENCRYPTION:
            log.warning("key file: Wireshark 4.0 cannot decrypt %s; SA 0x%08x left out",
                        sa.encryption, sa.spi)
        else:
            out.append(pcapmod.EspSaEntry(spi=sa.spi, encryption=sa.encryption,
                                          encryption_key=sa.encryption_key,
                                          integrity=sa.integrity, integrity_key=sa.integrity_key))
    return out


def role_sas(role: Any) -> list[Any]:
    """Every ESP SA object the role holds now (current pairs, re-keyed inbound SAs)."""
    return list(role.esp_sas())


def sa_key_line(sa: Any) -> str | None:
    """The esp_sa record of an SA with wildcard addresses (valid across rebinds and moves), or
    None when Wireshark cannot decrypt its cipher."""
    try:
        return pcapmod.entry_from_sa(sa).uat_line()
    except Exception:
        return None


def _read_key_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Daemon:
    """One role process.  ``start()`` then ``run()``; ``close()`` always (it is idempotent)."""

    def __init__(self, cfg: DaemonConfig, *, role: Any = None, tun: Any = None,
                 sender: Any = None, receivers: list[Any] | None = None,
                 manage_kernel: bool = True):
        self.cfg = cfg
        self.role = role
        self.tun = tun
        self.sender = sender
        self.receivers = receivers
        self.manage_kernel = manage_kernel   # False in tests with fakes: no routes, no netlink
        self.nl: netlink.Netlink | None = None
        self.watcher: netlink.AddressWatcher | None = None
        self.control: control.ControlServer | None = None
        self.pcap: pcapmod.PcapWriter | None = None
        self.loop: EventLoop | None = None
        self.started_wall = time.time()
        self._tun_home_configured = False
        self._away: set[str] = set()          # HA: home addresses currently steered into the TUN
        self._care_of_routes: dict[str, str] = {}   # HA, GW pool: home -> CoA routed via its GW
        # the key files' lines: every SA whose packets the kept capture files may hold (IKEv2:
        # pruned as the capture rotates, pcap.KeyLines), ESP SAs by SPI, IKE SAs by SPI pair
        self._esp_keys = pcapmod.KeyLines()
        self._key_rotation = 0                # the capture file the keys' tags were last set in
        self._ike_keyfile: str | None = None  # IKEv2: the ikev2_decryption_table beside keyfile
        self._ike_keys = pcapmod.KeyLines()
        self.announcer: arp.Announcer | None = None
        self.events: logs.RoleWatcher | None = None   # the role's records -> log lines
        self.metrics: Any = None                      # the Prometheus endpoint ([metrics])
        self.sysctls = hostguard.Sysctls()    # GW / HA: what the daemon set, restored at exit
        self.seqstore: seqstate.SequenceStore | None = None   # manual keys: numbers on disk
        self.forward_filter: hostguard.ForwardFilter | None = None
        self.store: Any = None                # HA: its binding store (mipsec.store)
        self.store_errors = 0
        # HA group (ha_group = true): the election and the warm copy (mipsec.io.hagroup)
        self.group: Any = None                # the ElectionRunner thread
        self.watcher_thread: Any = None       # the StoreWatcher thread
        self.wakeup: Any = None
        self.serving = True                   # False while a standby (or fenced)
        self.standby_dropped = 0              # actions a standby did not carry out
        self.exit_status = 0
        self.locks = instance.Locks(f"pid {os.getpid()}, config {cfg.path}")
        self.log_level_override: str | None = None      # --log-level / --log-format win over
        self.log_format_override: str | None = None     # the file, also on reload
        self._closed = False

    # --- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        if self.manage_kernel:
            check_runtime(cfg)
        try:
            # one daemon per instance and per kernel resource; then what the machine must have
            instance.claim_instance(cfg, self.locks)
            if self.manage_kernel:
                instance.claim_kernel_resources(cfg, self.locks)
                instance.check_machine(cfg)
        except Exception:
            self.locks.release()
            raise
        if self.role is None:
            self.role = make_role(cfg)
        try:
            if cfg.role == "ha":
                self.store = self._open_store()
            self._start_io()
            if cfg.role == "ha" and cfg.daemon.ha_group:
                self._start_group()
        except Exception:
            self.close()
            raise

    def _start_io(self) -> None:
        cfg, d = self.cfg, self.cfg.daemon
        if self.tun is None:
            self.tun = tunmod.LinuxTun(d.tun, d.mtu)
        if self.manage_kernel and cfg.role in ("gw", "ha"):
            # before any socket opens: what may be forwarded (docs/security.md §3.1)
            getattr(self, f"_protect_{cfg.role}")()
        if self.sender is None:
            self.sender = transports.RawSender()
        if self.receivers is None:
            try:
                self.receivers = self._open_receivers()
            except ConfigError as exc:    # a port in use: name the file (exit 2, no restart loop)
                raise ConfigError(f"{cfg.path}: {exc} (is another mipsec {cfg.role} running "
                                  f"on this machine?)") from None
        if d.pcap:
            self.pcap = pcapmod.PcapWriter(d.pcap, max_bytes=d.pcap_max_mb * 1_000_000,
                                           keep=d.pcap_keep)
        if cfg.keyfile:
            if self._uses_ike():
                # negotiated SAs of an earlier run of this daemon may still be in use by the
                # peer (a restart: the MN's packets on its old SA are in the capture too); its
                # capture is the rotated file -1
                for i, line in enumerate(_read_key_lines(cfg.keyfile)):
                    self._esp_keys.add(("earlier", i), line, -1)
                # and the IKE SAs' keys beside them (ikev2_decryption_table), kept the same way
                self._ike_keyfile = pcapmod.ike_keyfile_path(cfg.keyfile)
                for i, line in enumerate(_read_key_lines(self._ike_keyfile)):
                    self._ike_keys.add(("earlier", i), line, -1)
                pcapmod.write_ike_key_file(self._ike_keyfile, self._ike_keys.lines())
            for entry in esp_entries(cfg):
                self._esp_keys.add(entry.spi, entry.uat_line(), 0)
            pcapmod.write_esp_sa_file(cfg.keyfile, self._esp_keys.lines())
        self._attach_sequence_state()      # before the first packet can be sent
        self.loop = EventLoop(self.role, tun=self.tun, sender=self.sender,
                              receivers=self.receivers, name=f"{cfg.role}:{self._name()}",
                              pcap=self.pcap)
        if cfg.keyfile and getattr(self.role, "ike", None) is not None:
            # IKEv2: rewrite the key file whenever SAs appear, keeping every SA the kept
            # capture files may hold, so the whole capture decrypts (docs/operations.md
            # "Captures"); SAs of capture files already rotated away leave it
            dispatch = self._loop.dispatch

            def dispatch_and_keys(actions: list[Any]) -> None:
                dispatch(actions)
                self._update_keyfile()
            # the loop calls self.dispatch for every result it does not carry out itself
            self._loop.dispatch = dispatch_and_keys  # type: ignore[method-assign]
        self.events = logs.RoleWatcher(
            self.role, f"{cfg.role}:{self._name()}",
            sas=role_sas if cfg.role in ("mn", "gw") else (lambda role: ()),
            recent=lambda: self._loop.last_received)
        self._loop.on_silent = self.events.on_silent
        self._loop.after_batch.append(self.events.after_batch)
        self._loop.hurry = self.events.wants_wakeup
        if cfg.metrics.listen:
            from mipsec.io import metrics
            role_metrics = metrics.RoleMetrics(
                cfg.role, self._name(), role=self.role, stats=lambda: self._loop.stats,
                sas=lambda: role_sas(self.role) if cfg.role in ("mn", "gw") else (),
                drops=self.events.drop_totals)
            self.events.observers.append(role_metrics.observe)
            try:
                self.metrics = metrics.MetricsServer(cfg.metrics.listen, role_metrics)
            except OSError as exc:
                raise ConfigError(f"{cfg.path}: [metrics] listen: cannot listen on "
                                  f"{cfg.metrics.listen}: {exc.strerror or exc}") from None
            self._loop.add_reader(self.metrics, lambda srv: srv.serve_one())
        if cfg.role == "gw":
            # The GW's capture is its outside: packets from or to its outside address (ESP and
            # UDP-encapsulated ESP), not the SIUs on the inside.
            outside = socket.inet_aton(cfg.node.outside_address)
            self._loop.pcap_filter = lambda p: p[12:16] == outside or p[16:20] == outside
        if cfg.role == "ha":
            self._plain_dispatch = self._loop.dispatch
            self._loop.dispatch = self._dispatch_persisting  # type: ignore[method-assign]
        if self.manage_kernel:
            self.nl = netlink.Netlink()
            getattr(self, f"_setup_{cfg.role}")()
        if self.store is not None and not d.ha_group:
            self._restore_bindings()      # (a group member restores when it becomes active)
        self.control = control.ControlServer(cfg.control_socket, self.handle_command)
        self._loop.add_reader(self.control, lambda srv: srv.serve_one())
        if self.watcher is not None:
            self._loop.add_reader(self.watcher, self._on_netlink)
            for event in self.watcher.initial_events():
                self._loop.feed_event(event)

    def _update_keyfile(self) -> None:
        rotation = self.pcap.rotations if self.pcap is not None else 0
        rotated = rotation != self._key_rotation
        self._key_rotation = rotation
        self._update_ike_keyfile(rotation, rotated)
        new = False
        held = []
        for sa in role_sas(self.role):
            held.append(sa.spi)
            if sa.spi in self._esp_keys:
                continue
            line = sa_key_line(sa)
            # an SA Wireshark cannot decrypt gets no line, only its place (never looked at again)
            self._esp_keys.add(sa.spi, line or "", rotation)
            new = new or line is not None
        if rotated:
            self._esp_keys.held(held, rotation)
            new = self._prune_keys(self._esp_keys, rotation) or new
        if new:
            try:
                pcapmod.write_esp_sa_file(self.cfg.keyfile,
                                          [line for line in self._esp_keys.lines() if line])
            except OSError as exc:
                log.warning("key file %s: %s", self.cfg.keyfile, exc)

    def _prune_keys(self, keys: pcapmod.KeyLines, rotation: int) -> bool:
        """The capture rotated: drop the lines of SAs last in use in a capture file that is
        gone (the current file and ``keep`` rotated ones are kept; one more file's worth of
        margin for an SA that ended in the batch that rotated)."""
        if self.pcap is None or not self.pcap.max_bytes:
            return False
        return keys.prune(rotation - self.pcap.keep - 1)

    def _update_ike_keyfile(self, rotation: int, rotated: bool) -> None:
        """Add every IKE SA whose keys now exist (after IKE_SA_INIT, or a re-key's successor) to
        the ikev2_decryption_table file, so IKE_AUTH and everything after it decrypts; when the
        capture rotated, drop the IKE SAs no kept file can hold."""
        if self._ike_keyfile is None:
            return
        new = False
        held = []
        for sa in self.role.ike.endpoint.ike_sas:
            key = (sa.spi_i, sa.spi_r)
            held.append(key)
            if key in self._ike_keys:
                continue
            entry = pcapmod.ike_entry_from_sa(sa)
            if entry is None:                 # no keys yet (IKE_SA_INIT not answered)
                continue
            try:
                self._ike_keys.add(key, entry.uat_line(), rotation)
                new = True
            except ValueError as exc:         # a transform Wireshark 4.0 has no name for
                self._ike_keys.add(key, "", rotation)
                log.warning("IKE key file: %s; IKE SA %s left out", exc, sa.name)
        if rotated:
            self._ike_keys.held(held, rotation)
            new = self._prune_keys(self._ike_keys, rotation) or new
        if new:
            try:
                pcapmod.write_ike_key_file(self._ike_keyfile,
                                           [line for line in self._ike_keys.lines() if line])
            except OSError as exc:
                log.warning("key file %s: %s", self._ike_keyfile, exc)

    @property
    def _loop(self) -> EventLoop:
        """The event loop: it exists from ``start()`` on."""
        if self.loop is None:
            raise UsageError("the daemon has not been started")
        return self.loop

    @property
    def _nl(self) -> netlink.Netlink:
        """The netlink socket: it exists from ``start()`` on when the daemon manages the kernel."""
        if self.nl is None:
            raise UsageError("the daemon manages no kernel state (manage_kernel=False)")
        return self.nl

    def _name(self) -> str:
        return getattr(self.cfg.node, "name", self.cfg.role)

    def _open_receivers(self) -> list[Any]:
        cfg = self.cfg
        out: list[Any] = []
        if cfg.role in ("mn", "gw"):
            out.append(transports.RawReceiver(IPPROTO_ESP, "esp"))
            if self._uses_ike():
                # IKEv2 (RFC 7296 §2): UDP 500, and 4500 for NAT-T (IKE with the non-ESP
                # marker and ESP in UDP, RFC 3948), both rebuilt into whole IPv4 + UDP packets
                where = cfg.node.outside_address if cfg.role == "gw" else "0.0.0.0"
                out.append(transports.UdpReceiver(IKE_PORT, where, name="ike"))
                out.append(transports.UdpReceiver(NAT_T_PORT, where, name="ike-esp-udp",
                                                  udp_checksum=False))
            elif self._uses_udp_encap():
                # ESP in UDP: the rebuilt packet carries UDP checksum 0 (RFC 3948 §2.1)
                out.append(transports.UdpReceiver(NAT_T_PORT, name="esp-udp",
                                                  udp_checksum=False))
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

    def _uses_ike(self) -> bool:
        return self.cfg.role in ("mn", "gw") and self.cfg.daemon.sa_source == "ikev2"

    def _uses_udp_encap(self) -> bool:
        node = self.cfg.node
        mobiles = [node] if self.cfg.role == "mn" else list(node.mobiles)
        return any(m.esp_in is not None and (m.esp_in.udp_encap or m.esp_out.udp_encap)
                   for m in mobiles)

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

    # --- manual keys: sequence numbers and replay windows across restarts ---------------------

    def sequence_path(self) -> str:
        return os.path.join(self.cfg.daemon.state_dir, f"{self._name()}.seq.json")

    def _manual_pairs(self) -> list[tuple[Any, Any]]:
        """(SA object, its EspSaConfig) for every SA whose keys come from the file."""
        if self.cfg.role not in ("mn", "gw") or self.cfg.daemon.sa_source != "manual":
            return []
        node, pairs = self.cfg.node, []
        if self.cfg.role == "mn":
            pairs = [(self.role.inbound, node.esp_in), (self.role.outbound, node.esp_out)]
        else:
            for m in node.mobiles:
                mobile = self.role.mobiles.get(m.home_address)
                if mobile is not None and m.esp_in is not None:
                    pairs += [(mobile.inbound, m.esp_in), (mobile.outbound, m.esp_out)]
        return [(sa, esp) for sa, esp in pairs
                if sa is not None and esp is not None and sa.spi == esp.spi]

    def _attach_sequence_state(self) -> None:
        """docs/security.md §3.6: manual SAs continue their sequence numbers and replay windows
        after a restart (mipsec.io.seqstate)."""
        pairs = self._manual_pairs()
        if not pairs:
            return
        if self.seqstore is None:
            path = self.sequence_path()
            try:
                os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{self.cfg.path}: [daemon] state_dir: {exc}") from None
            self.seqstore = seqstate.SequenceStore(path)
        self.seqstore.attach(pairs)
        if self.seqstore.write_errors:
            raise ConfigError(f"{self.cfg.path}: [daemon] state_dir: cannot write "
                              f"{self.seqstore.path}: manual keys need it (sequence numbers "
                              f"across restarts)")

    # --- HA: the binding store (mipsec.store) ------------------------------------------------

    def store_path(self) -> str:
        d = self.cfg.daemon
        return os.path.join(d.state_dir, f"{self._name()}.bindings.sqlite3")

    def _open_store(self) -> Any:
        kind = self.cfg.daemon.store
        try:
            d = self.cfg.daemon
            return open_store(kind, self.store_path() if kind == "sqlite" else "", etcd=dict(
                endpoints=d.store_endpoints, prefix=d.store_prefix, ca_file=d.store_ca_file,
                cert_file=d.store_cert_file, key_file=d.store_key_file))
        except StoreError as exc:
            key = "store_endpoints" if kind == "etcd" else "state_dir"
            raise ConfigError(f"{self.cfg.path}: [daemon] {key}: {exc}") from None

    def _restore_bindings(self) -> None:
        """Start: the unexpired bindings back into the role, their routes and proxy ARP back
        into the kernel (the loop's BindingChanged hook)."""
        try:
            records = self.store.load(self._loop.wallclock())
            meta = self.store.meta()
        except StoreError as exc:     # unreadable (corrupt, not a database): say so, exit 2
            key = "store_endpoints" if self.cfg.daemon.store == "etcd" else "state_dir"
            raise ConfigError(f"{self.cfg.path}: [daemon] {key}: {exc}") from None
        actions = self.role.restore(records, meta, self._loop.clock())
        log.info("binding store %s: %d binding(s) restored%s",
                 self.store_path() if self.cfg.daemon.store == "sqlite" else
                 f"({self.cfg.daemon.store})",
                 len(actions), f", {self.store.skipped} unreadable row(s) left out"
                 if getattr(self.store, "skipped", 0) else "")
        self._loop.dispatch(actions)

    def _dispatch_persisting(self, actions: list[Any]) -> None:
        """Carry out the HA's actions; a ``PersistBinding`` or ``ReserveSiuSequence`` is
        written to the store first and synchronously, and if that fails the actions after it
        (up to the next one) are dropped: no reply leaves for a binding that is not on disk, no
        SIU with a number that is not reserved."""
        if not self.serving or (self.group is not None and not self.group.may_serve()):
            # a standby, or an active past its fence deadline: answer nothing
            self.standby_dropped += len(actions)
            return
        segment: list[Any] = []
        skipping = False
        for action in actions:
            kind = type(action)
            if kind is ReserveSiuSequence and skipping:
                # the binding write before it failed: the SIU it reserves for is dropped too
                self._loop.feed_event(SiuSequenceNotReserved(
                    action.gateway, action.expected, "the binding write before it failed"))
            elif kind is PersistBinding or kind is ReserveSiuSequence:
                if segment:
                    self._plain_dispatch(segment)
                    segment = []
                skipping = not (self._persist(action) if kind is PersistBinding
                                else self._reserve(action))
            elif not skipping:
                segment.append(action)
        if segment:
            self._plain_dispatch(segment)

    # --- HA group: one active among several (mipsec.io.hagroup) --------------------------------

    def _identity(self) -> str:
        return f"{self._name()}@{socket.gethostname()}/{os.getpid()}"

    def _start_group(self) -> None:
        from mipsec.io import hagroup
        from mipsec.node.election import HaElection
        d = self.cfg.daemon
        self.serving = False
        identity = self._identity()
        self.store.fence = identity
        tls = self.store._tls
        election = HaElection(identity, ttl_s=d.ha_lease_ttl_s, renew_every_s=d.ha_renew_every_s,
                              fence_margin_s=d.ha_fence_margin_s, now=time.monotonic())
        self.wakeup = hagroup.Wakeup()
        address = None
        if self.manage_kernel:
            address = hagroup.ServiceAddress(d.home_interface, self.cfg.node.address,
                                             self._service_prefixlen())
            address.drop()        # left by an earlier run killed while active: a standby has none
        self.group = hagroup.ElectionRunner(
            election, hagroup.election_store(d.store_endpoints, d.store_prefix, tls),
            self.wakeup, self._fence_now, address)
        self.watcher_thread = hagroup.StoreWatcher(
            hagroup.election_store(d.store_endpoints, d.store_prefix, tls),
            self.group.leader_seen)
        self._loop.add_reader(self.wakeup, self._on_group)
        log.info("HA group %s: %s starts as a standby", d.store_prefix, identity)
        self.watcher_thread.start()
        self.group.start()

    def _service_prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.cfg.node.home_prefix, strict=False).prefixlen

    def _fence_now(self, reason: str) -> None:
        """From the election thread, at once (after it removed the service address): nothing
        is answered, the proxy-ARP entries leave the home interface (its own netlink socket:
        the loop may be busy)."""
        self.serving = False
        d = self.cfg.daemon
        log.error("HA group: fenced (%s): service address %s removed, nothing answered",
                  reason, self.cfg.node.address)
        if not self.manage_kernel or not self._away:
            return
        nl = netlink.Netlink()
        try:
            for home in list(self._away):
                nl.del_proxy_arp(home, d.home_interface)
        finally:
            nl.close()

    def _on_group(self, wakeup: Any) -> None:
        from mipsec.node.election import StartServing, StopServing
        for item in wakeup.drain():
            if isinstance(item, StartServing):
                self._take_over()
            elif isinstance(item, StopServing) and not item.resign:
                log.error("HA group: lost the lease (%s): stopping, to come back as a standby",
                          item.reason)
                if self.nl is not None:
                    self.nl.undo_all()
                self._away.clear()
                self.exit_status = FENCED_EXIT_STATUS
                self._loop.stop(f"fenced: {item.reason}")

    def _take_over(self) -> None:
        from mipsec.io import hagroup
        node = self.cfg.node
        started = time.monotonic()
        wall = self._loop.wallclock()
        source = "warm copy"
        if self.watcher_thread.wait_revision(self.group.won_revision, hagroup.CATCH_UP_WAIT_S):
            records, meta, revision = self.watcher_thread.snapshot(wall)
        else:
            source = "store (the warm copy lagged)"
            try:
                records, meta = self.store.load(wall), self.store.meta()
            except StoreError as exc:
                log.error("HA group: cannot read the store at takeover (%s): resigning", exc)
                self.group.stop()
                self.exit_status = FENCED_EXIT_STATUS
                self._loop.stop("takeover failed")
                return
        actions = self.role.restore(records, meta, self._loop.clock())
        if self.manage_kernel:
            # the election thread added the service address (with its lifetime): announce it
            if self.announcer is not None:
                try:
                    self.announcer.announce(node.address)
                except OSError as exc:
                    log.warning("gratuitous ARP for %s failed: %s", node.address, exc)
        self.serving = True
        self._loop.dispatch(actions)
        log.info("HA group: active now; %d binding(s) from the %s, service address %s, in "
                 "%.1f ms", len(actions), source, node.address,
                 (time.monotonic() - started) * 1000)

    def _persist(self, action: PersistBinding) -> bool:
        meta = dict(action.meta)
        reason = ""
        try:
            if action.conditional:
                if not self.store.compare_and_swap(action.home_address, action.expected_care_of,
                                                   action.record, meta):
                    reason = (f"the store does not hold care-of {action.expected_care_of} for "
                              f"it (changed by someone else)")
            elif action.record is None:
                self.store.delete(action.home_address, meta)
            else:
                self.store.put(action.record, meta)
        except StoreError as exc:
            reason = str(exc)
        if not reason:
            return True
        self.store_errors += 1
        log.error("binding store: %s not stored: %s", action.home_address, reason)
        self._loop.feed_event(BindingNotStored(action.home_address, reason))
        return not action.required

    def _reserve(self, action: ReserveSiuSequence) -> bool:
        reason, stored = "", None
        try:
            if self.store.compare_and_swap_meta(action.key, action.expected,
                                                action.end.to_bytes(8, "big")):
                return True
            stored = self.store.meta().get(action.key)
            reason = "another home agent reserved numbers meanwhile"
        except StoreError as exc:
            reason = str(exc)
        self.store_errors += 1
        log.error("binding store: SIU numbers for %s not reserved: %s", action.gateway, reason)
        self._loop.feed_event(SiuSequenceNotReserved(action.gateway, stored, reason))
        return not action.required

    def _on_netlink(self, watcher: netlink.AddressWatcher) -> None:
        for event in watcher.receive():
            log.info("netlink: %s", event)
            self._loop.feed_event(event)

    # --- control commands ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        try:
            node = self.role.status()
        except Exception as exc:
            log.exception("BUG: role.status() raised")
            node = {"error": f"status failed: {exc}"}
        return {
            "ok": True, "role": self.cfg.role, "name": self._name(), "pid": os.getpid(),
            "config": self.cfg.path, "tun": getattr(self.tun, "name", None),
            "control_socket": self.cfg.control_socket,
            "pcap": self.cfg.daemon.pcap or None, "keyfile": self.cfg.keyfile or None,
            "ike_keyfile": self._ike_keyfile,
            "clock": {"monotonic": self._loop.clock(), "wall": self._loop.wallclock()},
            "started": self.started_wall,
            "io": {**self._loop.stats, "tun_write_errors": getattr(self.tun, "write_errors", 0),
                   "tun_read_errors": getattr(self.tun, "read_errors", 0),
                   "receive_errors": {r.name: r.errors for r in self.receivers or ()
                                      if getattr(r, "errors", 0)}},
            "drops": {str(k): v for k, v in getattr(self.role, "drops", {}).items()},
            **({"ha_group": {
                "state": self.group.election.state.value, "identity": self.group.election.identity,
                "serving": self.serving, "standby_dropped": self.standby_dropped,
                "warm_keys": len(self.watcher_thread.kv), "revision": self.watcher_thread.revision,
                "watch_reconnects": self.watcher_thread.reconnects,
                "history": self.group.election.history[-16:]}}
               if self.group is not None else {}),
            **({"store": {"kind": self.cfg.daemon.store, "errors": self.store_errors,
                          "path": self.store_path() if self.cfg.daemon.store == "sqlite"
                          else None}} if self.store is not None else {}),
            "node": _jsonable(node),
            "timeline": self.timeline(STATUS_TIMELINE_EVENTS),
        }

    def timeline(self, last: int | None = None, since: float | None = None
                 ) -> list[dict[str, Any]]:
        """The role's timeline as JSON-able dicts; only the ``last`` events, or those stamped
        at or after ``since`` (monotonic seconds), when given.  Serialising a long-running
        daemon's whole timeline took seconds in the loop, and each whole copy raised the
        process's memory high-water mark with the timeline: pollers ask for what is new."""
        events = getattr(self.role, "timeline", [])
        if not isinstance(events, list):
            events = list(events)
        if since is not None:
            start = len(events)
            while start > 0 and events[start - 1].time >= since:
                start -= 1
            events = events[start:]
        if last is not None:
            events = events[-last:] if last > 0 else []
        return [_jsonable(ev) for ev in events]

    def _timeline_command(self, args: list[str]) -> dict[str, Any]:
        """``timeline`` (all), ``timeline last <n>``, ``timeline since <monotonic seconds>``."""
        kw: dict[str, Any] = {}
        try:
            if len(args) % 2:
                raise ValueError(args[-1])
            for key, value in zip(args[::2], args[1::2], strict=True):
                if key == "last":
                    kw["last"] = int(value)
                elif key == "since":
                    kw["since"] = float(value)
                else:
                    raise ValueError(key)
        except ValueError:
            return {"ok": False, "error": "usage: timeline [last <n>] [since <monotonic seconds>]"}
        return {"ok": True, "timeline": self.timeline(**kw),
                "clock": {"monotonic": self._loop.clock(), "wall": self._loop.wallclock()}}

    def handle_command(self, command: str, args: list[str]) -> dict[str, Any]:
        if command == "status":
            return self.status()
        if command == "timeline":
            return self._timeline_command(args)
        if command == "handover":
            if self.cfg.role != "mn":
                return {"ok": False, "error": "handover: only a mobile node moves"}
            if not args:
                return {"ok": False, "error": "usage: handover <care-of address> [interface]"}
            try:
                ipaddress.IPv4Address(args[0])
            except ValueError:
                return {"ok": False, "error": f"handover: not an IPv4 address: {args[0]!r}"}
            self._loop.feed_event(CareOfAddressChanged(args[0], args[1] if len(args) > 1 else None))
            return {"ok": True, "handover": args[0]}
        if command == "home":
            if self.cfg.role != "mn":
                return {"ok": False, "error": "home: only a mobile node returns home"}
            self._loop.feed_event(ReturnedHome(args[0] if args else self.cfg.daemon.home_interface
                                              or None))
            return {"ok": True}
        if command == "ping":
            return {"ok": True, "pid": os.getpid()}
        if command == "reload":
            return self.reload()
        return {"ok": False, "error": f"unknown command {command!r} "
                                      f"(status, timeline, handover, home, ping, reload)"}

    # --- run / close ---------------------------------------------------------------------------

    # --- reload ----------------------------------------------------------------------------------

    # [daemon] keys a running daemon takes from a new file; the others need a restart
    RELOADABLE_DAEMON_KEYS = frozenset({"log_level", "log_format"})

    def reload(self) -> dict[str, Any]:
        """SIGHUP / ``mipsec reload``: re-read the file and apply what changed (only that, see
        mipsec.node.reload).  A file that does not load, or a change that needs a restart, is
        refused with its message and the running configuration stays."""
        from mipsec.node.reload import NeedsRestart, reconfigure
        path = self.cfg.path
        try:
            new = load_config(path, require_private=True)
            if new.metrics != self.cfg.metrics:
                raise ConfigError(f"{path}: [metrics] changed: that needs a restart")
            if new.role != self.cfg.role:
                raise ConfigError(f"{path}: role: the file is now for {new.role!r}, the running "
                                  f"daemon is {self.cfg.role!r}")
            for f in dataclasses.fields(new.daemon):
                if f.name not in self.RELOADABLE_DAEMON_KEYS and \
                        getattr(new.daemon, f.name) != getattr(self.cfg.daemon, f.name):
                    raise ConfigError(f"{path}: [daemon] {f.name} changed: that needs a restart")
            actions, changes = reconfigure(self.role, new.node, self._loop.clock())
        except (ConfigError, NeedsRestart) as exc:
            message = str(exc) if str(exc).startswith(path) else f"{path}: {exc}"
            log.error("reload refused, the running configuration stays: %s", message)
            return {"ok": False, "error": f"reload refused: {message}"}
        old_daemon = self.cfg.daemon
        self.cfg = new
        try:
            self._attach_sequence_state()     # SAs a reload installed continue like the others
        except ConfigError as exc:
            log.error("%s", exc)
        if (new.daemon.log_level, new.daemon.log_format) != (old_daemon.log_level,
                                                             old_daemon.log_format):
            logs.configure(self.log_format_override or new.daemon.log_format,
                           self.log_level_override or new.daemon.log_level)
            changes.append("logging")
        if actions:
            self._loop.dispatch(actions)
        if new.keyfile and changes:
            added = [e for e in esp_entries(new) if e.spi not in self._esp_keys]
            if added:
                for entry in added:
                    self._esp_keys.add(entry.spi, entry.uat_line(), self._key_rotation)
                try:
                    pcapmod.write_esp_sa_file(new.keyfile,
                                              [line for line in self._esp_keys.lines() if line])
                except OSError as exc:
                    log.warning("key file %s: %s", new.keyfile, exc)
        log.info("%s %s reloaded %s: %s", new.role, self._name(), path,
                 "; ".join(changes) or "nothing changed")
        return {"ok": True, "changes": changes}

    def run(self) -> str:
        self._loop.on_reload = self.reload
        self._loop.install_signal_handlers()
        log.info("%s %s running (pid %d, tun %s, control %s)", self.cfg.role, self._name(),
                 os.getpid(), self.tun.name, self.cfg.control_socket)
        reason = self._loop.run()
        log.info("%s %s stopping: %s", self.cfg.role, self._name(), reason)
        return reason

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # in this order, each step whatever the ones before did
        steps: list[Callable[[], object] | None] = [
            self.seqstore.close if self.seqstore else None,
            self.nl.undo_all if self.nl else None,
            self.forward_filter.remove if self.forward_filter else None,
            self.sysctls.restore,
            self.nl.close if self.nl else None,
            self.watcher.close if self.watcher else None,
            self.announcer.close if self.announcer else None,
            self.control.close if self.control else None,
            self.metrics.close if self.metrics else None,
            self.loop.close if self.loop else None,
            *(r.close for r in self.receivers or ()),
            self.sender.close if self.sender else None,
            self.tun.close if self.tun else None,
            self.pcap.close if self.pcap else None,
            self.store.close if self.store else None,
            self.locks.release]
        for closer in steps:
            if closer is None:
                continue
            try:
                closer()
            except Exception as exc:
                log.warning("shutdown step failed: %s", exc)


def run_daemon(config_path: str, expected_role: str, log_level: str | None = None,
               log_format: str | None = None) -> int:
    """Entry point of ``mipsec mn|gw|ha``: exit status 0 on a clean stop, 2 on bad config."""
    try:
        cfg = load_config(config_path, require_private=True)
        if cfg.role != expected_role:
            raise ConfigError(f"{config_path}: role: the file is for {cfg.role!r}, "
                              f"not {expected_role!r}")
    except ConfigError as exc:
        logging.getLogger("mipsec").error("%s", exc)
        return 2
    logs.configure(log_format or cfg.daemon.log_format, log_level or cfg.daemon.log_level)
    daemon = Daemon(cfg)
    daemon.log_level_override, daemon.log_format_override = log_level, log_format
    try:
        daemon.start()
    except ConfigError as exc:
        logging.getLogger("mipsec").error("%s", exc)
        daemon.close()
        return 2
    except OSError as exc:     # not root, a port in use, /dev/net/tun missing ...
        logging.getLogger("mipsec").error("%s: cannot start the %s daemon: %s (it needs root, or "
                                          "CAP_NET_ADMIN and CAP_NET_RAW)", config_path,
                                          cfg.role, exc)
        daemon.close()
        return 1
    try:
        daemon.run()
    finally:
        daemon.close()
    return daemon.exit_status
