"""Going home is decided by the home agent, not by an address (in-memory network).

A visited network that hands out a home-prefix address must not switch the tunnel off; on the
real home link the MN keeps its traffic in the tunnel until the HA's authenticated direct reply
to its deregistration arrives.  Not one application packet leaves in the clear before that, in
any order of events.
"""

import pytest

from mipsec.node import timeline as tl
from mipsec.node.actions import CareOfAddressChanged, Log, ReturnedHome, UseHomeLink
from mipsec.node.mobile_node import RegState
from mipsec.node.packet import a2b
from mipsec.sim.scenario import start_streams, stream_reports, wait_registered
from mipsec.sim.topology import build_topology

ROLE_PROTOCOLS = (50,)            # ESP
ROLE_UDP_PORTS = (500, 4500)      # IKE, NAT-T


def _is_protected(packet):
    """ESP, or IKE / UDP-encapsulated ESP: what may cross a visited link."""
    proto = packet[9]
    if proto in ROLE_PROTOCOLS:
        return True
    ihl = (packet[0] & 0x0F) * 4
    return proto == 17 and int.from_bytes(packet[ihl + 2:ihl + 4], "big") in ROLE_UDP_PORTS


def _clear_from_home_address(capture, home, sender="mn"):
    """Packets the MN sent in a capture whose outer source is its home address and that are not
    its Registration Requests (UDP 434): application traffic in the clear."""
    out = []
    for t, who, p in capture:
        if who != sender:
            continue
        ihl = (p[0] & 0x0F) * 4
        mip = p[9] == 17 and int.from_bytes(p[ihl + 2:ihl + 4], "big") == 434
        if p[12:16] == home and not mip:
            out.append((t, p))
    return out


def _registered(**kw):
    topo = build_topology(1, internet_delay_s=0.005, seed=4, **kw)
    topo.move("a")
    assert wait_registered(topo, 3.0)
    return topo


@pytest.mark.parametrize("sa_source", ["manual", "ikev2"])
def test_home_prefix_address_on_a_visited_link_is_ignored_and_traffic_stays_in_the_tunnel(sa_source):
    topo = _registered(sa_source=sa_source)
    mn = topo.mn.role
    caps = {k: seg.start_capture() for k, seg in topo.visited.items()}
    start_streams(topo, interval_s=0.005, start=topo.sim.now + 0.01, stop=topo.sim.now + 1.0)
    topo.sim.run_for(0.2)
    # the visited network's DHCP hands out an address inside the home prefix, on "a" and on "b"
    for where in ("a", "b"):
        actions = mn.handle_event(CareOfAddressChanged("10.1.0.77", where), topo.sim.now)
        assert [a.__class__ for a in actions] == [Log] and actions[0].level == "warning"
    topo.sim.run_for(1.0)
    assert mn.state is RegState.REGISTERED and mn.care_of == topo.care_of["a"][0]
    assert [e.kind for e in mn.timeline].count("home-prefix-address-ignored") == 2
    sent = [p for cap in caps.values() for _t, _s, p in cap]
    assert sent and all(_is_protected(p) for p in sent)
    rep = stream_reports(topo)
    assert rep["downlink"].lost == 0 and rep["uplink"].lost == 0, rep     # nothing noticed


