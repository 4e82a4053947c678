"""An HA group in the live lab (`mipsec lab up --ha-standbys 1`): a real 3-member etcd cluster,
two HA daemons, one active; each fault under a CN <-> MN stream (mipsec/lab/hafail.py).

* kill -9 the active HA: a standby takes over, the downlink resumes (asserted; its time is
  measured by benchmarks/bench_cluster.py, not asserted), every binding the old active served
  is served by the new one, and the MN never registers again;
* kill -9 the etcd leader: a registration made after it is accepted (the election happened);
* cut the active HA off its store (its store link down): it fences itself and exits, the
  standby takes over, and exactly one HA holds the service address afterwards;
* the lab starts with several MNs too, its store network is private (the HAs reach etcd, the
  home link and the GW do not), and `lab down` leaves nothing (etcd included).

Needs root, network namespaces and etcd: in CI (CI=true) a missing requirement FAILS,
elsewhere skips.
"""

from __future__ import annotations

import os
import shutil

import pytest

import labs
import needs
from mipsec.lab import topology as topo
from mipsec.lab.hafail import SCENARIOS, holders
from mipsec.lab.lab import Lab
from recovery_runs import run_checked

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _require() -> None:
    labs.require()
    needs.need(None if shutil.which("etcd") else "etcd not installed (Debian etcd-server)",
               "an HA group needs etcd in CI (tools/setup.sh installs etcd-server)")


def _run(name: str):
    _require()
    return run_checked(SCENARIOS[name], labs.prefix("hg"))


def test_kill_the_active_ha_under_traffic():
    outcome = _run("kill-active-ha")
    d = outcome.detail
    assert d["new"] != d["old"]
    # no binding lost: the new active serves every binding the old one did, unchanged
    assert d["bindings_before"] and d["bindings_after"] == d["bindings_before"]
    # nobody had to register again, and the downlink came back after the takeover
    assert d["mn_registrations"] == 0, d["timeline"]
    assert outcome.directions["down"]["back_after_ready_ms"] is not None
    kinds = [(node, kind) for _t, node, kind in d["timeline"]]
    assert (d["new"], "binding-restored") in kinds, kinds


def test_kill_the_etcd_leader_registrations_continue():
    outcome = _run("kill-etcd-leader")
    d = outcome.detail
    kinds = [(node, kind) for _t, node, kind in d["timeline"]]
    assert ("mn", "rrp-received") in kinds, kinds
    assert d["active_after"] is not None


def test_partition_the_active_ha_exactly_one_serves():
    outcome = _run("partition-active-ha")
    d = outcome.detail
    assert d["serving"] == [d["new"]], d
    assert d["old_exited"] and d["old_fenced"], d
    assert d["bindings_after"] == d["bindings_before"]
    assert d["mn_registrations"] == 0, d["timeline"]


def test_lab_up_with_mobiles_and_standbys_and_down_removes_everything():
    _require()
    prefix = labs.prefix("hu")
    with labs.torn_down(prefix):
        proc = labs.cli("lab", "up", "--prefix", prefix, "--mobiles", "2", "--ha-standbys", "1",
                        timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "2 MNs, HA group ha, ha2" in proc.stdout
        lab = Lab(prefix=prefix)
        assert lab.ha_standbys == 1 and lab.daemons[-1] == "ha2"
        assert len(holders(lab)) == 1
        etcd_pids = [lab.pid(m) for m in lab.etcd_members]
        assert all(etcd_pids)
        for k in (1, 2):
            assert "received" in lab.exec("cn", "ping", "-c", "1", "-W", "2",
                                          lab.home_address(k)).stdout
        # the store network is private: the HAs reach etcd, the home link and the GW do not
        assert lab.exec("ha2", "ping", "-c", "1", "-W", "2", topo.STORE_DB).returncode == 0
        for node in ("cn", "gw"):
            assert lab.exec(node, "ping", "-c", "1", "-W", "1", topo.STORE_DB).returncode != 0
    assert not os.path.exists(lab.path("etcd"))
    for pid in etcd_pids:
        assert _gone(pid), f"etcd member {pid} still runs after lab down"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read().lower()      # dead, not reaped by its parent yet
    except FileNotFoundError:
        return True
