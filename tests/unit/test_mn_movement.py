"""Movement detection from link, address and route events (the pure classifier, no kernel).

A care-of address is reported when it can reach the GW (its link is up and a default route or
a route covering the GW leaves through its interface), so the Registration Request never waits
for a retransmission because the address came before the route (what DHCP clients do).  Flaps,
renewals and re-acquired addresses report nothing; a new usable address elsewhere is a move.
"""

import pytest

from mipsec.io.netlink import (
    RTM_DELADDR,
    RTM_DELROUTE,
    RTM_NEWADDR,
    RTM_NEWROUTE,
    MovementClassifier,
)
from mipsec.node.actions import CareOfAddressChanged, ReturnedHome

GW = "172.16.0.1"
A, B = "172.16.1.10", "172.16.2.10"


@pytest.fixture
def mc():
    return MovementClassifier(["va0", "vb0"], "10.1.0.0/24", ["home0"], gateway=GW)


def coa(addr, ifname, mbb=False):
    return [CareOfAddressChanged(addr, ifname, mbb)]


def default(mc, ifname, kind=RTM_NEWROUTE, replace=True):
    return mc.route(kind, ifname, None, 0, replace=replace)


def test_dhcp_order_address_then_default_route_reports_on_the_route(mc):
    assert mc.address(RTM_NEWADDR, "va0", A, 24) == []          # no route to the GW yet
    assert mc.route(RTM_NEWROUTE, "va0", "172.16.1.0", 24) == []  # the connected route: no GW
    assert default(mc, "va0") == coa(A, "va0")


def test_route_then_address_reports_on_the_address(mc):
    assert default(mc, "va0") == []
    assert mc.address(RTM_NEWADDR, "va0", A, 24) == coa(A, "va0")


def test_a_route_covering_the_gateway_is_enough_and_on_link_too(mc):
    assert mc.address(RTM_NEWADDR, "va0", A, 24) == []
    assert mc.route(RTM_NEWROUTE, "va0", "172.16.0.0", 16) == coa(A, "va0")
    on_link = MovementClassifier(["va0"], "10.1.0.0/24", gateway="192.0.2.1")
    assert on_link.address(RTM_NEWADDR, "va0", "192.0.2.50", 24) == coa("192.0.2.50", "va0")


def test_visited_network_without_a_route_to_the_gateway_is_waited_on(mc):
    default(mc, "va0")
    assert mc.address(RTM_NEWADDR, "va0", A, 24) == coa(A, "va0")
    assert mc.address(RTM_NEWADDR, "vb0", B, 24) == []          # b has no way to the GW
    assert mc.route(RTM_NEWROUTE, "vb0", "10.9.0.0", 16) == []
    assert mc.current == ("va0", A)
    # when a's way goes, b still cannot be used: nothing is reported, a's registration holds
    assert default(mc, "va0", RTM_DELROUTE) == []
    assert mc.current == ("va0", A)
    assert default(mc, "vb0") == coa(B, "vb0", mbb=True)        # b's route comes; a still there


def test_link_flap_reports_the_loss_and_the_return_once_and_renewals_nothing(mc):
    default(mc, "va0")
    assert mc.address(RTM_NEWADDR, "va0", A, 24) == coa(A, "va0")
    assert mc.address(RTM_NEWADDR, "va0", A, 24) == []           # DHCP renewal of a known address
    assert mc.link("va0", False) == coa(None, "va0")             # down: nothing can leave from it
    assert mc.reaches_gateway("va0") is False                    # (its routes were flushed)
    assert mc.link("va0", False) == []
    assert mc.link("va0", True) == []                            # up, but no route yet
    assert default(mc, "va0") == coa(A, "va0")                   # usable again: once
    assert default(mc, "va0") == []


def test_address_removed_before_the_new_one_is_added(mc):
    default(mc, "va0")
    mc.address(RTM_NEWADDR, "va0", A, 24)
    assert mc.address(RTM_DELADDR, "va0", A, 24) == coa(None, "va0")
    assert mc.address(RTM_NEWADDR, "va0", "172.16.1.11", 24) == coa("172.16.1.11", "va0")


