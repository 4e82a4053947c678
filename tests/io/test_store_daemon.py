"""The binding store across processes and in the daemon (the contract and the HA role's use of
it: tests/unit/test_store.py).

* SQLite: a write that returned survives the writer being killed with SIGKILL; its file is 0600
  in a 0700 directory;
* the daemon: the bindings survive a restart of the HA; a write that fails drops the reply
  (nothing acknowledged that is not on disk); a store that is not a database stops the start.
"""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys

import pytest

from mipsec.store import BindingRecord, MemoryStore, StoreError
from mipsec.store.sqlite import SqliteStore

HOME = "10.1.0.100"


def test_sqlite_write_survives_sigkill_and_is_private(tmp_path):
    path = tmp_path / "state" / "ha.bindings.sqlite3"
    code = (f"import os, signal\nfrom mipsec.store.sqlite import SqliteStore\n"
            f"from mipsec.store import BindingRecord\n"
            f"s = SqliteStore({str(path)!r})\n"
            f"s.put(BindingRecord({HOME!r}, '172.16.1.10', 600, 5000.0), {{'m': b'x'}})\n"
            f"os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -9, proc.stderr
    s = SqliteStore(str(path))
    try:
        assert s.load(1000.0) == [BindingRecord(HOME, "172.16.1.10", 600, 5000.0)]
        assert s.meta() == {"m": b"x"}
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        s.close()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_daemon_keeps_bindings_across_a_restart_and_drops_replies_it_cannot_store(tmp_path):
    import socket

    from mipsec.config import KeySetLayout, make_key_set
    from mipsec.io.daemon import Daemon
    from mipsec.io.transports import FakeNet
    from mipsec.io.tun import FakeTun

    sets = make_key_set(1, KeySetLayout(run_dir=str(tmp_path)), keys_from=random.Random(3))
    daemons = {}
    for name in ("ha", "gw", "mn"):
        net = FakeNet(name)
        # the GW's SIU socket on its inside interface: its datagrams go to receive_siu
        inside = [FakeNet("gw-inside", role_entry="receive_siu")] if name == "gw" else []
        daemons[name] = Daemon(sets[name], tun=FakeTun(sets[name].daemon.tun), sender=net,
                               receivers=[net, *inside], manage_kernel=False)
        daemons[name].start()
    where = {sets["gw"].node.outside_address: "gw", sets["gw"].node.inside_address: "gw",
             sets["ha"].node.address: "ha"}

    def pump():
        for _ in range(20):
            moved = False
            for name, d in daemons.items():
                d.loop.run_once(max_wait=0.0)
                packets = [p for p, _ in d.sender.sent] + (d.tun.written if name == "gw" else [])
                d.sender.sent.clear()
                if name == "gw":
                    d.tun.written.clear()
                for p in packets:
                    if p[16:20] == socket.inet_aton(sets["gw"].node.inside_address):
                        daemons["gw"].receivers[1].inject(p)     # the SIU socket
                    else:
                        daemons[where.get(socket.inet_ntoa(p[16:20]), "mn")].sender.inject(p)
                    moved = True
            if not moved:
                return
    try:
        ha_path = daemons["ha"].store_path()
        assert ha_path == str(tmp_path / "ha.bindings.sqlite3")
        daemons["mn"].handle_command("handover", ["172.16.2.10", "vb0"])
        pump()
        assert daemons["mn"].status()["node"]["state"] == "registered"
        # kill the HA (no clean shutdown matters: every write was committed) and start another
        daemons["ha"].close()
        net = FakeNet("ha")
        ha = daemons["ha"] = Daemon(sets["ha"], tun=FakeTun(sets["ha"].daemon.tun), sender=net,
                                    receivers=[net], manage_kernel=False)
        ha.start()
        status = ha.status()
        assert status["node"]["bindings"][HOME]["care_of"] == "172.16.2.10"
        assert status["store"] == {"kind": "sqlite", "errors": 0, "path": ha_path}
        assert stat.S_IMODE(os.stat(ha_path).st_mode) == 0o600

        # the store fails: the registration is accepted in memory, but no reply leaves
        class Broken(MemoryStore):
            def compare_and_swap(self, *a, **kw):
                raise StoreError("disk full")
            put = delete = compare_and_swap
        ha.store.close()
        ha.store = Broken()
        daemons["mn"].handle_command("handover", ["172.16.1.10", "va0"])
        daemons["mn"].loop.run_once(max_wait=0.0)
        for p, _ in daemons["mn"].sender.sent:
            daemons["gw"].sender.inject(p)
        daemons["mn"].sender.sent.clear()
        daemons["gw"].loop.run_once(max_wait=0.0)
        # the GW forwards the request from its inside address (a socket), or through its TUN
        for p in [p for p, _ in daemons["gw"].sender.sent] + daemons["gw"].tun.written:
            ha.sender.inject(p)
        daemons["gw"].sender.sent.clear()
        daemons["gw"].tun.written.clear()
        ha.loop.run_once(max_wait=0.0)
        assert ha.sender.sent == [] and ha.store_errors == 1
        assert ha.status()["store"]["errors"] == 1
        assert [e for e in ha.role.timeline if e.kind == "binding-not-stored"]
    finally:
        for d in daemons.values():
            d.close()


def test_daemon_refuses_to_start_on_a_store_that_is_not_a_database(tmp_path):
    from mipsec.config import KeySetLayout, make_key_set
    from mipsec.errors import ConfigError
    from mipsec.io.daemon import Daemon
    from mipsec.io.transports import FakeNet
    from mipsec.io.tun import FakeTun

    cfg = make_key_set(1, KeySetLayout(run_dir=str(tmp_path)), keys_from=random.Random(3))["ha"]
    path = tmp_path / "ha.bindings.sqlite3"
    path.write_bytes(b"this is not an SQLite database, just garbage " * 100)
    path.chmod(0o600)
    net = FakeNet("ha")
    d = Daemon(cfg, tun=FakeTun(cfg.daemon.tun), sender=net, receivers=[net],
               manage_kernel=False)
    with pytest.raises(ConfigError, match="state_dir.*ha.bindings.sqlite3"):
        d.start()
    d.close()
