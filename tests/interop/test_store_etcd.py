"""The etcd binding store against a real 3-member cluster (tests/etcd_cluster.py); the common
contract runs in tests/unit/test_store.py.  Here what only a replicated store has:

* kill -9 the leader while writing: no acknowledged write is lost, and writes succeed again
  after the election, through the same store object (it moves to another member by itself);
* two HAs sharing one prefix: a compare-and-swap with a stale care-of is refused and writes
  nothing (the fence between an old and a new active HA);
* a lease only collects garbage: the record keeps its absolute expiry, and the keys carry a
  lease whose TTL is beyond the binding's lifetime;
* TLS with client certificates: a client with the right CA and certificate reads and writes;
  a wrong CA, no client certificate, or plain HTTP gets nothing;
* an HA daemon configured with ``store = "etcd"`` serves, at start, the bindings it finds in
  the cluster (nothing on its disk);
* errors name the endpoints; configuration: ``store = "etcd"`` needs endpoints, and the
  daemon's settings reach the store (prefix, TLS files).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import time

import pytest

import etcd_cluster
from mipsec.config import DaemonSettings, dump_config, load_config
from mipsec.errors import ConfigError
from mipsec.store import BindingRecord, StoreError, open_store
from mipsec.store.etcd import LEASE_GRACE_S, EtcdStore, EtcdTls
from needs import need

HOME = "10.1.0.100"

pytestmark = pytest.mark.usefixtures("sigpipe_ignored")


def _record(coa: str, n: int = 0, home: str = HOME) -> BindingRecord:
    return BindingRecord(home, coa, 600, 9e9, identification=n)


@pytest.fixture
def cluster(tmp_path):
    c = etcd_cluster.start_cluster(str(tmp_path / "etcd"))
    yield c
    c.stop()


def test_leader_killed_while_writing_loses_no_acknowledged_write(cluster):
    leader = cluster.leader()
    # talk to the leader first, so that its death breaks our own connection too
    endpoints = [leader.client] + [m.client for m in cluster.members if m is not leader]
    store = EtcdStore(endpoints, "/kill")
    acked: dict[str, int] = {}
    killed_at = None
    after = 0
    n = 0
    try:
        while after < 20:
            n += 1
            home = f"10.1.{n // 250}.{n % 250 + 1}"
            store.put(_record("172.16.1.10", n, home), {f"seq/{home}": n.to_bytes(4, "big")})
            acked[home] = n
            if n == 30:
                cluster.kill(leader)
                killed_at = time.monotonic()
            elif killed_at is not None:
                if after == 0:
                    print(f"first write after the kill: {time.monotonic() - killed_at:.2f} s "
                          f"({store.failovers} failover(s))")
                after += 1
        assert store.endpoint != leader.client
        # a fresh client on the survivors sees every acknowledged write, binding and metadata
        survivors = [m.client for m in cluster.members if m is not leader]
        check = EtcdStore(survivors, "/kill")
        got = {r.home_address: r.identification for r in check.load(0.0)}
        assert got == acked
        meta = check.meta()
        assert {k: int.from_bytes(v, "big") for k, v in meta.items()} == \
            {f"seq/{h}": i for h, i in acked.items()}
        # a new leader was elected among the survivors
        assert cluster.leader() is not leader
        check.close()
    finally:
        store.close()


def test_a_stale_compare_and_swap_is_refused_across_two_clients(etcd):
    cluster = etcd
    a = EtcdStore([cluster.members[0].client], "/fence")
    b = EtcdStore([cluster.members[2].client], "/fence")
    try:
        assert a.compare_and_swap(HOME, None, _record("172.16.1.10"), {"id": b"1"})
        assert b.load(0.0) == [_record("172.16.1.10")]
        # b moves the MN; a, which still believes 172.16.1.10, is refused and writes nothing
        assert b.compare_and_swap(HOME, "172.16.1.10", _record("172.16.2.10", 2), {"id": b"2"})
        assert not a.compare_and_swap(HOME, "172.16.1.10", _record("172.16.3.10", 3),
                                      {"id": b"3"})
        assert not a.compare_and_swap(HOME, None, _record("172.16.3.10", 3), {"id": b"3"})
        assert a.load(0.0) == [_record("172.16.2.10", 2)] and a.meta() == {"id": b"2"}
        # another prefix (another home network) is another store
        other = EtcdStore(cluster.endpoints, "/fence-other")
        assert other.load(0.0) == [] and other.meta() == {}
        other.close()
    finally:
        a.close()
        b.close()


def test_a_fenced_store_writes_only_while_its_leader_key_names_it(etcd):
    """Several HAs on one prefix: each write also compares the leader key with the writer's
    identity, so a deposed active HA writes nothing (not even metadata)."""
    a = EtcdStore(etcd.endpoints, "/fenced")
    b = EtcdStore(etcd.endpoints, "/fenced")
    a.fence, b.fence = "ha-a", "ha-b"
    try:
        with pytest.raises(StoreError, match="not the active one"):
            a.put(_record("172.16.1.10"))                  # no leader key at all
        etcd_cluster._post(etcd.members[0].client, "/v3/kv/put",
                           {"key": base64.b64encode(b"/fenced/leader").decode(),
                            "value": base64.b64encode(b"ha-a").decode()})
        a.put(_record("172.16.1.10"))
        assert a.compare_and_swap(HOME, "172.16.1.10", _record("172.16.2.10", 2))
        assert a.compare_and_swap_meta("siu-seq/gw", None, b"1")
        for write in (lambda: b.put(_record("172.16.9.9")),
                      lambda: b.delete(HOME),
                      lambda: b.compare_and_swap(HOME, "172.16.2.10", _record("172.16.9.9")),
                      lambda: b.compare_and_swap_meta("siu-seq/gw", b"1", b"2")):
            with pytest.raises(StoreError, match="not the active one"):
                write()
        assert b.load(0.0) == [_record("172.16.2.10", 2)] and b.meta() == {"siu-seq/gw": b"1"}
        # a stale care-of is still a plain refusal for the active one
        assert not a.compare_and_swap(HOME, "172.16.1.10", _record("172.16.3.10"))
        assert not a.compare_and_swap_meta("siu-seq/gw", b"0", b"2")
    finally:
        a.close()
        b.close()


def test_the_lease_only_collects_garbage(etcd):
    cluster = etcd
    store = EtcdStore(cluster.endpoints, "/lease")
    try:
        record = BindingRecord(HOME, "172.16.1.10", 30, 1234.5)
        store.put(record)
        key = base64.b64encode(f"/lease/binding/{HOME}".encode()).decode()
        kv, = etcd_cluster._post(cluster.members[1].client, "/v3/kv/range", {"key": key})["kvs"]
        ttl = etcd_cluster._post(cluster.members[1].client, "/v3/lease/timetolive",
                                 {"ID": kv["lease"]})
        # the key outlives the binding's lifetime by the grace; the expiry is the record's
        assert int(ttl["grantedTTL"]) >= record.lifetime + LEASE_GRACE_S
        assert store.load(1234.0) == [record] and store.load(1234.5) == []
        # a lease revoked behind our back (or expired while unused) is replaced on the next put
        etcd_cluster._post(cluster.members[0].client, "/v3/lease/revoke", {"ID": kv["lease"]})
        assert store.load(0.0) == []
        store.put(record)
        assert store.load(0.0) == [record]
    finally:
        store.close()


def test_errors_name_the_endpoints():
    ports = etcd_cluster._free_ports(2)
    store = EtcdStore([f"127.0.0.1:{p}" for p in ports], "/x", deadline_s=0.5)
    with pytest.raises(StoreError, match="no member answered") as err:
        store.put(_record("172.16.1.10"))
    assert all(f"http://127.0.0.1:{p}: " in str(err.value) for p in ports)
    store.close()
    with pytest.raises(StoreError, match="not http"):
        EtcdStore(["ftp://127.0.0.1:1"])
    with pytest.raises(StoreError, match="store_ca_file /nonexistent"):
        open_store("etcd", etcd={"endpoints": ["https://127.0.0.1:1"], "prefix": "/x",
                                 "ca_file": "/nonexistent"})


def test_config_store_etcd(tmp_path):
    import dataclasses
    import random

    from mipsec.config import KeySetLayout, make_key_set
    cfg = make_key_set(1, KeySetLayout(run_dir=str(tmp_path)), keys_from=random.Random(3))["ha"]
    assert "store_endpoints" not in dump_config(cfg)       # sqlite: no etcd keys written
    etcd = dataclasses.replace(cfg, daemon=dataclasses.replace(
        cfg.daemon, store="etcd", store_endpoints=("https://10.0.0.1:2379",),
        store_prefix="/mipsec/home1", store_ca_file="/etc/mipsec/etcd-ca.pem"))
    path = tmp_path / "ha.toml"
    path.write_text(dump_config(etcd))
    d = load_config(path).daemon
    assert d.store == "etcd" and d.store_endpoints == ("https://10.0.0.1:2379",)
    assert d.store_prefix == "/mipsec/home1" and d.store_ca_file == "/etc/mipsec/etcd-ca.pem"
    path.write_text(dump_config(etcd).replace('store_endpoints = ["https://10.0.0.1:2379"]',
                                              "store_endpoints = []"))
    with pytest.raises(ConfigError, match="store_endpoints"):
        load_config(path)
    assert DaemonSettings().store == "sqlite"     # the default needs no etcd


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(d) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA;
    and a second CA that signed nothing of this cluster."""
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1", "-subj", f"/CN={ca}",
                 cwd=d)
    # etcd's JSON gateway calls its own gRPC server with the member's certificate: the member's
    # certificate must allow client authentication too
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\n"
                                 "extendedKeyUsage=serverAuth,clientAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=mipsec-{name}",
                 cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile",
                 f"{name}.ext", cwd=d)
    return {n: str(d / n) for n in ("ca.pem", "other-ca.pem", "server.pem", "server.key",
                                     "client.pem", "client.key")}


