"""The binding store: one contract, three backends (memory, SQLite, etcd), and the HA's use of it.

* the contract (load unexpired, put, compare-and-swap on the old care-of address, delete,
  metadata written atomically with a binding) holds for every backend (etcd: a real 3-member
  cluster, tests/etcd_cluster.py via tests/conftest.py; the etcd-only checks are in
  tests/interop/test_store_etcd.py);
* SQLite: a directory others may write is refused, a row that does not parse is skipped;
* the HA role: every accepted registration, deregistration and expiry is a ``PersistBinding``
  ahead of the reply; a fresh HA restored from the store serves the binding (routes back,
  downlink tunnelled) and refuses a replay of the registration it had accepted before the
  restart; expired records are not restored;
* a write that fails makes the next one for that home address unconditional.

The store across processes (a SIGKILLed writer) and in the daemon: tests/io/test_store_daemon.py.
"""

from __future__ import annotations

import random

import pytest

from mipsec.drops import DropReason
from mipsec.node.actions import BindingChanged, BindingNotStored, PersistBinding, SendToNet
from mipsec.node.home_agent import HomeAgent
from mipsec.sim.topology import build_topology
from mipsec.store import BindingRecord, MemoryStore, StoreError, open_store
from mipsec.store.sqlite import SqliteStore

HOME = "10.1.0.100"


def _record(coa: str = "172.16.1.10", expires: float = 2000.0, home: str = HOME,
            **kw) -> BindingRecord:
    return BindingRecord(home_address=home, care_of_address=coa, lifetime=600,
                         expires_wall=expires, **kw)


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def store(request, tmp_path):
    if request.param == "etcd":
        request.getfixturevalue("sigpipe_ignored")
        cluster = request.getfixturevalue("etcd")
        s = open_store("etcd", etcd={"endpoints": cluster.endpoints,
                                     "prefix": f"/contract/{request.node.name}"})
    else:
        s = open_store(request.param, str(tmp_path / "state" / "ha.bindings.sqlite3"))
    yield s
    s.close()


def test_contract_put_load_and_expiry(store):
    assert store.load(1000.0) == [] and store.meta() == {}
    store.put(_record(expires=1500.0), {"mn-ha-id/" + HOME: b"\x00" * 8})
    store.put(_record(home="10.1.0.101", expires=1100.0, previous_care_of="172.16.2.10"))
    got = {r.home_address: r for r in store.load(1000.0)}
    assert got[HOME] == _record(expires=1500.0)
    assert got["10.1.0.101"].previous_care_of == "172.16.2.10"
    assert store.meta() == {"mn-ha-id/" + HOME: b"\x00" * 8}
    # expiry is the absolute wall-clock time in the record, whatever the backend's own clock
    assert [r.home_address for r in store.load(1200.0)] == [HOME]
    assert store.load(1500.0) == []


def test_contract_compare_and_swap(store):
    assert not store.compare_and_swap(HOME, "172.16.1.10", _record("172.16.2.10"))
    assert store.load(0.0) == []
    assert store.compare_and_swap(HOME, None, _record("172.16.1.10"), {"k": b"1"})
    # a stale expectation writes nothing, neither the binding nor the metadata
    assert not store.compare_and_swap(HOME, "172.16.9.9", _record("172.16.2.10"), {"k": b"2"})
    assert [r.care_of_address for r in store.load(0.0)] == ["172.16.1.10"]
    assert store.meta() == {"k": b"1"}
    assert store.compare_and_swap(HOME, "172.16.1.10", _record("172.16.2.10"))
    assert [r.care_of_address for r in store.load(0.0)] == ["172.16.2.10"]
    assert store.compare_and_swap(HOME, "172.16.2.10", None, {"k": b"3"})      # delete
    assert store.load(0.0) == [] and store.meta() == {"k": b"3"}
    with pytest.raises(ValueError):
        store.compare_and_swap(HOME, None, _record(home="10.1.0.101"))


def test_contract_compare_and_swap_meta(store):
    # the SIU sequence high-water mark: created if absent, then moved only from what it was
    assert store.compare_and_swap_meta("siu-seq/10.1.0.1", None, b"\x00" * 7 + b"\x10")
    assert not store.compare_and_swap_meta("siu-seq/10.1.0.1", None, b"\x00" * 7 + b"\x20")
    assert not store.compare_and_swap_meta("siu-seq/10.1.0.1", b"\x00" * 8, b"\x00" * 7 + b"\x20")
    assert store.meta() == {"siu-seq/10.1.0.1": b"\x00" * 7 + b"\x10"}
    assert store.compare_and_swap_meta("siu-seq/10.1.0.1", b"\x00" * 7 + b"\x10",
                                       b"\x00" * 7 + b"\x20")
    assert store.meta() == {"siu-seq/10.1.0.1": b"\x00" * 7 + b"\x20"}
    store.put(_record(), {"mn-ha-id/" + HOME: b"\x01" * 8})     # other entries untouched
    assert store.meta()["siu-seq/10.1.0.1"] == b"\x00" * 7 + b"\x20"


def test_contract_delete(store):
    store.put(_record())
    store.delete(HOME, {"mn-ha-id/" + HOME: b"\x01" * 8})
    store.delete("10.1.0.199")                       # nothing there: not an error
    assert store.load(0.0) == [] and store.meta()["mn-ha-id/" + HOME] == b"\x01" * 8


