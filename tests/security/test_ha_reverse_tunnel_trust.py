"""What the HA trusts in a reverse-tunnelled (IP-in-IP) packet (docs/security.md §3.1), in the
simulator: the outer source must be the binding's care-of address, the inner source that MN's
home address, and the binding must have been registered through a GW.  A binding registered
from the home link (the request's source on the home prefix) has no reverse tunnel: a packet
with a care-of source reaches the home link only through the GW, which forwards nothing from the
outside but authenticated ESP.  (The socket side, only packets that arrived on the home
interface, is tested in the live lab: test_host_forwarding.py.)
"""

from __future__ import annotations

from mipsec.drops import DropReason
from mipsec.mip import ipip
from mipsec.node.actions import WriteToTun
from mipsec.node.packet import a2b, build_udp_packet
from mipsec.sim.scenario import wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4
from mipsec.wire.mip import RegistrationRequest, RequestFlags, build_registration_request

CN = "10.1.0.10"
ELSEWHERE = "172.16.2.77"


def _reverse(ha, home: str, care_of: str) -> bytes:
    inner = build_ipv4(Ipv4Header(home, CN, 17), b"\x00\x01\x00\x02\x00\x0bpay")
    return ipip.encapsulate(inner, care_of, ha.address)


def test_reverse_tunnel_is_accepted_only_for_a_binding_registered_through_the_gw():
    topo = build_topology(1, internet_delay_s=0.002, seed=8)
    topo.move("a", 0)
    assert wait_registered(topo, 1.0)
    ha, mn = topo.ha.role, topo.mobiles[0].role
    now = topo.sim.now
    home, care_of = mn.home_address, mn.care_of

    # through the GW: the MN's own packet from its care-of address is accepted
    assert ha.bindings[home].via_gateway
    actions = ha.receive_from_net(_reverse(ha, home, care_of), now)
    assert [type(a) for a in actions] == [WriteToTun]

    # an authenticated request sent from the home link names a care-of address elsewhere: the
    # HA records the binding, but it was not registered through the GW
    rrq = RegistrationRequest(home_address=home, home_agent=mn.config.home_agent,
                              care_of_address=ELSEWHERE,
                              identification=mn.msa.new_identification(mn.wallclock()),
                              lifetime=600, flags=RequestFlags.D | RequestFlags.T)
    data = mn.msa.sign(build_registration_request(rrq))
    ha.receive_from_net(build_udp_packet(a2b(home), a2b(ha.address), 434, 434, data), now)
    binding = ha.bindings[home]
    assert binding.care_of_address == ELSEWHERE and not binding.via_gateway

    counted = ha.drops[DropReason.REVERSE_TUNNEL_NOT_VIA_GATEWAY]
    tunnelled = ha.counters["reverse-tunnelled"]
    assert ha.receive_from_net(_reverse(ha, home, ELSEWHERE), now) == []
    assert ha.drops[DropReason.REVERSE_TUNNEL_NOT_VIA_GATEWAY] == counted + 1
    assert ha.counters["reverse-tunnelled"] == tunnelled
