"""Live lab: a visited network that hands out an address inside the home prefix cannot switch the
tunnel off (docs/security.md, "at home").

The MN is registered in visited network a; the visited network then gives its interface a
home-prefix address (as a hostile DHCP server would), beside the care-of address and instead of
it.  While the visited link is captured, the MN's applications keep sending to the CN.
Afterwards: not one packet of the home prefix crossed the visited link in the clear (only ESP,
IKE and ARP did), the MN did not deregister, HA and GW kept its binding and SAs, and its
traffic flowed through the tunnel (with its care-of address) or not at all (without).

Needs root and network namespaces: in CI (CI=true) a missing requirement FAILS, elsewhere skips.
"""

from __future__ import annotations

import ipaddress

import pytest

import lablib
import labs
from mipsec.lab.topology import CN, HOME_PREFIX

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = labs.prefix("sv")
ROGUE = "10.1.0.77"          # the hostile visited network's "DHCP" address, in the home prefix
ESP, UDP = 50, 17
IKE_PORTS = {500, 4500}


@pytest.fixture(scope="module")
def lab():
    with labs.started(PREFIX, place="a") as lab:
        yield lab


def _clear_home_traffic(pcap: str) -> list[str]:
    """Frames on the visited link that are neither ESP, IKE / NAT-T nor ARP and carry a
    home-prefix address (source or destination) or an application token in the clear."""
    from scapy.all import IP, rdpcap
    home = ipaddress.ip_network(HOME_PREFIX)
    bad = []
    for frame in rdpcap(pcap):
        if IP not in frame:
            continue
        ip = frame[IP]
        if ip.proto == ESP:
            continue
        if ip.proto == UDP and ({ip.sport, ip.dport} & IKE_PORTS):
            continue
        clear = bytes(ip)
        if (ipaddress.ip_address(ip.src) in home or ipaddress.ip_address(ip.dst) in home
                or b"app " in clear):
            bad.append(frame.summary())
    return bad


@pytest.mark.parametrize("keep_care_of", [True, False], ids=["beside-coa", "instead-of-coa"])
def test_home_prefix_address_on_a_visited_link_sends_nothing_in_the_clear(lab, keep_care_of):
    labs.wait_until(lambda: lablib.registered(lab, 1, "a"))
    before = lablib.state(lab)
    assert lablib.uplink(lab, 1) >= 15
    mn = lab.mn(1)
    with lab.sniff("rt", "va0", f"visited-{keep_care_of}") as pcap:
        if not keep_care_of:
            assert lab.exec(mn, "ip", "addr", "flush", "dev", "va0").returncode == 0
        proc = lab.exec(mn, "ip", "addr", "add", f"{ROGUE}/24", "dev", "va0")
        assert proc.returncode == 0, proc.stderr
        listener = lablib.Listener(lab, "cn", seconds=3.0)
        lablib.send(lab, mn, CN, 40, "app")
        arrived = listener.tokens()
    assert _clear_home_traffic(pcap) == []
    timeline = lablib.status(lab, mn)["timeline"]
    kinds = [e["kind"] for e in timeline]
    assert "deregistered" not in kinds and "returned-home" not in kinds, kinds[-10:]
    node = lablib.status(lab, mn)["node"]
    # without its care-of address the MN is "detached": it sends nothing from the address that
    # went (no IKE, no liveness check), its registration stands and nothing moved at GW and HA
    assert node["state"] == ("registered" if keep_care_of else "detached"), node["state"]
    assert lablib.state(lab) == before
    if keep_care_of:
        # the care-of address still works: the application traffic went through the tunnel
        assert len(arrived) >= 30, arrived
    # the visited network gives the care-of address back: traffic flows as before
    lab.exec(mn, "ip", "addr", "del", f"{ROGUE}/24", "dev", "va0")
    if not keep_care_of:
        lab.move("a", wait=False, k=1)   # the same care-of address: the registration stands
    labs.wait_until(lambda: lablib.registered(lab, 1, "a"))
    assert lablib.uplink(lab, 1) >= 15
    assert lablib.downlink(lab, 1) >= 15