def test_tls_with_client_certificates(tmp_path):
    if shutil.which("openssl") is None:
        need("openssl not installed (Debian package openssl)")
    certs_dir = tmp_path / "pki"
    certs_dir.mkdir()
    c = _certificates(certs_dir)
    ctx = EtcdTls(c["ca.pem"], c["client.pem"], c["client.key"]).context()
    cluster = etcd_cluster.start_cluster(
        str(tmp_path / "etcd"), size=1, client_context=ctx,
        tls={"cert": c["server.pem"], "key": c["server.key"], "ca": c["ca.pem"]})
    try:
        (endpoint,) = cluster.endpoints
        assert endpoint.startswith("https://")
        good = open_store("etcd", etcd={"endpoints": [endpoint], "prefix": "/tls",
                                        "ca_file": c["ca.pem"], "cert_file": c["client.pem"],
                                        "key_file": c["client.key"]})
        good.put(_record("172.16.1.10"), {"id": b"1"})
        assert good.load(0.0) == [_record("172.16.1.10")]
        good.close()
        # a member whose certificate our CA did not sign: refused at once, endpoint named
        wrong_ca = EtcdStore([endpoint], "/tls", EtcdTls(c["other-ca.pem"], c["client.pem"],
                                                         c["client.key"]), deadline_s=1.0)
        with pytest.raises(StoreError, match=f"{endpoint}: TLS"):
            wrong_ca.load(0.0)
        wrong_ca.close()
        # no client certificate: the member refuses us, nothing is read or written
        anonymous = EtcdStore([endpoint], "/tls", EtcdTls(c["ca.pem"]), deadline_s=1.0)
        with pytest.raises(StoreError, match=endpoint):
            anonymous.put(_record("172.16.9.9"))
        anonymous.close()
        # plain HTTP to a TLS member gets nothing either
        plain = EtcdStore([endpoint.replace("https", "http")], "/tls", deadline_s=1.0)
        with pytest.raises(StoreError):
            plain.load(0.0)
        plain.close()
    finally:
        cluster.stop()


