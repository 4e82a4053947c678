"""Several HAs for one home network: the election and the warm copy over etcd (the I/O side).

``mipsec.node.election`` decides (sans-I/O); this module talks to etcd and to the kernel:

* ``ElectionRunner``, a thread with its own etcd connection: it drives ``HaElection`` with the
  monotonic clock, carries out ``Campaign`` (is the leader key there? if not: grant a lease,
  create the key only if absent), ``RenewLease`` (one keep-alive) and, on ``StopServing``,
  **fences at once from the thread**: the service address and every proxy-ARP entry go from the
  home interface before anything else happens, whatever the main loop is doing (it may be
  waiting on a store write).  Then it hands ``StartServing`` / ``StopServing`` to the daemon's
  loop through a pipe.  Every request it makes is bounded so that it never sleeps past the
  fence deadline.
* ``StoreWatcher``, a thread that keeps a warm copy of every key under the group's prefix: one
  range read, then an etcd v3 watch (``POST /v3/watch``, a stream of JSON objects over the JSON
  gateway) from the next revision; on any error it reads the range again and watches anew
  (another member).  It tells the election when the leader key changes, so a standby campaigns
  the moment the key is deleted instead of at its next period.

The daemon (``mipsec.io.daemon``, ``ha_group = true``) starts every HA as a standby: sockets
and TUN open, no service address, nothing answered.  On ``StartServing`` it waits until the
warm copy has caught up with the revision of its own leader key (so it holds everything the
old active wrote before it lost its lease; a standby falls back to reading the store when the
copy lags), restores the role from it (bindings, MN-HA identification state, SIU sequence
mark), adds the service address, announces it with a gratuitous ARP, installs each binding's
route and proxy-ARP entry (with a gratuitous ARP per home address) and serves.  On
``StopServing`` (fenced) it removes the rest of its kernel state and exits with status 3: a
supervisor (systemd ``Restart=on-failure``, or the lab) starts it again as a standby, with an
empty role.  A clean stop resigns: the lease is revoked, so a standby takes over at once.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from mipsec.node.election import (
    Campaign,
    HaElection,
    RenewLease,
    StartServing,
    StopServing,
)
from mipsec.store.etcd import EtcdStore, _prefix_end
from mipsec.store.record import BindingRecord, StoreError

log = logging.getLogger("mipsec.hagroup")

WATCH_RECONNECT_S = 0.2         # after a watch stream failed, before reading the range again
CATCH_UP_WAIT_S = 0.3           # at takeover: how long the warm copy may take to catch up
REQUEST_TIMEOUT_S = 0.2         # one election request to one member


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Wakeup:
    """A pipe the threads write one byte to; the daemon's loop reads it (``add_reader``)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.items: queue.Queue[Any] = queue.Queue()

    def fileno(self) -> int:
        return self._r

    def post(self, item: Any) -> None:
        self.items.put(item)
        try:
            os.write(self._w, b"!")
        except (BlockingIOError, OSError):
            pass

    def drain(self) -> list[Any]:
        try:
            while os.read(self._r, 512):
                pass
        except (BlockingIOError, OSError):
            pass
        out = []
        while True:
            try:
                out.append(self.items.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class ServiceAddress:
    """The HA service address on the home interface, held with a kernel lifetime.

    Added (and refreshed after every renewal of the lease) with ``valid_lft`` = the whole
    seconds left before the fence deadline, so that if the daemon dies without fencing (kill -9)
    the kernel itself removes the address about when the lease expires: a dead HA's machine
    does not keep answering ARP for it.  Its own netlink socket: the election thread uses it."""

    def __init__(self, ifname: str, address: str, prefixlen: int):
        from pyroute2 import IPRoute
        self.ifname, self.address, self.prefixlen = ifname, address, prefixlen
        self._ipr = IPRoute()

    def _index(self) -> int:
        found = self._ipr.link_lookup(ifname=self.ifname)
        if not found:
            raise OSError(f"no interface {self.ifname}")
        return int(found[0])

    def hold(self, valid_s: float) -> None:
        life = max(1, int(valid_s))
        self._ipr.addr("replace", index=self._index(), address=self.address,
                       prefixlen=self.prefixlen,
                       IFA_CACHEINFO={"ifa_preferred": life, "ifa_valid": life,
                                      "cstamp": 0, "tstamp": 0})

    def drop(self) -> None:
        try:
            self._ipr.addr("del", index=self._index(), address=self.address,
                           prefixlen=self.prefixlen)
        except Exception as exc:          # not there: fine
            log.debug("del %s on %s: %s", self.address, self.ifname, exc)

    def close(self) -> None:
        self._ipr.close()


class StoreWatcher(threading.Thread):
    """The warm copy: every key under the prefix and its value, at ``revision``."""

    def __init__(self, store: EtcdStore, on_leader: Callable[[str | None, int], None]):
        super().__init__(name="ha-watch", daemon=True)
        self._store = store                 # its own connection (a store is one thread's)
        self._on_leader = on_leader
        self._prefix = (store.prefix + "/").encode()
        self.kv: dict[bytes, bytes] = {}
        self.revision = 0
        self.lock = threading.Condition()
        self.reconnects = 0
        self._stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync_and_watch()
            except (OSError, ValueError, http.client.HTTPException, StoreError) as exc:
                if self._stop.is_set():
                    return
                self.reconnects += 1
                log.info("store watch: %s; reading the range again", exc or type(exc).__name__)
                self._stop.wait(WATCH_RECONNECT_S)

    def _leader(self) -> str | None:
        value = self.kv.get(self._store.leader_key)
        return value.decode(errors="replace") if value is not None else None

    def _sync_and_watch(self) -> None:
        start, end = self._prefix, _prefix_end(self._prefix)
        answer = self._store._call("/v3/kv/range", {"key": _b64(start), "range_end": _b64(end)})
        kv = {base64.b64decode(x["key"]): base64.b64decode(x.get("value", ""))
              for x in answer.get("kvs", [])}
        revision = int(answer.get("header", {}).get("revision", 0))
        with self.lock:
            before = self._leader()
            self.kv, self.revision = kv, revision
            self.lock.notify_all()
        if self._leader() != before or before is None:
            self._on_leader(self._leader(), revision)
        scheme, host, port = self._store._endpoints[self._store._current]
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, context=self._store._ssl, timeout=None)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=None)
        self._conn = conn
        try:
            body = {"create_request": {"key": _b64(start), "range_end": _b64(end),
                                       "start_revision": str(revision + 1)}}
            conn.request("POST", "/v3/watch", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise OSError(f"watch: HTTP {resp.status}")
            while not self._stop.is_set():
                line = resp.readline()
                if not line:
                    raise OSError("watch stream ended")
                if line.strip():
                    self._apply(json.loads(line))
        finally:
            self._conn = None
            conn.close()

    def _apply(self, message: dict) -> None:
        result = message.get("result", message)
        if "error" in message:
            raise OSError(f"watch: {message['error']}")
        if result.get("canceled") or result.get("compact_revision"):
            raise OSError("watch canceled (compacted?)")
        events = result.get("events") or []
        revision = int(result.get("header", {}).get("revision", 0))
        leader_changed = False
        with self.lock:
            for ev in events:
                kv = ev.get("kv", {})
                key = base64.b64decode(kv.get("key", ""))
                if ev.get("type") == "DELETE":
                    self.kv.pop(key, None)
                else:
                    self.kv[key] = base64.b64decode(kv.get("value", ""))
                leader_changed |= key == self._store.leader_key
            if events:
                revision = max(revision, max(int(ev.get("kv", {}).get("mod_revision", 0))
                                             for ev in events))
            self.revision = max(self.revision, revision)
            self.lock.notify_all()
        if leader_changed:
            self._on_leader(self._leader(), self.revision)

    def wait_revision(self, revision: int, timeout: float) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: self.revision >= revision, timeout)

    def snapshot(self, now_wall: float) -> tuple[list[BindingRecord], dict[str, bytes], int]:
        """The warm copy as ``load`` and ``meta`` would give it, and its revision."""
        binding = (self._store.prefix + "/binding/").encode()
        meta = (self._store.prefix + "/meta/").encode()
        with self.lock:
            items, revision = list(self.kv.items()), self.revision
        records, metadata = [], {}
        for key, value in items:
            if key.startswith(binding):
                try:
                    rec = BindingRecord.from_json(value)
                except (ValueError, TypeError, KeyError):
                    continue
                if rec.home_address == key[len(binding):].decode(errors="replace") \
                        and not rec.expired(now_wall):
                    records.append(rec)
            elif key.startswith(meta):
                metadata[key[len(meta):].decode()] = value
        return sorted(records, key=lambda r: r.home_address), metadata, revision


