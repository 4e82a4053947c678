"""The GW daemon is a security gateway, not a router: at start it switches forwarding off on its
outside interface (the one holding ``outside_address``) and on only where it must forward, checks
each value, refuses to start (exit status 2, one message naming file, key and problem) when it
cannot, and restores exactly what it changed at exit (docs/security.md §3.1).

A namespace of its own with the GW's two interfaces (a veth pair: ``out0`` 172.16.0.1/24 and
``in0`` 10.1.0.1/24); the GW runs with its real configuration and no peers.  Needs root and
network namespaces: in CI (CI=true) a missing requirement FAILS, elsewhere skips.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import needs
from mipsec import config as mconfig
from mipsec.io.control import request
from mipsec.lab.lab import requirements_problem

pytestmark = [pytest.mark.netns]

NS = f"shf{os.getpid()}"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": ROOT}
KEYS = ("net.ipv4.conf.out0.forwarding", "net.ipv4.conf.out0.rp_filter",
        "net.ipv4.conf.in0.forwarding", "net.ipv4.conf.all.rp_filter",
        "net.ipv4.conf.default.rp_filter", "net.ipv4.conf.in0.rp_filter", "net.ipv4.ip_forward")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, (cmd, proc.stderr)
    return proc


def read(key: str) -> str:
    path = "/proc/sys/" + key.replace(".", "/")
    return sh("ip", "netns", "exec", NS, "cat", path).stdout.strip()


def values() -> dict[str, str]:
    return {k: read(k) for k in KEYS}


def nft_tables() -> str:
    return sh("ip", "netns", "exec", NS, "nft", "list", "tables").stdout


@pytest.fixture(scope="module")
def netns(tmp_path_factory):
    problem = requirements_problem()
    needs.need(problem, f"namespace tests are required in CI: {problem}")
    needs.need(None if shutil.which("nft") or os.path.exists("/usr/sbin/nft") else
               "nft not installed (Debian package nftables)",
               "nftables is required in CI (tools/setup.sh installs it)")
    sh("ip", "netns", "add", NS)
    try:
        for args in (("link", "set", "lo", "up"),
                     ("link", "add", "out0", "type", "veth", "peer", "name", "in0"),
                     ("addr", "add", "172.16.0.1/24", "dev", "out0"),
                     ("addr", "add", "10.1.0.1/24", "dev", "in0"),
                     ("link", "set", "out0", "up"), ("link", "set", "in0", "up")):
            sh("ip", "-n", NS, *args)
        # a plain host: nothing forwarded, the kernel's reverse-path default
        sh("ip", "netns", "exec", NS, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
        yield tmp_path_factory.mktemp("gwfilter")
    finally:
        sh("ip", "netns", "del", NS, check=False)


def gw_config(directory, name: str, **gateway) -> str:
    cfg = mconfig.make_key_set(1, mconfig.KeySetLayout(run_dir=str(directory)),
                               sa_source="ikev2")["gw"]
    cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, tun=f"sf{name}0"),
                              node=dataclasses.replace(cfg.node, **gateway))
    path = os.path.join(directory, f"{name}.toml")
    mconfig.write_config(cfg, path)
    return path


def start_gw(config: str, *wrapper: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", NS, *wrapper, sys.executable, "-m", "mipsec",
                             "gw", "--config", config], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def wait_ready(proc: subprocess.Popen, sock: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if request(sock, "ping", timeout=1.0).get("ok"):
                return
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError("the GW did not become ready")


def test_gw_sets_its_filter_and_restores_exactly_what_it_changed(netns):
    before = values()
    assert before["net.ipv4.conf.out0.forwarding"] == "0"      # the fixture's plain host
    path = gw_config(netns, "ok")
    proc = start_gw(path)
    try:
        wait_ready(proc, os.path.join(netns, "gw.sock"))
        running = values()
        assert running["net.ipv4.conf.out0.forwarding"] == "0"
        assert running["net.ipv4.conf.out0.rp_filter"] == "2"      # loose: see _protect_gw
        assert running["net.ipv4.conf.in0.forwarding"] == "1"
        assert running["net.ipv4.conf.all.rp_filter"] == "0"
        # the machine-wide switch is not the GW's business any more
        assert running["net.ipv4.ip_forward"] == before["net.ipv4.ip_forward"] == "0"
        assert read("net.ipv4.conf.sfok0.forwarding") == "1"
        assert "mipsec_gw_sfok0" in nft_tables()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert values() == before, err
    assert "mipsec_gw_sfok0" not in nft_tables()


def test_a_changed_value_is_put_back_even_when_others_were_already_right(netns):
    """Only what the daemon changed is restored: here out0's forwarding is 1 beforehand (the
    daemon switches it off and back on) and in0's is 1 already (left alone)."""
    sh("ip", "netns", "exec", NS, "sh", "-c",
       "echo 1 > /proc/sys/net/ipv4/conf/out0/forwarding; "
       "echo 1 > /proc/sys/net/ipv4/conf/in0/forwarding")
    try:
        before = values()
        proc = start_gw(gw_config(netns, "again"))
        try:
            wait_ready(proc, os.path.join(netns, "gw.sock"))
            assert read("net.ipv4.conf.out0.forwarding") == "0"
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert values() == before
    finally:
        sh("ip", "netns", "exec", NS, "sh", "-c",
           "echo 0 > /proc/sys/net/ipv4/conf/out0/forwarding; "
           "echo 0 > /proc/sys/net/ipv4/conf/in0/forwarding")


