"""One daemon per role instance, and what the machine must have before a daemon starts.

**Locks.**  A daemon holds an exclusive ``flock(2)`` for its whole life on:

* ``<control socket>.lock``: the instance itself (two daemons with one control socket);
* with kernel wiring, one lock per kernel resource it creates, per network namespace (the lab
  runs daemons of the same role in several namespaces): its TUN name, at the GW the policy
  routing rule priority and the routing table, and every UDP port it binds (434, 500, 4500,
  4343: a second SO_REUSEADDR bind would succeed and silently take the first one's datagrams).
  They live in ``/run/mipsec/locks``, named ``<netns inode>-<resource>.lock``.

A lock held by another process is a conflict: the daemon refuses to start (``ConfigError``: exit
status 2) with the file, the key, the resource and the pid and configuration of the holder
(written into the lock file).  A free lock whose resource exists anyway (an ip rule at our
priority, routes in our table) means it is not a mipsec daemon's, or one killed with SIGKILL left
it: the daemon refuses to take over anything that differs from what it would create, so that it
never removes what it did not create.  The kernel releases the locks when the process ends,
however it ends.

**Machine checks** (``check_machine``): every address the daemon binds must be on this machine
(GW ``inside_address`` / ``outside_address``, HA ``address``), the TUN name must be free, and
the directories of the capture and key files must exist.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Any

from mipsec.constants import IKE_PORT, MIP_PORT, NAT_T_PORT, SIU_PORT
from mipsec.errors import ConfigError

LOCK_DIR = "/run/mipsec/locks"


def _where(cfg: Any, table: str, key: str) -> str:
    return f"{cfg.path}: [{table}] {key}"


def netns_id() -> str:
    """This network namespace's identity (the inode of /proc/self/ns/net)."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "0"


class Locks:
    """Exclusive flocks held until ``release()`` (or the process ends)."""

    def __init__(self, owner: str):
        self.owner = owner                   # written into each lock file: "pid N, config F"
        self._fds: list[tuple[str, int]] = []

    def acquire(self, path: str, problem: str) -> None:
        """Lock ``path`` or raise ``ConfigError(problem + who holds it)``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{problem}: held by another mipsec daemon ({holder}); stop it "
                              f"or change this setting") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.owner.encode(), 0)
        self._fds.append((path, fd))

    def release(self) -> None:
        for _path, fd in reversed(self._fds):
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)                      # the lock file stays: removing it would race
        self._fds.clear()


def claim_instance(cfg: Any, locks: Locks) -> None:
    """The control-socket lock: one daemon per instance."""
    locks.acquire(cfg.control_socket + ".lock",
                  f"{_where(cfg, 'daemon', 'control_socket')}: {cfg.control_socket} is in use")


def claim_kernel_resources(cfg: Any, locks: Locks, lock_dir: str = LOCK_DIR) -> None:
    """The per-namespace kernel resources this daemon creates (see the module doc)."""
    ns = netns_id()
    d = cfg.daemon
    locks.acquire(os.path.join(lock_dir, f"{ns}-tun-{d.tun}.lock"),
                  f"{_where(cfg, 'daemon', 'tun')}: TUN device {d.tun!r}")
    if cfg.role == "gw":
        locks.acquire(os.path.join(lock_dir, f"{ns}-rule-{d.rule_priority}.lock"),
                      f"{_where(cfg, 'daemon', 'rule_priority')}: ip rule priority "
                      f"{d.rule_priority}")
        locks.acquire(os.path.join(lock_dir, f"{ns}-table-{d.route_table}.lock"),
                      f"{_where(cfg, 'daemon', 'route_table')}: routing table {d.route_table}")
        _check_gw_policy_routing(cfg)
    for port, table, key in udp_ports(cfg):
        # UDP sockets bound with SO_REUSEADDR share a port silently (the last one gets the
        # datagrams): a second daemon must be refused here, not discovered by lost packets
        locks.acquire(os.path.join(lock_dir, f"{ns}-udp-{port}.lock"),
                      f"{_where(cfg, table, key)}: UDP port {port}")




def udp_ports(cfg: Any) -> list[tuple[int, str, str]]:
    """(port, table, key) of every UDP port the daemon binds (mipsec.io.daemon's receivers)."""
    d, node = cfg.daemon, cfg.node
    out: list[tuple[int, str, str]] = []
    if cfg.role in ("mn", "gw"):
        if d.sa_source == "ikev2":
            out += [(IKE_PORT, "daemon", "sa_source"), (NAT_T_PORT, "daemon", "sa_source")]
        else:
            mobiles = [node] if cfg.role == "mn" else list(node.mobiles)
            if any(m.esp_in is not None and (m.esp_in.udp_encap or m.esp_out.udp_encap)
                   for m in mobiles):
                out.append((NAT_T_PORT, "daemon", "sa_source"))
    if cfg.role == "mn":
        out.append((MIP_PORT, "mobile_node", "home_address"))
    elif cfg.role == "gw":
        out.append((SIU_PORT, "gateway", "inside_address"))
    else:
        out += [(MIP_PORT, "home_agent", "address"), (SIU_PORT, "home_agent", "address")]
    return out


def _check_gw_policy_routing(cfg: Any) -> None:
    """Our (free) priority holds no foreign rule and our table no routes of someone else."""
    from pyroute2 import IPRoute

    d = cfg.daemon
    with IPRoute() as ipr:
        for rule in ipr.get_rules(family=socket.AF_INET):
            if rule.get_attr("FRA_PRIORITY") != d.rule_priority:
                continue
            table = rule.get_attr("FRA_TABLE") or rule["table"]
            iif = rule.get_attr("FRA_IIFNAME")
            if table != d.route_table or iif != d.inside_interface:
                raise ConfigError(
                    f"{_where(cfg, 'daemon', 'rule_priority')}: ip rule priority "
                    f"{d.rule_priority} is taken (iif {iif} lookup {table}), not by a mipsec "
                    f"daemon; choose a free priority")
        routes = ipr.get_routes(family=socket.AF_INET, table=d.route_table)
        foreign = [r for r in routes if (r.get_attr("RTA_TABLE") or r["table"]) == d.route_table]
        if foreign:
            raise ConfigError(
                f"{_where(cfg, 'daemon', 'route_table')}: routing table {d.route_table} already "
                f"holds {len(foreign)} route(s), not a mipsec daemon's; choose a free table")


def _is_local(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def check_machine(cfg: Any) -> None:
    """What the machine must have before anything is created (see the module doc)."""
    d, node = cfg.daemon, cfg.node
    section = {"mn": "mobile_node", "gw": "gateway", "ha": "home_agent"}[cfg.role]
    keys = {"gw": ("outside_address", "inside_address"), "ha": ("address",)}.get(cfg.role, ())
    if cfg.role == "ha" and getattr(d, "ha_group", False):
        keys = ()      # the service address: only the active HA of a group holds it
    for key in keys:
        address = getattr(node, key)
        if not _is_local(address):
            raise ConfigError(f"{_where(cfg, section, key)}: {address} is not an address of "
                              f"this machine (ip -4 addr shows this namespace's addresses)")
    try:
        socket.if_nametoindex(d.tun)
    except OSError:
        pass
    else:
        raise ConfigError(f"{_where(cfg, 'daemon', 'tun')}: interface {d.tun!r} already exists "
                          f"(another daemon's TUN device?); choose another name")
    for key, path in (("pcap", d.pcap), ("keyfile", cfg.keyfile)):
        if not path:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ConfigError(f"{_where(cfg, 'daemon', key)}: directory {directory} does not "
                              f"exist (create it, or change the path)")
