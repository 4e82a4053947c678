"""What a GW or HA lets its kernel forward: per-interface sysctls and a netfilter second layer.

A security gateway is not a router (docs/security.md §3.1).  Linux decides whether a packet may
be forwarded by the ``forwarding`` flag of the interface it *arrived on*
(``net.ipv4.conf.<in>.forwarding``); the global ``net.ipv4.ip_forward`` only writes every
interface's flag at once.  So the daemons never switch on forwarding for the whole machine: they
set it per interface, on the interfaces that must forward (their TUN device, the GW's inside and
the HA's home interface) and, at the GW, off on the outside interface.

``Sysctls`` writes those values, reads each back (a value that does not read back is a failure,
not a warning), remembers what it changed and restores exactly that, in reverse order, at exit.

``ForwardFilter`` is the second layer at the GW: an nftables table of the daemon's own that drops
every packet arriving on the outside interface in the forward hook, whatever the sysctls say (a
later ``sysctl net.ipv4.ip_forward=1`` re-enables forwarding on every interface), and packets from
the outside addressed to the GW's inside address.  It needs the ``nft`` command (Debian package
``nftables``) and nf_tables in the kernel; without them the daemon logs that only the sysctl layer
protects it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess

log = logging.getLogger("mipsec.io.hostguard")

PROC_SYS = "/proc/sys"
NFT = "nft"
# Before the default filter chains (priority 0): our drops are seen whatever else is loaded.
NFT_PRIORITY = -10


class HostSetupError(OSError):
    """A host protection could not be set or verified; ``str()`` says which and why."""


def conf_key(ifname: str, key: str) -> str:
    """The sysctl name of an interface setting (a name may hold dots: eth0.100)."""
    return f"net.ipv4.conf.{ifname}.{key}"


def _path(name: str, root: str) -> str:
    # net.ipv4.conf.<if>.<key>: the interface part may contain dots, which stay dots in /proc.
    parts = name.split(".")
    if len(parts) >= 5 and parts[:3] in (["net", "ipv4", "conf"], ["net", "ipv4", "neigh"]):
        parts = parts[:3] + [".".join(parts[3:-1]), parts[-1]]
    return os.path.join(root, *parts)


class Sysctls:
    """Set-and-verify of /proc/sys values with an exact undo (see module doc)."""

    def __init__(self, root: str = PROC_SYS):
        self.root = root
        self.changed: list[tuple[str, str]] = []   # (name, value before), in the order changed

    def read(self, name: str) -> str:
        with open(_path(name, self.root)) as f:
            return f.read().strip()

    def _write(self, name: str, value: str) -> None:
        with open(_path(name, self.root), "w") as f:
            f.write(f"{value}\n")

    def ensure(self, name: str, value: int | str) -> None:
        """Make ``name`` read ``value``; raises HostSetupError if it cannot or does not stick."""
        want = str(value)
        try:
            before = self.read(name)
            if before != want:
                self._write(name, want)
                self.changed.append((name, before))
            now = self.read(name)
        except OSError as exc:
            raise HostSetupError(f"cannot set {name} = {want}: "
                                 f"{exc.strerror or exc}") from None
        if now != want:
            raise HostSetupError(f"{name} reads {now!r} after writing {want!r}")

    def restore(self) -> list[str]:
        """Put back every value this object changed (newest first); returns what it restored.
        A value whose interface is gone (the daemon's TUN device) is skipped."""
        done = []
        for name, before in reversed(self.changed):
            try:
                self._write(name, before)
                done.append(f"{name}={before}")
            except OSError as exc:
                log.debug("restore %s=%s: %s", name, before, exc)
        self.changed.clear()
        return done


def interface_of(address: str) -> str:
    """The interface that holds the IPv4 ``address`` in this namespace; HostSetupError when none
    or several do."""
    from mipsec.io.netlink import current_addresses
    # an address label (eth0:1) names its interface before the colon
    holders = sorted({ifname.split(":")[0] for ifname, addr in current_addresses()
                      if addr == address and ifname})
    if not holders:
        raise HostSetupError(f"no interface has the address {address}")
    if len(holders) > 1:
        raise HostSetupError(f"the address {address} is on several interfaces "
                             f"({', '.join(holders)})")
    return holders[0]


class ForwardFilter:
    """The GW's nftables table: nothing from ``outside`` is forwarded, and nothing from it reaches
    ``inside_address`` (which Linux would otherwise deliver locally: the weak host model)."""

    def __init__(self, table: str, outside: str, inside_address: str, nft: str | None = None):
        self.table = "".join(c if c.isalnum() else "_" for c in table)
        self.outside = outside
        self.inside_address = inside_address
        self.nft = nft or shutil.which(NFT) or (f"/usr/sbin/{NFT}"
                                                if os.path.exists(f"/usr/sbin/{NFT}") else None)
        self.installed = False

    def ruleset(self) -> str:
        socket.inet_aton(self.inside_address)       # an address, never text for nft to parse
        ifname = self.outside.replace('"', "")
        return (f"table ip {self.table} {{\n"
                f"  chain forward {{ type filter hook forward priority {NFT_PRIORITY}; "
                f"policy accept;\n"
                f"    iifname \"{ifname}\" counter drop\n  }}\n"
                f"  chain input {{ type filter hook input priority {NFT_PRIORITY}; "
                f"policy accept;\n"
                f"    iifname \"{ifname}\" ip daddr {self.inside_address} counter drop\n  }}\n"
                f"}}\n")

    def _run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        if self.nft is None:
            raise HostSetupError("the nft command is not installed (Debian package nftables)")
        return subprocess.run([self.nft, *args], input=stdin, capture_output=True, text=True,
                              timeout=10)

    def install(self) -> None:
        """Load the table (replacing one a killed daemon left) and check it is there; raises
        HostSetupError when nft is missing or refuses."""
        if self.nft is None:
            raise HostSetupError("the nft command is not installed (Debian package nftables)")
        self._run("delete", "table", "ip", self.table)          # left over by a killed daemon
        proc = self._run("-f", "-", stdin=self.ruleset())
        if proc.returncode != 0:
            raise HostSetupError(f"nft: {proc.stderr.strip() or proc.returncode}")
        self.installed = True
        check = self._run("list", "table", "ip", self.table)
        if check.returncode != 0 or f'iifname "{self.outside}"' not in check.stdout:
            raise HostSetupError(f"nft: table ip {self.table} is not loaded as written")

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            proc = self._run("delete", "table", "ip", self.table)
            if proc.returncode != 0:
                log.warning("nft delete table ip %s: %s", self.table, proc.stderr.strip())
