"""The MN's registration machine is its transition table (h11 style): these tests enumerate it.

Every (state, event) pair in ``TRANSITIONS`` is taken from a live MN and must land in the state
the table names, doing what it names; every pair not in the table is refused with UsageError and
changes nothing; no state is terminal.
"""

import pytest

from mipsec.errors import UsageError
from mipsec.mobility.registration import TRANSITIONS, Do, RegEvent, RegState
from mipsec.sim.scenario import wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.mip import RegistrationReply, ReplyCode

PAIRS = sorted(TRANSITIONS, key=lambda p: (p[0].value, p[1].value))
MISSING = sorted({(s, e) for s in RegState for e in RegEvent} - set(TRANSITIONS),
                 key=lambda p: (p[0].value, p[1].value))


def _mn_in(state):
    """A registered IKEv2 MN forced into ``state``, with what each effect reads set up."""
    topo = build_topology(1, internet_delay_s=0.002, seed=21, sa_source="ikev2",
                          ike={"dpd_interval_s": 0})
    topo.move("a")
    assert wait_registered(topo, 2.0)
    mn = topo.mn.role
    mn.state = state
    mn.reg.home_link = "home"
    now = topo.sim.now
    mn.reg.pending_id = mn.msa.new_identification(mn.wallclock())
    mn.reg.deadline = now + 1.0
    mn.reg.refused = int(ReplyCode.HA_ADMINISTRATIVELY_PROHIBITED)
    mn.reg.accepted_reply = RegistrationReply(code=ReplyCode.ACCEPTED, home_address=mn.home_address,
                                           home_agent=topo.ha.role.address,
                                           identification=mn.reg.pending_id, lifetime=600)
    return topo, mn


@pytest.mark.parametrize("state, event", PAIRS, ids=[f"{s.value}+{e.value}" for s, e in PAIRS])
def test_each_transition_lands_where_the_table_says(state, event):
    topo, mn = _mn_in(state)
    new, do = TRANSITIONS[(state, event)]
    actions = mn._event(event, topo.sim.now)
    assert mn.state is new
    sends = [a for a in actions if a.__class__.__name__ == "SendToNet"]
    if do in (Do.SEND_NEW, Do.SEND_AGAIN):
        assert mn.reg.deadline is not None and mn.reg.attempts >= 1
        assert sends, actions                   # a request left (through the tunnel or home)
    if do is Do.SEND_NEW:
        assert mn.reg.attempts == 1
    if do is Do.CONFIRM:
        assert mn.reg.deadline is None and mn.reg.renew_at is not None
    if do is Do.LEAVE_TUNNEL:
        assert mn.care_of is None and any(a.__class__.__name__ == "UseHomeLink" for a in actions)
    if do is Do.FORGET:
        assert mn.care_of is None and mn.reg.deadline is None
    if do is Do.NOTHING:
        assert actions == []


@pytest.mark.parametrize("state, event", MISSING, ids=[f"{s.value}+{e.value}" for s, e in MISSING])
def test_pairs_not_in_the_table_are_refused_and_change_nothing(state, event):
    topo, mn = _mn_in(state)
    before = (mn.state, mn.care_of, mn.reg.pending_id, mn.reg.deadline, mn.reg.attempts)
    with pytest.raises(UsageError, match="not allowed in state"):
        mn._event(event, topo.sim.now)
    assert (mn.state, mn.care_of, mn.reg.pending_id, mn.reg.deadline, mn.reg.attempts) == before


def test_the_table_has_no_dead_end_and_names_an_effect_for_every_entry():
    for state in RegState:
        assert any(new is not state for (s, _e), (new, _d) in TRANSITIONS.items() if s is state)
    assert all(isinstance(do, Do) for _new, do in TRANSITIONS.values())
    from mipsec.node.mobile_node import MobileNode
    assert set(MobileNode._effects) == set(Do)          # every effect has its code