def test_gw_refuses_to_start_when_its_outside_address_is_on_no_interface(netns):
    path = gw_config(netns, "noaddr", outside_address="172.16.99.1")
    before = values()
    proc = start_gw(path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    # (the start-up check of configured addresses may see it before the filter does)
    assert f"{path}: [gateway] outside_address" in err and "172.16.99.1" in err
    assert "no interface has the address" in err or "not an address of this machine" in err
    assert "Traceback" not in err
    assert values() == before


def test_gw_refuses_to_start_when_the_filter_cannot_be_set(netns):
    """A read-only /proc/sys (a container, a hardened host): the GW would forward from the
    outside, so it does not start; nothing is left changed."""
    path = gw_config(netns, "ro")
    # as on a router: forwarding on everywhere, which the GW must switch off outside
    sh("ip", "netns", "exec", NS, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/conf/out0/forwarding")
    try:
        before = values()
        proc = start_gw(path, "unshare", "-m", "sh", "-c",
                        'mount --bind -o ro /proc/sys /proc/sys && exec "$@"', "ro")
        _, err = proc.communicate(timeout=30)
        after = values()
    finally:
        sh("ip", "netns", "exec", NS, "sh", "-c",
           "echo 0 > /proc/sys/net/ipv4/conf/out0/forwarding")
    assert proc.returncode == 2, err
    assert f"{path}: [gateway] outside_address 172.16.0.1" in err
    assert "cannot set net.ipv4.conf.out0.forwarding = 0" in err
    assert "Read-only file system" in err
    assert "Traceback" not in err
    assert after == before


def test_ha_forwards_only_between_its_home_interface_and_tun_and_restores(netns):
    """The HA no longer switches on forwarding for the whole machine either: only on its home
    interface and its TUN device; at exit the values it changed are back."""
    sh("ip", "-n", NS, "addr", "add", "10.1.0.2/24", "dev", "in0")
    try:
        cfg = mconfig.make_key_set(1, mconfig.KeySetLayout(run_dir=str(netns)))["ha"]
        cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(
            cfg.daemon, tun="sfha0", home_interface="in0", gratuitous_arp=False))
        path = os.path.join(netns, "ha.toml")
        mconfig.write_config(cfg, path)
        keys = ("net.ipv4.ip_forward", "net.ipv4.conf.in0.forwarding",
                "net.ipv4.conf.out0.forwarding", "net.ipv4.conf.in0.rp_filter",
                "net.ipv4.neigh.in0.proxy_delay")
        before = {k: read(k) for k in keys}
        assert before["net.ipv4.conf.in0.forwarding"] == "0"
        proc = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-m", "mipsec", "ha",
                                 "--config", path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            wait_ready(proc, os.path.join(netns, "ha.sock"))
            running = {k: read(k) for k in keys}
            assert running["net.ipv4.conf.in0.forwarding"] == "1"
            assert read("net.ipv4.conf.sfha0.forwarding") == "1"
            assert running["net.ipv4.ip_forward"] == "0"             # not the whole machine
            assert running["net.ipv4.conf.out0.forwarding"] == "0"   # nor its other interfaces
            assert running["net.ipv4.neigh.in0.proxy_delay"] == "0"
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert {k: read(k) for k in keys} == before
    finally:
        sh("ip", "-n", NS, "addr", "del", "10.1.0.2/24", "dev", "in0", check=False)