def test_the_same_care_of_address_reacquired_is_reported_once(mc):
    default(mc, "va0")
    mc.address(RTM_NEWADDR, "va0", A, 24)
    assert mc.address(RTM_DELADDR, "va0", A, 24) == coa(None, "va0")
    assert mc.address(RTM_NEWADDR, "va0", A, 24) == coa(A, "va0")
    assert mc.address(RTM_NEWADDR, "va0", A, 24) == []


def test_two_addresses_at_once_the_new_one_wins_make_before_break(mc):
    default(mc, "va0", replace=False)
    mc.address(RTM_NEWADDR, "va0", A, 24)
    assert mc.address(RTM_NEWADDR, "vb0", B, 24) == []          # DHCP order on b: no route yet
    assert mc.route(RTM_NEWROUTE, "vb0", None, 0, priority=100) == coa(B, "vb0", mbb=True)
    assert mc.address(RTM_DELADDR, "va0", A, 24) == []          # the old one goes: nothing
    assert mc.link("va0", False) == [] and mc.link("va0", True) == []   # and its flaps neither
    assert mc.current == ("vb0", B)


def test_a_second_address_on_the_same_interface_does_not_move(mc):
    default(mc, "va0")
    mc.address(RTM_NEWADDR, "va0", A, 24)
    assert mc.address(RTM_NEWADDR, "va0", "172.16.1.99", 24) == []
    assert mc.address(RTM_DELADDR, "va0", A, 24) == coa("172.16.1.99", "va0")   # no loss


def test_losing_the_current_interface_falls_back_to_another_usable_one(mc):
    default(mc, "va0", replace=False)
    mc.address(RTM_NEWADDR, "va0", A, 24)
    mc.route(RTM_NEWROUTE, "vb0", None, 0, priority=100)
    assert mc.address(RTM_NEWADDR, "vb0", B, 24) == coa(B, "vb0", mbb=True)
    assert mc.link("vb0", False) == coa(A, "va0")               # b's link died: back to a


def test_default_route_replaced_to_the_other_interface_moves(mc):
    default(mc, "va0")
    mc.address(RTM_NEWADDR, "va0", A, 24)
    mc.address(RTM_NEWADDR, "vb0", B, 24)                         # b up but no route
    # replace: a lost its way to the GW, but its address still receives (make-before-break)
    assert default(mc, "vb0") == coa(B, "vb0", mbb=True)
    assert mc.address(RTM_DELADDR, "va0", A, 24) == []


def test_break_before_make_when_the_old_address_is_gone(mc):
    default(mc, "va0")
    mc.address(RTM_NEWADDR, "va0", A, 24)
    assert mc.address(RTM_DELADDR, "va0", A, 24) == coa(None, "va0")
    mc.address(RTM_NEWADDR, "vb0", B, 24)
    assert default(mc, "vb0") == coa(B, "vb0", mbb=False)


def test_home_only_on_the_home_interface_with_its_link_up(mc):
    default(mc, "va0")
    mc.address(RTM_NEWADDR, "va0", A, 24)
    assert mc.address(RTM_NEWADDR, "vb0", "10.1.0.77", 24) == []   # hostile DHCP: ignored
    assert mc.link("home0", False) == []
    assert mc.address(RTM_NEWADDR, "home0", "10.1.0.100", 24) == []  # link down: not yet
    assert mc.link("home0", True) == [ReturnedHome("home0")]
    assert mc.address(RTM_NEWADDR, "home0", "10.1.0.100", 24) == []  # once
    # home wins while it holds; leaving it reports the visited address again
    assert mc.address(RTM_DELADDR, "home0", "10.1.0.100", 24) == coa(A, "va0")


def test_unwatched_interfaces_and_foreign_routes_change_nothing(mc):
    default(mc, "va0")
    mc.address(RTM_NEWADDR, "va0", A, 24)
    assert mc.address(RTM_NEWADDR, "mtun0", "10.1.0.100", 32) == []
    assert mc.link("eth9", False) == []
    assert mc.route(RTM_NEWROUTE, "mtun0", "10.1.0.0", 25) == []
    assert mc.current == ("va0", A)
