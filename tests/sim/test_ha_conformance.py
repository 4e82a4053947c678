"""The home agent against RFC 5944's registration rules where they apply to this design.

* S (simultaneous bindings, §3.8.3): we keep one binding per MN; a request with S is accepted
  with code 1, which says so;
* M / G (minimal / GRE encapsulation, §3.8.3): we tunnel IP-in-IP only: code 139, no binding;
* D clear (§3.6.1.1, §3.8): there is no foreign agent here, so a care-of address must be
  co-located and D set: code 134, no binding (a deregistration needs no D);
* the reply at home goes to the request's UDP source port (§3.8.3.1).  Through the GW the reply
  travels in an SIU and the GW delivers it to port 434 (docs/protocol.md, "Conformance").
Each refusal is an authenticated request answered with a reply that names the code, at home
directly, through the GW in a REJECT SIU that moves nothing.
"""

from __future__ import annotations

import pytest

from mipsec.drops import DropReason
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.node.actions import PersistBinding, SendToNet
from mipsec.node.packet import a2b, build_udp_packet, parse_udp_packet
from mipsec.sim.topology import build_topology
from mipsec.wire.mip import (
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    build_registration_request,
    parse_registration_reply,
)
from mipsec.wire.siu import SiuType, parse_siu

HOME = "10.1.0.100"
COA = "172.16.1.10"
AWAY_SRC = "172.16.1.10"


def _rrq(mn, flags, *, lifetime=600, coa=COA, src=AWAY_SRC, sport=434):
    msa = MobilitySecurityAssociation(mn.msa.spi, mn.config.msa.key)
    rrq = RegistrationRequest(home_address=mn.home_address, home_agent=mn.config.home_agent,
                              care_of_address=coa,
                              identification=msa.new_identification(mn.wallclock()),
                              lifetime=lifetime, flags=flags)
    data = msa.sign(build_registration_request(rrq))
    return build_udp_packet(a2b(src), a2b(mn.config.home_agent), sport, 434, data)


def _reply(acts, *, via_gateway):
    """(code, SIU type or None, destination port) of the reply among the HA's actions."""
    (send,) = [a for a in acts if isinstance(a, SendToNet)]
    _src, _dst, _sport, dport, payload = parse_udp_packet(send.packet)
    if via_gateway:
        siu = parse_siu(payload)
        return parse_registration_reply(siu.rrp).code, siu.type, None
    return parse_registration_reply(payload).code, None, dport


@pytest.fixture
def roles():
    topo = build_topology(1, seed=5)
    return topo, topo.mn.role, topo.ha.role


D, T = RequestFlags.D, RequestFlags.T


@pytest.mark.parametrize("via_gateway", [True, False])
def test_simultaneous_bindings_requested_is_accepted_with_code_1(roles, via_gateway):
    topo, mn, ha = roles
    src = AWAY_SRC if via_gateway else HOME
    acts = ha.receive_from_net(_rrq(mn, RequestFlags.S | D | T, src=src), 0.0)
    code, siu_type, _port = _reply(acts, via_gateway=via_gateway)
    assert code == ReplyCode.ACCEPTED_NO_SIMULTANEOUS_BINDINGS
    assert siu_type in (None, SiuType.UPDATE)
    assert ha.bindings[HOME].care_of_address == COA and not ha.drops


@pytest.mark.parametrize("flag", [RequestFlags.M, RequestFlags.G])
@pytest.mark.parametrize("via_gateway", [True, False])
def test_minimal_or_gre_encapsulation_is_refused_with_139(roles, flag, via_gateway):
    topo, mn, ha = roles
    src = AWAY_SRC if via_gateway else HOME
    acts = ha.receive_from_net(_rrq(mn, flag | D | T, src=src), 0.0)
    code, siu_type, _port = _reply(acts, via_gateway=via_gateway)
    assert code == ReplyCode.HA_REQUESTED_ENCAPSULATION_UNAVAILABLE
    assert siu_type in (None, SiuType.REJECT)
    assert not any(isinstance(a, PersistBinding) for a in acts)
    assert ha.bindings == {} and ha.drops == {DropReason.MIP_ENCAPSULATION_UNAVAILABLE: 1}


@pytest.mark.parametrize("via_gateway", [True, False])
def test_a_foreign_agent_care_of_address_d_clear_is_refused_with_134(roles, via_gateway):
    topo, mn, ha = roles
    src = AWAY_SRC if via_gateway else HOME
    acts = ha.receive_from_net(_rrq(mn, T, src=src), 0.0)
    code, siu_type, _port = _reply(acts, via_gateway=via_gateway)
    assert code == ReplyCode.HA_POORLY_FORMED_REQUEST
    assert siu_type in (None, SiuType.REJECT)
    assert ha.bindings == {} and ha.drops == {DropReason.MIP_NOT_CO_LOCATED: 1}


def test_a_deregistration_needs_no_d_flag_and_the_reply_goes_to_the_source_port(roles):
    topo, mn, ha = roles
    ha.receive_from_net(_rrq(mn, D | T), 0.0)
    assert HOME in ha.bindings
    topo.sim.run(until=1.0)                      # a newer identification
    acts = ha.receive_from_net(_rrq(mn, RequestFlags(0), lifetime=0, coa=HOME, src=HOME,
                                    sport=40123), 1.0)
    code, _siu, port = _reply([a for a in acts if isinstance(a, SendToNet)][:1],
                              via_gateway=False)
    assert code == ReplyCode.ACCEPTED and port == 40123
    assert HOME not in ha.bindings and not ha.drops
