"""The lab with several MNs (`mipsec lab up --mobiles N`) and the NAT'd visited network.

Each MN has its own namespace, home address, IKE identity, control socket and visited-network
attachments; moving one leaves the others where they are; `mipsec lab status` shows each of
them.  Behind the router's NAT (`--nat`, visited network n) two MNs reach the GW from one public
address with different ports.

Needs root and network namespaces (and nftables for the NAT): in CI (CI=true) a missing
requirement FAILS, elsewhere skips.
"""

from __future__ import annotations

import json
import os

import pytest

import labs
from mipsec.lab import topology as topo
from mipsec.lab.lab import Lab
from mipsec.lab.topology import existing_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = labs.prefix("mm")
cli = labs.cli


@pytest.fixture(scope="module")
def lab():
    with labs.torn_down(PREFIX):
        proc = cli("lab", "up", "--prefix", PREFIX, "--mobiles", "2")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "2 MNs at a" in proc.stdout
        yield Lab(prefix=PREFIX)


def lab_status(*extra: str) -> dict:
    proc = cli("lab", "status", "--prefix", PREFIX, "--json", *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def pings(lab: Lab, node: str, address: str) -> int:
    proc = lab.exec(node, "ping", "-c", "3", "-i", "0.2", "-W", "1", address)
    for line in proc.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    return 0


def wait_for(check, timeout: float = 5.0):
    return labs.wait_until(check, timeout)


def test_each_mn_has_its_namespace_identity_socket_and_address(lab):
    assert lab.daemons == ("ha", "gw", "mn1", "mn2")
    assert sorted(existing_namespaces(PREFIX)) == sorted(lab.names.all)
    status = lab_status()
    assert set(status) == {"ha", "gw", "mn1", "mn2"}
    gw, ha = status["gw"]["node"], status["ha"]["node"]
    for k in (1, 2):
        mn = status[f"mn{k}"]["node"]
        home, coa = lab.home_address(k), lab.care_of("a", k)
        assert mn["home_address"] == home and mn["care_of"] == coa, mn
        assert ha["bindings"][home]["care_of"] == coa, ha["bindings"]
        assert gw["mobiles"][home]["care_of"] == coa, gw["mobiles"][home]
        assert os.path.exists(lab.socket(f"mn{k}"))
    peers = {sa["peer_id"]: sa["remote"] for sa in gw["ike"]["ike_sas"]
             if sa["state"] == "established"}
    assert peers == {"mn1@mipsec.lab": "172.16.1.10:500", "mn2@mipsec.lab": "172.16.1.11:500"}
    # --mobile K shows only that MN beside the HA and the GW
    assert set(lab_status("--mobile", "2")) == {"ha", "gw", "mn2"}
    proc = cli("lab", "status", "--prefix", PREFIX, "--mobile", "3")
    assert proc.returncode != 0 and "no mobile node 3" in proc.stderr, proc.stderr


def test_moving_one_mn_leaves_the_other_and_both_get_traffic(lab):
    assert pings(lab, "cn", lab.home_address(1)) >= 1
    assert pings(lab, "cn", lab.home_address(2)) >= 1
    proc = cli("lab", "handover", "b", "--prefix", PREFIX, "--mobile", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("mn2 moved to b"), proc.stdout

    def moved():
        status = lab_status()
        ha = status["ha"]["node"]["bindings"]
        assert ha[lab.home_address(2)]["care_of"] == lab.care_of("b", 2), ha
        assert ha[lab.home_address(1)]["care_of"] == lab.care_of("a", 1), ha
        gw = status["gw"]["node"]["mobiles"]
        assert gw[lab.home_address(2)]["sas"]["outbound"]["remote"] == lab.care_of("b", 2)
        assert gw[lab.home_address(1)]["sas"]["outbound"]["remote"] == lab.care_of("a", 1)
        return True
    wait_for(moved)
    assert lab.place(1) == "a" and lab.place(2) == "b"
    assert "inet " not in lab.exec("mn2", "ip", "-4", "addr", "show", "dev", "va0").stdout
    assert pings(lab, "cn", lab.home_address(1)) >= 1
    assert pings(lab, "cn", lab.home_address(2)) >= 1
    # MN 1 comes home (its home address on its own home-link port); MN 2 stays away
    proc = cli("lab", "home", "--prefix", PREFIX, "--mobile", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: lab.home_address(1) not in lab_status()["ha"]["node"]["bindings"])
    assert pings(lab, "cn", lab.home_address(1)) >= 1
    assert pings(lab, "cn", lab.home_address(2)) >= 1


def test_two_mns_behind_one_nat_share_a_public_address_with_different_ports(new_lab):
    """The router masquerades visited network n: both MNs' IKE (UDP-encapsulated, NAT-T) reaches
    the GW from the router's outside address, on two different source ports; no private
    address crosses the router's outside link."""
    from scapy.all import IP, UDP, rdpcap

    lab = new_lab("mz", mobiles=2, nat=True, udp_encap=True, place=None)
    rules = lab.exec("rt", topo.NFT, "list", "table", "ip", topo.NFT_TABLE).stdout
    assert "masquerade" in rules and topo.NAT_PREFIX.split("/")[0] in rules, rules
    with lab.sniff("rt", "out0", "nat-outside") as pcap:
        for k in (1, 2):
            lab.move("n", wait=False, k=k)

        def two_sas():
            gw = lab.status("gw")["node"]
            peers = {sa["peer_id"] for sa in gw["ike"]["ike_sas"]
                     if sa["state"] == "established"}
            assert peers == {"mn1@mipsec.lab", "mn2@mipsec.lab"}, peers
            return True
        wait_for(two_sas, timeout=15.0)
    for k in (1, 2):
        local = lab.exec(lab.mn(k), "ip", "-4", "-o", "addr", "show", "dev",
                         topo.NAT_IFACE).stdout
        assert lab.care_of("n", k) in local, local
    to_gw = [p for p in rdpcap(pcap) if IP in p and p[IP].dst == topo.GW_OUTSIDE]
    leaked = [p.summary() for p in to_gw if p[IP].src != topo.NAT_PUBLIC]
    assert to_gw and not leaked, leaked
    nat_t = {p[UDP].sport for p in to_gw if UDP in p and p[UDP].dport == 4500}
    assert len(nat_t) == 2, nat_t