def test_contract_closed_store_refuses(store):
    store.close()
    with pytest.raises((StoreError, Exception)):
        store.put(_record())


def test_sqlite_refuses_a_directory_others_may_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StoreError, match="chmod 700"):
        SqliteStore(str(shared / "ha.bindings.sqlite3"))
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "db").write_bytes(b"")
    (private / "db").chmod(0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        SqliteStore(str(private / "db"))


def test_sqlite_skips_a_row_that_does_not_parse(tmp_path):
    s = SqliteStore(str(tmp_path / "s" / "db"))
    s.put(_record())
    s._db.execute("INSERT INTO bindings VALUES ('10.1.0.101', 'x', 9e9, 'not json')")
    assert [r.home_address for r in s.load(0.0)] == [HOME] and s.skipped == 1
    s.close()


# --- the HA role on a store ---------------------------------------------------------------------

def _apply(store: MemoryStore, actions) -> None:
    """What the daemon does with PersistBinding actions (tests of the role without it)."""
    for a in actions:
        if isinstance(a, PersistBinding):
            meta = dict(a.meta)
            if a.conditional:
                assert store.compare_and_swap(a.home_address, a.expected_care_of, a.record, meta)
            elif a.record is None:
                store.delete(a.home_address, meta)
            else:
                store.put(a.record, meta)


def _registered_topology():
    topo = build_topology(1, seed=3, keys_from=random.Random(3))
    store = MemoryStore()
    ha_host = topo.ha
    seen = []
    real = ha_host.role.receive_from_net

    def spy(packet, now):
        acts = real(packet, now)
        seen.append((packet, acts))
        _apply(store, acts)
        return acts
    ha_host.role.receive_from_net = spy
    topo.move("a")
    topo.sim.run(until=topo.sim.now + 2.0)
    assert topo.mn.role.state.name.lower() == "registered"
    return topo, store, seen


def test_ha_persists_before_replying_and_restores_after_a_restart():
    topo, store, seen = _registered_topology()
    (rrq, acts), = [(p, a) for p, a in seen if any(isinstance(x, PersistBinding) for x in a)]
    kinds = [type(a) for a in acts]
    # durable first: the PersistBinding precedes the SIU that carries the reply
    assert kinds.index(PersistBinding) < kinds.index(SendToNet)
    old = topo.ha.role
    coa = old.bindings[HOME].care_of_address
    (rec,) = store.load(old.wallclock())
    assert rec.care_of_address == coa and rec.expires_wall > old.wallclock()
    assert store.meta()["mn-ha-id/" + HOME] == rec.identification.to_bytes(8, "big")

    # a new HA process: same configuration, state only from the store
    now = topo.sim.now
    new = HomeAgent(old.config, wallclock=old.wallclock)
    actions = new.restore(store.load(new.wallclock()), store.meta(), now)
    assert actions == [BindingChanged(HOME, coa)]
    assert new.bindings[HOME].care_of_address == coa
    assert abs(new.bindings[HOME].expires - old.bindings[HOME].expires) < 1e-6
    assert [e.kind for e in new.timeline] == ["binding-restored"]
    # downlink: a packet for the home address is tunnelled to the CoA at once
    from mipsec.node.packet import a2b, build_udp_packet
    out = new.receive_from_tun(build_udp_packet(a2b("10.1.0.10"), a2b(HOME), 7, 7, b"x"), now)
    assert len(out) == 1 and out[0].packet[16:20] == a2b(coa)
    # the registration accepted before the restart cannot be replayed after it
    assert new.receive_from_net(rrq, now + 0.1)[-1].packet  # a 133 reply, nothing moves
    assert new.drops[DropReason.MIP_REPLAYED] == 1
    assert new.bindings[HOME].care_of_address == coa


def test_ha_does_not_restore_expired_or_foreign_bindings():
    topo = build_topology(1, seed=4)
    ha = topo.ha.role
    wall = ha.wallclock()
    records = [_record(expires=wall - 1.0), _record(home="10.1.0.222", expires=wall + 100)]
    assert ha.restore(records, {}, 0.0) == []
    assert ha.bindings == {}
    assert ha.counters["restore-skipped-expired"] == 1
    assert ha.counters["restore-skipped-unknown"] == 1


def test_ha_expiry_and_deregistration_are_persisted():
    topo, store, seen = _registered_topology()
    ha = topo.ha.role
    binding = ha.bindings[HOME]
    acts = ha.handle_timer(binding.expires)
    persist = [a for a in acts if isinstance(a, PersistBinding)]
    assert len(persist) == 1 and persist[0].record is None and not persist[0].required
    assert persist[0].conditional and persist[0].expected_care_of == binding.care_of_address
    _apply(store, acts)
    assert store.load(0.0) == []


def test_a_write_that_fails_makes_the_next_one_unconditional():
    topo, store, seen = _registered_topology()
    ha = topo.ha.role
    logs = ha.handle_event(BindingNotStored(HOME, "disk full"), topo.sim.now)
    assert logs and "disk full" in logs[0].message
    assert ha.timeline[-1].kind == "binding-not-stored"
    assert HOME not in ha._stored
    persist = ha._persist(HOME, ha.bindings[HOME])
    assert not persist.conditional
