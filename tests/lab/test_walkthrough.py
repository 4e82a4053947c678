"""docs/operations.md §6 ("Three VMs"), followed as written, on namespaces acting as machines.

Each machine (HA, GW, MN) is a network namespace whose commands run in a private mount namespace
with its own /etc/mipsec and /run/mipsec (``unshare --mount`` + bind mounts of a directory per
machine), so the files, control sockets and locks of one never meet another's.  A fourth
namespace is the home network's own Internet router and the Internet (with a host
198.51.100.1), a fifth a correspondent on the home link.  The steps:

1. ``mipsec keys --out keys --mobiles 1`` on "one machine"; copy ha.toml, gw.toml, mn.toml to
   the machines' /etc/mipsec (mode 0600);
2. ``mipsec check keys/*.toml`` (the generated set needs no edits here: the namespaces use the
   addressing plan and interface names it was written for);
3. the routing commands of step 3's code block, run on the HA as they are written;
4. the daemons started with the ExecStart of the units ``mipsec install-units`` writes;
5. the MN roams the DHCP way (address first, then the default route) to visited network a and
   then b; after each move ``mipsec status --role mn`` says registered at that care-of address,
   ``mipsec status --role gw`` shows the MN's outbound SA pointing there, and the MN reaches a
   home host; all along the home network still reaches the Internet (§1: the GW is not its
   router).

Needs root and namespaces: in CI a missing requirement fails, elsewhere it skips.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

import needs
from mipsec.lab.lab import requirements_problem
from mipsec.units import unit_text

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
P = f"wk{os.getpid() % 100000}-"
MACHINES = ("ha", "gw", "mn")
INTERNET_HOST = "198.51.100.1"
CN = "10.1.0.10"
HOME = "10.1.0.100"
COA = {"a": ("va0", "172.16.1.10", "172.16.1.254"), "b": ("vb0", "172.16.2.10", "172.16.2.254")}


def ip(*args, ns=None, check=True):
    cmd = ["ip"] + (["-n", P + ns] if ns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {proc.stderr}")
    return proc


def veth(a, a_if, b, b_if):
    ip("link", "add", a_if, "netns", P + a, "type", "veth", "peer", "name", b_if, "netns", P + b)
    ip("link", "set", a_if, "up", ns=a)
    ip("link", "set", b_if, "up", ns=b)


def section_6() -> str:
    text = open(os.path.join(ROOT, "docs", "operations.md")).read()
    return text[text.index("## 6. Three VMs"):]


def step_3_commands() -> list[list[str]]:
    """The code block of §6 step 3, one command per line."""
    sec = section_6()
    step = sec[sec.index("\n3. "):sec.index("\n4. ")]
    (block,) = re.findall(r"```\n(.*?)```", step, re.S)
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


class Machines:
    def __init__(self, base):
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}
        self.created_mountpoints: list[str] = []

    def dir(self, machine, what):
        return os.path.join(self.base, machine, what)

    def on(self, machine, *cmd, check=True, timeout=60):
        """Run ``cmd`` on a machine: its netns, its own /etc/mipsec and /run/mipsec."""
        proc = subprocess.run(self._wrap(machine, cmd), capture_output=True, text=True,
                              timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{machine}: {' '.join(cmd)}: {proc.returncode} "
                                 f"{proc.stdout} {proc.stderr}")
        return proc

    def start(self, machine, cmd):
        log = open(os.path.join(self.base, f"{machine}.log"), "w")
        self.procs[machine] = subprocess.Popen(self._wrap(machine, cmd), stdout=log,
                                               stderr=subprocess.STDOUT, env=self.env)

    def _wrap(self, machine, cmd):
        if machine not in MACHINES:              # the correspondent: a plain host
            return ["ip", "netns", "exec", P + machine, *cmd]
        script = ('mount --bind "$1" /etc/mipsec && mount --bind "$2" /run/mipsec && '
                  'shift 2 && exec "$@"')
        return ["ip", "netns", "exec", P + machine, "unshare", "--mount", "--propagation",
                "private", "sh", "-c", script, "sh", self.dir(machine, "etc"),
                self.dir(machine, "run"), *cmd]

    @property
    def env(self):
        return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def status(self, machine, role):
        return json.loads(self.on(machine, sys.executable, "-m", "mipsec", "status", "--role",
                                  role, "--json").stdout)

    def log(self, machine):
        try:
            return open(os.path.join(self.base, f"{machine}.log")).read()[-3000:]
        except OSError:
            return ""


@pytest.fixture
def machines(tmp_path):
    problem = requirements_problem() or (None if shutil.which("unshare") else "no unshare")
    needs.need(problem, f"the walkthrough test is required in CI: {problem}")
    m = Machines(str(tmp_path))
    for mountpoint in ("/etc/mipsec", "/run/mipsec"):
        if not os.path.isdir(mountpoint):
            os.makedirs(mountpoint)
            m.created_mountpoints.append(mountpoint)
    for machine in MACHINES:
        for what in ("etc", "run"):
            os.makedirs(m.dir(machine, what), mode=0o700)
    try:
        for ns in ("inet", "cn", *MACHINES):
            subprocess.run(["ip", "netns", "add", P + ns], check=True)
            ip("link", "set", "lo", "up", ns=ns)
        # the home network's own router, the Internet behind it, and the home link (a bridge)
        ip("link", "add", "br0", "type", "bridge", ns="inet")
        ip("link", "set", "br0", "up", ns="inet")
        ip("addr", "add", "10.1.0.254/24", "dev", "br0", ns="inet")
        ip("addr", "add", f"{INTERNET_HOST}/32", "dev", "lo", ns="inet")
        for machine, ifname, port in (("ha", "eth0", "pha"), ("cn", "eth0", "pcn"),
                                      ("gw", "in0", "pgw"), ("mn", "home0", "pmn")):
            veth(machine, ifname, "inet", port)
            ip("link", "set", port, "master", "br0", ns="inet")
        ip("addr", "add", "10.1.0.2/24", "dev", "eth0", ns="ha")
        ip("route", "add", "default", "via", "10.1.0.254", ns="ha")
        ip("addr", "add", f"{CN}/24", "dev", "eth0", ns="cn")
        ip("route", "add", "default", "via", "10.1.0.254", ns="cn")
        ip("addr", "add", "10.1.0.1/24", "dev", "in0", ns="gw")
        # the GW's outside and the MN's visited networks, all on the Internet router
        veth("gw", "out0", "inet", "rgw")
        ip("addr", "add", "172.16.0.1/24", "dev", "out0", ns="gw")
        ip("addr", "add", "172.16.0.254/24", "dev", "rgw", ns="inet")
        ip("route", "add", "default", "via", "172.16.0.254", ns="gw")
        for where, (ifname, _coa, router) in COA.items():
            veth("mn", ifname, "inet", f"r{where}")
            ip("addr", "add", f"{router}/24", "dev", f"r{where}", ns="inet")
        subprocess.run(["ip", "netns", "exec", P + "inet", "sysctl", "-qw",
                        "net.ipv4.ip_forward=1"], check=True)
        yield m
    finally:
        for proc in m.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in m.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for ns in ("inet", "cn", *MACHINES):
            pids = subprocess.run(["ip", "netns", "pids", P + ns], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", P + ns], capture_output=True)
        for mountpoint in m.created_mountpoints:
            try:
                os.rmdir(mountpoint)
            except OSError:
                pass


def wait_registered(m, coa, timeout=30.0):
    end = time.monotonic() + timeout
    status = None
    while time.monotonic() < end:
        try:
            status = m.status("mn", "mn")
            node = status["node"]
            if node.get("state") == "registered" and node.get("care_of") == coa:
                return status
        except (AssertionError, ValueError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"MN not registered at {coa}: {status}\n{m.log('mn')}\n{m.log('gw')}"
                         f"\n{m.log('ha')}")


def roam(m, where, previous=None):
    """DHCP on the new network: the address first, then the default route."""
    ifname, coa, router = COA[where]
    if previous is not None:
        m.on("mn", "ip", "addr", "flush", "dev", COA[previous][0])
    m.on("mn", "ip", "addr", "add", f"{coa}/24", "dev", ifname)
    m.on("mn", "ip", "route", "replace", "default", "via", router, "dev", ifname)
    return coa


def pings(m, machine, target, count=3):
    proc = m.on(machine, "ping", "-c", str(count), "-i", "0.2", "-W", "2", target, check=False)
    found = re.search(r"(\d+) received", proc.stdout)
    return int(found.group(1)) if found else 0


def test_operations_section_6_as_written(machines, tmp_path):
    m = machines
    py = [sys.executable, "-m", "mipsec"]
    keys = str(tmp_path / "keys")
    # 1. keys on one machine, copied to each machine's /etc/mipsec
    subprocess.run(py + ["keys", "--out", keys, "--mobiles", "1"], check=True, env=m.env,
                   capture_output=True)
    for machine in MACHINES:
        dst = os.path.join(m.dir(machine, "etc"), f"{machine}.toml")
        shutil.copy(os.path.join(keys, f"{machine}.toml"), dst)
        os.chmod(dst, 0o600)
    # 2. the set agrees
    proc = subprocess.run(py + ["check", *(os.path.join(keys, f"{n}.toml") for n in MACHINES)],
                          capture_output=True, text=True, env=m.env)
    assert proc.returncode == 0, proc.stderr
    # 3. routing outside mipsec, on the HA, exactly as the guide writes it
    for cmd in step_3_commands():
        m.on("ha", *cmd)
    # the home network reaches the Internet through its own router, not through the GW
    assert pings(m, "cn", INTERNET_HOST) >= 1
    assert pings(m, "ha", INTERNET_HOST) >= 1
    # 4. the daemons, started as the units start them
    for machine in ("ha", "gw", "mn"):
        (line,) = [ln for ln in unit_text(machine).splitlines() if ln.startswith("ExecStart=")]
        cmd = shlex.split(line.removeprefix("ExecStart=").replace("%i", machine))
        m.start(machine, cmd)
    for machine in ("ha", "gw", "mn"):
        end = time.monotonic() + 30
        while True:
            sock = os.path.join(m.dir(machine, "run"), f"{machine}.sock")
            if os.path.exists(sock):
                break
            assert m.procs[machine].poll() is None, m.log(machine)
            assert time.monotonic() < end, m.log(machine)
            time.sleep(0.2)
    # 5. roam, check, roam again
    previous = None
    for where in ("a", "b"):
        coa = roam(m, where, previous)
        previous = where
        wait_registered(m, coa)
        gw = m.status("gw", "gw")["node"]
        assert gw["mobiles"][HOME]["sas"]["outbound"]["remote"] == coa, gw["mobiles"][HOME]
        human = m.on("mn", *py, "status", "--role", "mn").stdout
        assert "registered" in human and coa in human
        assert pings(m, "mn", CN) >= 1, (m.log("mn"), m.log("gw"), m.log("ha"))
        assert pings(m, "cn", HOME) >= 1
        assert pings(m, "cn", INTERNET_HOST) >= 1
    for machine in ("ha", "gw", "mn"):
        assert m.procs[machine].poll() is None, m.log(machine)
        assert "Traceback" not in m.log(machine), m.log(machine)


def wait_for_line(m, machine, needle, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in m.log(machine).splitlines():
            if needle(line):
                return line
        time.sleep(0.2)
    raise AssertionError(f"{machine}: no such line\n{m.log(machine)}")


def test_real_daemons_warn_about_a_psk_and_an_mn_ha_key_mismatch(machines, tmp_path):
    """The same machines with a spoiled PSK at the MN: the GW logs a WARNING naming the reason
    and the MN's care-of address; then the MN restarts with the right PSK but a spoiled MN-HA
    key: the HA logs its WARNING (as JSON: log_format = "json" in its file)."""
    import dataclasses

    from mipsec.config import load_config, write_config
    m = machines
    py = [sys.executable, "-m", "mipsec"]
    keys = str(tmp_path / "keys")
    subprocess.run(py + ["keys", "--out", keys, "--mobiles", "1"], check=True, env=m.env,
                   capture_output=True)
    cfgs = {n: load_config(os.path.join(keys, f"{n}.toml")) for n in MACHINES}
    if cfgs["mn"].node.ike is None:
        pytest.fail("mipsec keys wrote manual keys; this test spoils the IKE PSK")
    ha = cfgs["ha"]
    cfgs["ha"] = dataclasses.replace(ha, daemon=dataclasses.replace(ha.daemon, log_format="json"))
    mn = cfgs["mn"]
    bad_psk = dataclasses.replace(mn, node=dataclasses.replace(mn.node, ike=dataclasses.replace(
        mn.node.ike, psk=bytes([mn.node.ike.psk[0] ^ 1]) + mn.node.ike.psk[1:])))
    bad_msa = dataclasses.replace(mn, node=dataclasses.replace(mn.node, msa=dataclasses.replace(
        mn.node.msa, key=bytes([mn.node.msa.key[0] ^ 1]) + mn.node.msa.key[1:])))
    cfgs["mn"] = bad_psk
    for machine in MACHINES:
        write_config(cfgs[machine], os.path.join(m.dir(machine, "etc"), f"{machine}.toml"))
    for cmd in step_3_commands():
        m.on("ha", *cmd)
    for machine in MACHINES:
        m.start(machine, py + [machine, "--config", f"/etc/mipsec/{machine}.toml"])
    time.sleep(2.0)
    coa = roam(m, "a")
    line = wait_for_line(m, "gw", lambda ln: "WARNING" in ln and "ike-authentication-failed" in ln)
    assert coa in line and "PSK or identity mismatch" in line
    # the MN again, with the right PSK and a wrong MN-HA key
    proc = m.procs.pop("mn")
    proc.terminate()
    proc.wait(timeout=20)
    write_config(bad_msa, os.path.join(m.dir("mn", "etc"), "mn.toml"))
    m.start("mn", py + ["mn", "--config", "/etc/mipsec/mn.toml"])
    line = wait_for_line(m, "ha", lambda ln: '"mip-authentication-failed"' in ln)
    record = json.loads(line)
    assert record["level"] == "WARNING" and record["reason"] == "mip-authentication-failed"
    assert coa in record["peer"] and "MN-HA key mismatch" in record["message"]
