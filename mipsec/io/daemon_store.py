"""The home agent daemon's persistence (``mipsec.store``) and HA group membership
(``mipsec.io.hagroup``): bindings restored at start, every ``PersistBinding`` and
``ReserveSiuSequence`` written synchronously before the actions after it are carried out, and
the election's take-over and fencing."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from typing import Any

from mipsec.errors import ConfigError
from mipsec.io import netlink
from mipsec.io.daemon_state import DaemonState
from mipsec.node.actions import (
    BindingNotStored,
    PersistBinding,
    ReserveSiuSequence,
    SiuSequenceNotReserved,
)
from mipsec.store import StoreError

log = logging.getLogger("mipsec.daemon")

FENCED_EXIT_STATUS = 3         # an HA group member that lost its lease: restart it (standby)


class HaStore(DaemonState):
    """The HA's binding store and its place in an HA group."""

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

    # The loop carries out the HA's actions through these (``EventLoop.admit`` and ``steps``): a
    # ``PersistBinding`` or ``ReserveSiuSequence`` is written to the store first and
    # synchronously, and if that fails the actions after it (up to the next one) are dropped: no
    # reply leaves for a binding that is not on disk, no SIU with a number that is not reserved.

    def _admit(self, actions: list[Any]) -> bool:
        if not self.serving or (self.group is not None and not self.group.may_serve()):
            # a standby, or an active past its fence deadline: answer nothing
            self.standby_dropped += len(actions)
            return False
        return True

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

    def _persist(self, action: PersistBinding, after_failure: bool = False) -> bool:
        """Write one binding change (whatever happened before it: a new decision)."""
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

    def _reserve(self, action: ReserveSiuSequence, after_failure: bool = False) -> bool:
        """Reserve a block of SIU numbers, unless the binding write before it failed (then the
        SIU it reserves for is dropped too)."""
        if after_failure:
            self._loop.feed_event(SiuSequenceNotReserved(
                action.gateway, action.expected, "the binding write before it failed"))
            return False
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
