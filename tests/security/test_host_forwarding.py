"""Live lab: from the GW's outside link nothing reaches the home network but authenticated ESP
(docs/security.md §3.1).  Real daemons in network namespaces; the attacker is the router
namespace on the GW's outside link, with a route to the home prefix through the GW.

1. a plain UDP packet to the CN does not arrive;
2. a clear IP-in-IP packet (outer: the MN's CoA -> HA, inner: the MN's home address -> CN) is not
   delivered, neither through the GW nor sent to the HA on another of its interfaces;
3. authenticated traffic still flows both ways;
4. the GW's protection holds after someone writes ``net.ipv4.ip_forward = 1`` on the GW (which
   switches forwarding back on for every interface): the netfilter layer still drops;
5. the control: once the GW daemon stops (it restores the values it changed) the very same
   packets do arrive, so 1 and 2 test what they claim.

Needs root and network namespaces: in CI (CI=true) a missing requirement FAILS, elsewhere skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

import labs
import needs
from mipsec.lab.lab import Lab
from mipsec.lab.topology import CN, GW_OUTSIDE, HA, MN_COA, MN_HOME_ADDRESS

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = labs.prefix("sh")
ATTACKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attacker.py")
LISTEN_S = 2.0


@pytest.fixture(scope="module")
def lab():
    with labs.started(PREFIX, place="a") as lab:
        # the attacker on the GW's outside link knows where the home network is
        ok = lab.exec("rt", "ip", "route", "add", "10.1.0.0/24", "via", GW_OUTSIDE)
        assert ok.returncode == 0, ok.stderr
        yield lab


class Listener:
    """A UDP listener in a lab namespace; ``tokens()`` is what it received."""

    def __init__(self, lab: Lab, node: str, port: int):
        self.proc = lab.popen(node, sys.executable, ATTACKER, "listen", str(port), str(LISTEN_S),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "listening", self.proc.stderr.read()

    def tokens(self) -> list[str]:
        out, err = self.proc.communicate(timeout=LISTEN_S + 20)
        assert self.proc.returncode == 0, err
        return [line.split()[1] for line in out.splitlines() if len(line.split()) == 2]


def attack(lab: Lab, node: str, *args: str) -> None:
    proc = lab.exec(node, sys.executable, ATTACKER, *args, timeout=30)
    assert proc.returncode == 0, proc.stderr


def plain_udp_arrives(lab: Lab, token: str) -> bool:
    listener = Listener(lab, "cn", 6001)
    attack(lab, "rt", "udp", "172.16.0.254", CN, "6001", token)
    return token in listener.tokens()


def clear_ipip_arrives(lab: Lab, token: str, node: str = "rt") -> bool:
    listener = Listener(lab, "cn", 6002)
    attack(lab, node, "ipip", MN_COA["a"], HA, MN_HOME_ADDRESS, CN, "6002", token)
    return token in listener.tokens()


def test_plain_udp_from_the_outside_does_not_reach_the_cn(lab):
    assert not plain_udp_arrives(lab, "plain-udp-1")


def test_clear_ipip_with_the_mns_addresses_is_not_delivered(lab):
    assert not clear_ipip_arrives(lab, "clear-ipip-1")
    # the HA never saw it: nothing was reverse-tunnelled
    assert lab.status("ha")["node"].get("counters", {}).get("reverse-tunnelled", 0) == 0


def test_ipip_arriving_on_another_ha_interface_is_ignored(lab):
    """The HA trusts IP-in-IP only from its home link: its raw socket is bound there."""
    ha, rt = lab.names.ns("ha"), lab.names.ns("rt")
    for cmd in (["ip", "-n", ha, "link", "add", "side0", "type", "veth", "peer", "name", "side1",
                 "netns", rt],
                ["ip", "-n", ha, "addr", "add", "192.168.77.1/24", "dev", "side0"],
                ["ip", "-n", ha, "link", "set", "side0", "up"],
                ["ip", "-n", rt, "addr", "add", "192.168.77.2/24", "dev", "side1"],
                ["ip", "-n", rt, "link", "set", "side1", "up"],
                ["ip", "-n", rt, "route", "add", f"{HA}/32", "via", "192.168.77.1"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, (cmd, proc.stderr)
    try:
        assert not clear_ipip_arrives(lab, "side-ipip-1")
    finally:
        subprocess.run(["ip", "-n", rt, "route", "del", f"{HA}/32"], capture_output=True)
        subprocess.run(["ip", "-n", ha, "link", "del", "side0"], capture_output=True)


def test_authenticated_traffic_still_flows(lab):
    listener = Listener(lab, "cn", 6003)
    send = ("import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.bind(('{MN_HOME_ADDRESS}',0))\n"
            "for i in range(5):\n"
            f"    s.sendto(b'uplink-ok',('{CN}',6003)); time.sleep(0.05)\n")
    proc = lab.exec("mn", sys.executable, "-c", send, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "uplink-ok" in listener.tokens()
    ping = lab.exec("cn", "ping", "-c", "3", "-i", "0.2", "-W", "1", MN_HOME_ADDRESS, timeout=30)
    assert " 0 received" not in ping.stdout and ping.returncode == 0, ping.stdout


def test_protection_holds_after_ip_forward_is_switched_on_again(lab):
    needs.need(None if shutil.which("nft") or os.path.exists("/usr/sbin/nft") else
               "nft not installed (Debian package nftables)",
               "nftables is required in CI (tools/setup.sh installs it)")
    # (the kernel writes every interface's flag only when the value changes: off, then on)
    proc = lab.exec("gw", "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward; "
                    "echo 1 > /proc/sys/net/ipv4/ip_forward; "
                    "cat /proc/sys/net/ipv4/conf/out0/forwarding")
    assert proc.stdout.strip() == "1"          # the kernel re-enabled it on every interface
    assert not plain_udp_arrives(lab, "plain-udp-2")
    assert not clear_ipip_arrives(lab, "clear-ipip-2")


def test_control_without_the_gw_daemon_the_same_packets_arrive(lab):
    """Stop the GW: it removes its table and restores out0's forwarding (the lab router's 1);
    the HA keeps the MN's binding, so the old hole is open again and both attacks get through.
    This shows the two tests above would see a packet that got through."""
    lab.kill("gw")
    pid = lab.pid("gw")
    deadline = time.monotonic() + 10
    while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    assert lab.exec("gw", "cat", "/proc/sys/net/ipv4/conf/out0/forwarding").stdout.strip() == "1"
    assert "mipsec_gw" not in lab.exec("gw", "nft", "list", "tables").stdout
    assert plain_udp_arrives(lab, "plain-udp-3")
    assert clear_ipip_arrives(lab, "clear-ipip-3")
