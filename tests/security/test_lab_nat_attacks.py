"""Live lab, UDP encapsulation: two MNs behind one NAT, and a relayed IKE request.

1. Two honest MNs behind the router's NAT (one public address, different ports, ESP in UDP):
   both register and both get their downlink; neither MN's traffic goes to the other (the GW
   keys the downlink by MN, not by care-of address).
2. An on-path attacker holds one of the MN's IKE requests (a liveness check, ESP in UDP) and
   relays it from a third address first: the GW answers it, but its ESP SA stays where the
   SIU put it (``esp-move-not-by-siu``); the MN's downlink keeps flowing.

Needs root, network namespaces and nftables: in CI (CI=true) a missing requirement FAILS,
elsewhere skips.
"""

from __future__ import annotations

import pytest

import lablib
import labs
from mipsec.lab.topology import GW_OUTSIDE

pytestmark = [pytest.mark.netns, pytest.mark.slow]

NAT_PREFIX = labs.prefix("sn")
RELAY_PREFIX = labs.prefix("sr")
THIRD = "172.16.2.99"             # an address of neither MN, on visited network b
HOLD_TABLE = "ike_hold"
NAT_T_PORT = 4500


def test_two_mns_behind_one_nat_both_get_their_downlink():
    with labs.started(NAT_PREFIX, mobiles=2, nat=True, udp_encap=True, place=None) as lab:
        for k in (1, 2):
            lab.move("n", wait=True, timeout=20, k=k)
        state = lablib.state(lab)
        for k in (1, 2):
            home = lab.home_address(k)
            assert state["ha"].get(home) is not None, state["ha"]
            assert state["gw"][home]["binding"] == "bound", state["gw"][home]
        for k in (1, 2):
            assert lablib.downlink(lab, k) >= 18, k
            assert lablib.uplink(lab, k) >= 18, k
        # each MN's inbound SA authenticated only its own traffic: no downlink crossed over
        for k in (1, 2):
            mn = lablib.status(lab, lab.mn(k))["node"]
            assert not mn.get("drops", {}).get("unknown-spi"), (k, mn.get("drops"))
        assert lablib.state(lab)["gw"] == state["gw"]


def _hold_ike(lab, source: str, hold: bool) -> None:
    """Drop, in the router, IKE over UDP 4500 (non-ESP marker: four zero bytes) from ``source``."""
    lablib.hold(lab, "rt", "ip", HOLD_TABLE, f"ip saddr {source} udp dport {NAT_T_PORT} @th,64,32 0",
                hold, priority=-5)


def _ike_requests(pcap: str, source: str) -> list:
    from scapy.all import IP, UDP, rdpcap
    out = []
    for frame in rdpcap(pcap):
        if (IP in frame and UDP in frame and frame[IP].src == source
                and frame[UDP].dport == NAT_T_PORT):
            payload = bytes(frame[UDP].payload)
            if payload[:4] == b"\0\0\0\0" and len(payload) > 4 + 28 and payload[4 + 19] & 0x20 == 0:
                out.append(payload)        # IKE header flags (RFC 7296 §3.1): R bit clear
    return out


def test_relayed_ike_request_from_a_third_address_does_not_move_the_esp_sa():
    with labs.started(RELAY_PREFIX, udp_encap=True, place="a",
                            ike={"dpd_interval_s": 1.0}) as lab:
        labs.wait_until(lambda: lablib.registered(lab, 1, "a"))
        coa = lab.care_of("a", 1)
        before = lablib.state(lab)
        drops_before = lablib.drops(lab, "gw")
        _hold_ike(lab, coa, True)
        try:
            with lab.sniff("rt", "va0", "ike-held") as pcap:
                labs.wait_until(lambda: _ike_requests(pcap, coa), timeout=15)
            request = _ike_requests(pcap, coa)[0]
            from scapy.all import IP, UDP, Raw
            relayed = bytes(IP(src=THIRD, dst=GW_OUTSIDE) / UDP(sport=NAT_T_PORT, dport=NAT_T_PORT)
                            / Raw(request))
            lablib.tool(lab, "rt", "raw", GW_OUTSIDE, "1", relayed.hex())
            labs.wait_until(lambda: lablib.drops(lab, "gw")["esp-move-not-by-siu"]
                              > drops_before["esp-move-not-by-siu"])
            after = lablib.state(lab)
            home = lab.home_address(1)
            assert after["gw"][home]["out_remote"] == before["gw"][home]["out_remote"] == coa
            assert after["gw"] == before["gw"]
        finally:
            _hold_ike(lab, coa, False)
        assert lablib.downlink(lab, 1) >= 18
        assert lablib.uplink(lab, 1) >= 18
