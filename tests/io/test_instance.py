"""One daemon per instance and per kernel resource; addresses and directories the machine must
have.  A refusal is exit status 2 with the file, the key and the problem, and a refused daemon
removes nothing (the first GW keeps its ip rule and its route).

The lock and machine checks run without root; the real-daemon cases run `mipsec gw|ha` in a
network namespace of their own (root: in CI a missing requirement fails, elsewhere skips).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import needs
from mipsec.config import KeySetLayout, make_key_set, write_config
from mipsec.errors import ConfigError
from mipsec.io import control, instance
from mipsec.lab.lab import requirements_problem

NS = f"ops-inst{os.getpid()}"


def _sets(tmp_path, **layout):
    return make_key_set(1, KeySetLayout(run_dir=str(tmp_path), gw_inside_interface="in0",
                                        ha_home_interface="in0", **layout),
                        keys_from=random.Random(9))


def test_a_held_lock_is_refused_naming_the_holder(tmp_path):
    first, second = instance.Locks("pid 1, config a.toml"), instance.Locks("pid 2, config b")
    path = str(tmp_path / "x.lock")
    first.acquire(path, "b.toml: [daemon] tun: TUN device 'gtun0'")
    with pytest.raises(ConfigError, match=r"b.toml: \[daemon\] tun: TUN device 'gtun0': held by "
                                          r"another mipsec daemon \(pid 1, config a.toml\)"):
        second.acquire(path, "b.toml: [daemon] tun: TUN device 'gtun0'")
    first.release()
    second.acquire(path, "free again")
    second.release()


def test_machine_checks_name_file_key_and_problem(tmp_path):
    sets = _sets(tmp_path)
    gw = dataclasses.replace(sets["gw"], path="gw.toml")
    gw = dataclasses.replace(gw, node=dataclasses.replace(gw.node, outside_address="192.0.2.77",
                                                          inside_address="127.0.0.1"))
    with pytest.raises(ConfigError, match=r"gw.toml: \[gateway\] outside_address: 192.0.2.77 is "
                                          r"not an address of this machine"):
        instance.check_machine(gw)
    ha = dataclasses.replace(sets["ha"], path="ha.toml")
    ha = dataclasses.replace(ha, node=dataclasses.replace(ha.node, address="192.0.2.78"))
    with pytest.raises(ConfigError, match=r"ha.toml: \[home_agent\] address: 192.0.2.78"):
        instance.check_machine(ha)
    ok = dataclasses.replace(ha, node=dataclasses.replace(ha.node, address="127.0.0.1"))
    lo = dataclasses.replace(ok, daemon=dataclasses.replace(ok.daemon, tun="lo"))
    with pytest.raises(ConfigError, match=r"\[daemon\] tun: interface 'lo' already exists"):
        instance.check_machine(lo)
    missing = str(tmp_path / "no" / "such" / "ha.pcap")
    nodir = dataclasses.replace(ok, daemon=dataclasses.replace(ok.daemon, pcap=missing))
    with pytest.raises(ConfigError, match=r"ha.toml: \[daemon\] pcap: directory .*/no/such does "
                                          r"not exist"):
        instance.check_machine(nodir)
    instance.check_machine(ok)


# --- real daemons in a namespace ---------------------------------------------------------------

def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def netns():
    problem = requirements_problem()
    needs.need(problem, f"instance tests are required in CI: {problem}")
    _ip("netns", "add", NS)
    try:
        for name, address in (("in0", "10.1.0.1/24"), ("out0", "172.16.0.1/24")):
            _ip("-n", NS, "link", "add", name, "type", "veth", "peer", "name", name + "p")
            _ip("-n", NS, "addr", "add", address, "dev", name)
            _ip("-n", NS, "link", "set", name + "p", "up")
            _ip("-n", NS, "link", "set", name, "up")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "pids", NS], capture_output=True)
        for pid in subprocess.run(["ip", "netns", "pids", NS], capture_output=True,
                                  text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        _ip("netns", "del", NS, check=False)


def _start(ns, path, role):
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "mipsec", role,
                             "--config", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _wait_ready(sock, proc, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if control.request(sock, "ping", timeout=1.0).get("ok"):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("daemon not ready")


def _run_refused(ns, path, role):
    proc = _start(ns, path, role)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def _rules(ns):
    return _ip("-n", ns, "rule", "show").stdout


def _gw(tmp_path, sets, name, **daemon):
    cfg = sets["gw"]
    cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, **daemon))
    path = str(tmp_path / f"{name}.toml")
    write_config(cfg, path)
    return path


def test_a_second_gateway_is_refused_and_the_first_keeps_its_rule(netns, tmp_path):
    sets = _sets(tmp_path)
    first = _gw(tmp_path, sets, "gw1", tun="otun1", control_socket=str(tmp_path / "gw1.sock"))
    proc = _start(netns, first, "gw")
    try:
        _wait_ready(str(tmp_path / "gw1.sock"), proc)
        assert "iif in0 lookup 100" in _rules(netns)
        cases = {
            "gw2": (dict(tun="otun2", control_socket=str(tmp_path / "gw2.sock")),
                    "[daemon] rule_priority: ip rule priority 1000: held by another mipsec "
                    "daemon (pid"),
            "gw3": (dict(tun="otun3", control_socket=str(tmp_path / "gw3.sock"),
                         rule_priority=1001),
                    "[daemon] route_table: routing table 100: held by another mipsec daemon"),
            "gw4": (dict(tun="otun4", control_socket=str(tmp_path / "gw1.sock"),
                         rule_priority=1002, route_table=102),
                    "[daemon] control_socket: "),
            "gw5": (dict(tun="otun1", control_socket=str(tmp_path / "gw5.sock"),
                         rule_priority=1003, route_table=103),
                    "[daemon] tun: TUN device 'otun1': held by another mipsec daemon"),
            "gw6": (dict(tun="otun6", control_socket=str(tmp_path / "gw6.sock"),
                         rule_priority=1006, route_table=106),
                    "[gateway] inside_address: UDP port 4343: held by another mipsec daemon"),
        }
        for name, (daemon, message) in cases.items():
            path = _gw(tmp_path, sets, name, **daemon)
            code, err = _run_refused(netns, path, "gw")
            assert code == 2, (name, err)
            assert f"{path}: {message}" in err, (name, err)
            assert "Traceback" not in err
        # the refused daemons removed nothing of the first one's
        assert "iif in0 lookup 100" in _rules(netns)
        assert "otun1" in _ip("-n", netns, "route", "show", "table", "100").stdout
        assert control.request(str(tmp_path / "gw1.sock"), "ping")["ok"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0
    assert "lookup 100" not in _rules(netns)


def test_a_foreign_rule_at_our_priority_is_refused_and_kept(netns, tmp_path):
    sets = _sets(tmp_path)
    _ip("-n", netns, "rule", "add", "iif", "out0", "lookup", "200", "priority", "1000")
    path = _gw(tmp_path, sets, "gw", tun="otun1", control_socket=str(tmp_path / "gw.sock"))
    code, err = _run_refused(netns, path, "gw")
    assert code == 2 and f"{path}: [daemon] rule_priority: ip rule priority 1000 is taken" in err
    assert "iif out0 lookup 200" in _rules(netns)


@pytest.mark.parametrize("case", ["gw outside", "ha address", "pcap dir"])
def test_addresses_not_here_and_missing_directories_exit_2(netns, tmp_path, case):
    sets = _sets(tmp_path)
    role = "ha" if case == "ha address" else "gw"
    cfg = sets[role]
    if case == "gw outside":
        cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node,
                                                                outside_address="172.16.9.9"))
        message = "[gateway] outside_address: 172.16.9.9 is not an address of this machine"
    elif case == "ha address":
        cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, address="10.1.0.9"))
        message = "[home_agent] address: 10.1.0.9 is not an address of this machine"
    else:
        cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(
            cfg.daemon, pcap=str(tmp_path / "missing" / "gw.pcap")))
        message = "[daemon] pcap: directory"
    path = str(tmp_path / f"{role}.toml")
    write_config(cfg, path)
    code, err = _run_refused(netns, path, role)
    assert code == 2, err
    assert f"{path}: {message}" in err and "Traceback" not in err


def test_a_port_in_use_names_the_file_and_exits_2(netns, tmp_path):
    """A second HA with another TUN name and control socket: its UDP 434 is taken (a second
    SO_REUSEADDR bind would succeed and silently take the first one's registrations)."""
    _ip("-n", netns, "addr", "add", "10.1.0.2/24", "dev", "in0")
    sets = _sets(tmp_path)
    cfg = sets["ha"]
    first = str(tmp_path / "ha1.toml")
    write_config(dataclasses.replace(cfg, daemon=dataclasses.replace(
        cfg.daemon, tun="otun1", control_socket=str(tmp_path / "ha1.sock"))), first)
    proc = _start(netns, first, "ha")
    try:
        _wait_ready(str(tmp_path / "ha1.sock"), proc)
        second = str(tmp_path / "ha2.toml")
        write_config(dataclasses.replace(cfg, daemon=dataclasses.replace(
            cfg.daemon, tun="otun2", control_socket=str(tmp_path / "ha2.sock"))), second)
        code, err = _run_refused(netns, second, "ha")
        assert code == 2, err
        assert f"{second}: [home_agent] address: UDP port 434: held by another mipsec daemon" \
            in err, err
        assert control.request(str(tmp_path / "ha1.sock"), "ping")["ok"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0