def test_an_ha_daemon_restores_its_bindings_from_etcd(etcd, tmp_path):
    """``store = "etcd"`` end to end: a binding written by one HA (here: directly) is served by
    a fresh HA daemon at start, from the cluster, with nothing on its disk."""
    import dataclasses
    import random

    from mipsec.config import KeySetLayout, make_key_set
    from mipsec.io.daemon import Daemon
    from mipsec.io.transports import FakeNet
    from mipsec.io.tun import FakeTun

    cfg = make_key_set(1, KeySetLayout(run_dir=str(tmp_path)), keys_from=random.Random(3))["ha"]
    cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(
        cfg.daemon, store="etcd", store_endpoints=tuple(etcd.endpoints),
        store_prefix="/daemon-home1"))
    writer = EtcdStore(etcd.endpoints, "/daemon-home1")
    writer.put(BindingRecord(HOME, "172.16.2.10", 600, time.time() + 600, identification=7))
    writer.close()
    net = FakeNet("ha")
    d = Daemon(cfg, tun=FakeTun(cfg.daemon.tun), sender=net, receivers=[net],
               manage_kernel=False)
    try:
        d.start()
        assert isinstance(d.store, EtcdStore)
        status = d.status()
        assert status["node"]["bindings"][HOME]["care_of"] == "172.16.2.10"
        assert status["store"]["kind"] == "etcd" and status["store"]["errors"] == 0
        assert not list(tmp_path.glob("*.sqlite3"))
    finally:
        d.close()