class ElectionRunner(threading.Thread):
    """Drives ``HaElection`` against etcd (see the module doc)."""

    def __init__(self, election: HaElection, store: EtcdStore, wakeup: Wakeup,
                 fence_now: Callable[[str], None], address: ServiceAddress | None = None):
        super().__init__(name="ha-election", daemon=True)
        self.election = election
        self.address = address
        self._store = store                 # its own connection, short timeouts
        self._wakeup = wakeup
        self._fence_now = fence_now
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.lease: str | None = None
        self.won_revision = 0
        self.lock = threading.Lock()        # the daemon reads may_serve() from its loop
        self._stopped = threading.Event()

    def leader_seen(self, holder: str | None, revision: int) -> None:
        self._inbox.put(("leader", (holder, revision)))

    def stop(self) -> None:
        self._inbox.put(("stop", None))
        self._stopped.wait(2.0)

    def may_serve(self) -> bool:
        with self.lock:
            return self.election.may_serve(time.monotonic())

    def run(self) -> None:
        try:
            while True:
                with self.lock:
                    timer = self.election.get_timer()
                wait = None if timer is None else max(0.0, timer - time.monotonic())
                try:
                    kind, value = self._inbox.get(timeout=wait)
                except queue.Empty:
                    kind, value = "timer", None
                now = time.monotonic()
                with self.lock:
                    if kind == "stop":
                        actions = self.election.stop(now)
                    elif kind == "leader":
                        actions = self.election.leader_seen(value[0], now, value[1])
                    else:
                        actions = self.election.handle_timer(now)
                self._carry_out(actions)
                if kind == "stop":
                    return
        except Exception:
            log.exception("BUG: the election thread failed; fencing")
            self._fence_now("the election thread failed")
            self._wakeup.post(StopServing("the election thread failed"))
        finally:
            self._stopped.set()

    def _bounded(self) -> None:
        """Never wait on etcd past the fence deadline (with a little room to fence)."""
        left = self.election.serve_until - time.monotonic() - 0.1 \
            if self.election.serving else 0.5
        self._store.deadline_s = max(0.05, min(0.5, left))

    def _carry_out(self, actions: list[object]) -> None:
        for action in actions:
            if isinstance(action, Campaign):
                self._campaign(action)
            elif isinstance(action, RenewLease):
                self._renew()
            elif isinstance(action, StopServing):
                # fence first, from this thread: nothing of ours may answer any more
                if self.address is not None:
                    self.address.drop()
                self._fence_now(action.reason)
                if action.resign:
                    self._revoke()
                self._wakeup.post(action)
            elif isinstance(action, StartServing):
                self._hold_address()
                self._wakeup.post(action)

    def _hold_address(self) -> None:
        if self.address is None:
            return
        try:
            self.address.hold(self.election.serve_until - time.monotonic())
        except Exception as exc:
            log.error("service address %s: %s", self.address.address, exc)

    def _campaign(self, action: Campaign) -> None:
        key = _b64(self._store.leader_key)
        self._bounded()
        sent_at = time.monotonic()
        won = False
        try:
            present = self._store._call("/v3/kv/range", {"key": key, "count_only": True})
            if int(present.get("count", 0)) == 0:
                sent_at = time.monotonic()      # the lease's TTL counts from the grant
                grant = self._store._call("/v3/lease/grant", {"TTL": math.ceil(action.ttl_s)})
                lease = str(grant["ID"])
                answer = self._store._call("/v3/kv/txn", {
                    "compare": [{"key": key, "target": "CREATE", "result": "EQUAL",
                                 "create_revision": "0"}],
                    "success": [{"request_put": {"key": key, "lease": lease,
                                                 "value": _b64(action.identity.encode())}}]})
                won = bool(answer.get("succeeded"))
                if won:
                    self.lease = lease
                    self.won_revision = int(answer.get("header", {}).get("revision", 0))
                else:
                    self._revoke(lease)
        except (StoreError, KeyError, ValueError) as exc:
            log.debug("campaign: %s", exc)
        with self.lock:
            actions = self.election.campaign_result(won, sent_at, time.monotonic(),
                                                    self.won_revision if won else 0)
        if won:
            log.info("HA group: elected active (%s, lease %s)", action.identity, self.lease)
        self._carry_out(actions)

    def _renew(self) -> None:
        self._bounded()
        sent_at = time.monotonic()
        alive: bool | None
        try:
            answer = self._store._call("/v3/lease/keepalive", {"ID": self.lease})
            result = answer.get("result", answer)
            alive = int(result.get("TTL", 0) or 0) > 0
        except (StoreError, ValueError) as exc:
            log.debug("keep-alive: %s", exc)
            alive = None
        with self.lock:
            actions = self.election.renew_result(alive, sent_at, time.monotonic())
        if alive and self.election.serving:
            self._hold_address()              # the kernel's lifetime follows the lease
        self._carry_out(actions)

    def _revoke(self, lease: str | None = None) -> None:
        lease = lease or self.lease
        if not lease:
            return
        try:
            self._store.deadline_s = 0.5
            self._store._call("/v3/lease/revoke", {"ID": lease})
        except StoreError as exc:
            log.debug("revoke: %s", exc)


def election_store(endpoints: Any, prefix: str, tls: Any) -> EtcdStore:
    """A second connection for the election thread, with short per-request timeouts."""
    return EtcdStore(endpoints, prefix, tls, request_timeout_s=REQUEST_TIMEOUT_S,
                     deadline_s=0.5)


__all__ = ["ElectionRunner", "StoreWatcher", "Wakeup", "election_store", "CATCH_UP_WAIT_S"]