@pytest.mark.parametrize("sa_source", ["manual", "ikev2"])
def test_home_is_left_only_after_the_authenticated_reply_and_the_tunnel_carries_on_until_then(sa_source):
    """On the home link with the visited link still up: the first deregistration reply is lost,
    so for one retransmission timeout (at least the timer's floor) the MN is on the home link but
    not confirmed home; its stream keeps flowing through the tunnel, and no application packet
    leaves in the clear on either link until the reply that authenticates arrives."""
    topo = _registered(sa_source=sa_source)
    mn, host = topo.mn.role, topo.mn
    home_b = a2b(mn.home_address)
    home_cap = topo.home.start_capture()
    visited_cap = topo.visited["a"].start_capture()
    start_streams(topo, interval_s=0.005, start=topo.sim.now + 0.01, stop=topo.sim.now + 2.5)
    topo.sim.run_for(0.3)
    ha_b = a2b(topo.ha.role.address)
    topo.home.drop_next(lambda p: p[12:16] == ha_b and p[16:20] == home_b, count=1)  # 1st reply
    host.interfaces["home"].bring_up()                # make-before-break to the home link
    host.driver.event(ReturnedHome("home"))
    t_home = topo.sim.now
    topo.sim.run(until=mn.reg.deadline - 0.001)          # just before the retransmission
    assert mn.state is RegState.DEREGISTERING and topo.sim.now - t_home > 0.1
    assert not _clear_from_home_address(home_cap, home_b)
    assert all(_is_protected(p) for _t, _s, p in visited_cap)
    # (the HA dropped the binding when it sent the lost reply: what the tunnel still carries
    # may die there until the retransmission, but nothing goes in the clear)
    assert wait_registered(topo, 5.0) and mn.state is RegState.AT_HOME
    t_confirmed = tl.first(mn.timeline, "deregistered").time
    topo.sim.run_for(0.5)
    rep = stream_reports(topo, since=t_confirmed + 0.01, until=topo.sim.now - 0.05)
    for direction in ("uplink", "downlink"):          # flowing directly on the home link
        assert rep[direction].longest_interruption_s <= 0.0101, rep
    clear = _clear_from_home_address(home_cap, home_b)
    assert clear and min(t for t, _p in clear) >= t_confirmed
    assert all(_is_protected(p) for _t, _s, p in visited_cap)
    uses = [a for _t, a in host.driver.log if isinstance(a, UseHomeLink)]
    assert uses == [UseHomeLink("home")]


def test_deregistration_that_is_never_answered_keeps_the_tunnel_and_keeps_asking():
    topo = _registered()
    mn, host = topo.mn.role, topo.mn
    home_b = a2b(mn.home_address)
    ha_b = a2b(topo.ha.role.address)
    home_cap = topo.home.start_capture()
    topo.home.drop_next(lambda p: p[12:16] == ha_b and p[16:20] == home_b, count=10_000)
    start_streams(topo, interval_s=0.05, start=topo.sim.now + 0.01, stop=topo.sim.now + 60.0)
    host.interfaces["home"].bring_up()
    host.driver.event(ReturnedHome("home"))
    topo.sim.run_for(60.0)
    assert mn.state is RegState.DEREGISTERING               # never "home" on a guess
    assert not _clear_from_home_address(home_cap, home_b)
    assert [e.kind for e in mn.timeline].count("rrq-sent") >= mn.config.max_attempts + 2
    assert not any(isinstance(a, UseHomeLink) for _t, a in host.driver.log)
    rep = stream_reports(topo, since=topo.sim.now - 50.0, until=topo.sim.now - 1.0)
    for direction in ("uplink", "downlink"):          # the tunnel, still up, carries both
        assert rep[direction].longest_interruption_s <= 0.101, rep


def test_a_reply_through_the_tunnel_does_not_confirm_home():
    """The deregistration is answered directly on the home link; an authenticated reply that
    matches it but arrives through the tunnel (only the HA could have made it) still does not
    take the MN out of the tunnel."""
    topo = _registered()
    mn = topo.mn.role
    mn.handle_event(ReturnedHome("home"), topo.sim.now)
    assert mn.state is RegState.DEREGISTERING
    from mipsec.wire.mip import RegistrationReply, ReplyCode, build_registration_reply
    reply = RegistrationReply(code=ReplyCode.ACCEPTED, lifetime=0, home_address=mn.home_address,
                              home_agent=topo.ha.role.address, identification=mn.reg.pending_id)
    data = mn.msa.sign(build_registration_reply(reply))
    out = mn._handle_reply(data, topo.sim.now, via="tunnel")
    assert out == [] and mn.state is RegState.DEREGISTERING
    out = mn._handle_reply(data, topo.sim.now, via="direct")
    assert mn.state is RegState.AT_HOME and UseHomeLink("home") in out
