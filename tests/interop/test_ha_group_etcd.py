"""The HA group's election and warm copy (mipsec/io/hagroup.py) against a real etcd cluster,
without the daemons (the live lab runs them: tests/lab/test_lab_ha_group.py).

* two HAs campaign: exactly one wins; the other's watch keeps a warm copy of what the winner
  writes, and stays a standby;
* the active cut off from the store (its connection closed) fences itself (on its own
  deadline) before the standby wins, which happens only once etcd expired the lease;
* a clean stop resigns: the standby wins without waiting for the lease;
* over TLS with client certificates the election and the watch work the same way.
"""

from __future__ import annotations

import shutil
import time

import pytest

import etcd_cluster
from mipsec.io.hagroup import ElectionRunner, StoreWatcher, Wakeup, election_store
from mipsec.node.election import HaElection, StartServing, StopServing
from mipsec.store import BindingRecord
from mipsec.store.etcd import EtcdStore, EtcdTls
from needs import need

pytestmark = pytest.mark.usefixtures("sigpipe_ignored")


class _Member:
    """One HA of the group as the daemon wires it, minus the kernel."""

    def __init__(self, name: str, endpoints, prefix: str, tls: EtcdTls | None = None):
        tls = tls or EtcdTls()
        self.wakeup = Wakeup()
        self.fenced: list[float] = []
        self.runner = ElectionRunner(HaElection(name, now=time.monotonic()),
                                     election_store(endpoints, prefix, tls), self.wakeup,
                                     lambda reason: self.fenced.append(time.monotonic()))
        self.watch = StoreWatcher(election_store(endpoints, prefix, tls), self.runner.leader_seen)
        self.events: list[tuple[float, object]] = []

    def start(self) -> _Member:
        self.watch.start()
        self.runner.start()
        return self

    def poll(self) -> list[object]:
        got = self.wakeup.drain()
        self.events += [(time.monotonic(), e) for e in got]
        return got

    def serving(self) -> bool:
        self.poll()
        return self.runner.may_serve()

    def close(self) -> None:
        self.runner.stop()
        self.watch.stop()
        self.wakeup.close()


def _wait(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s")


def _won_at(member: _Member) -> float:
    return next(t for t, ev, state in member.runner.election.history if ev == "won")


def test_one_wins_the_other_keeps_a_warm_copy_and_takes_over_after_a_fence(etcd):
    prefix = "/group-a"
    a = _Member("ha-a", etcd.endpoints, prefix).start()
    _wait(a.serving)
    b = _Member("ha-b", etcd.endpoints, prefix).start()
    try:
        # the active writes through its fenced store; the standby's watch follows
        writer = EtcdStore(etcd.endpoints, prefix)
        writer.fence = "ha-a"
        record = BindingRecord("10.1.0.100", "172.16.1.10", 600, time.time() + 600)
        writer.put(record, {"siu-seq/10.1.0.1": (1 << 40).to_bytes(8, "big")})
        records, meta, _rev = _wait(lambda: (lambda s: s if s[0] else None)(
            b.watch.snapshot(time.time())))
        assert records == [record] and meta["siu-seq/10.1.0.1"] == (1 << 40).to_bytes(8, "big")
        time.sleep(1.0)
        assert not b.serving() and a.serving()
        # cut the active off the store: its keep-alives fail, it fences on its own deadline
        a.runner._store.close()
        _wait(b.serving, timeout=15.0)
        assert a.fenced and not a.runner.may_serve()
        assert any(isinstance(e, StopServing) for _t, e in a.events + [(0, x) for x in a.poll()])
        # never two: the old active had stopped serving before the new one won
        assert a.fenced[0] < _won_at(b)
        assert any(isinstance(e, StartServing) for _t, e in b.events)
        # the old active's identity can write nothing any more
        from mipsec.store import StoreError
        with pytest.raises(StoreError, match="not the active one"):
            writer.put(record)
        writer.close()
    finally:
        a.close()
        b.close()


def test_a_clean_stop_resigns_and_the_standby_takes_over_at_once(etcd):
    prefix = "/group-b"
    a = _Member("ha-a", etcd.endpoints, prefix).start()
    _wait(a.serving)
    b = _Member("ha-b", etcd.endpoints, prefix).start()
    try:
        time.sleep(0.5)
        assert not b.serving()
        t_stop = time.monotonic()
        a.close()                                   # resigns: the lease is revoked
        _wait(b.serving, timeout=10.0)
        # it did not wait for the lease's TTL (2 s) to run out
        assert _won_at(b) - t_stop < a.runner.election.ttl_s
        assert a.runner.election.history[-1][1:] == ("stop", "stopped")
    finally:
        b.close()


def test_the_group_over_tls_with_client_certificates(tmp_path):
    if shutil.which("openssl") is None:
        need("openssl not installed (Debian package openssl)")
    from test_store_etcd import _certificates
    pki = tmp_path / "pki"
    pki.mkdir()
    c = _certificates(pki)
    tls = EtcdTls(c["ca.pem"], c["client.pem"], c["client.key"])
    cluster = etcd_cluster.start_cluster(
        str(tmp_path / "etcd"), size=1, client_context=tls.context(),
        tls={"cert": c["server.pem"], "key": c["server.key"], "ca": c["ca.pem"]})
    member = _Member("ha-tls", cluster.endpoints, "/group-tls", tls).start()
    try:
        assert cluster.endpoints[0].startswith("https://")
        _wait(member.serving)
        _wait(lambda: member.watch.kv.get(b"/group-tls/leader") == b"ha-tls")
        # without a client certificate nobody campaigns
        anonymous = _Member("ha-anon", cluster.endpoints, "/group-tls", EtcdTls(c["ca.pem"]))
        anonymous.start()
        time.sleep(1.0)
        assert not anonymous.serving() and anonymous.watch.revision == 0
        anonymous.close()
    finally:
        member.close()
        cluster.stop()
