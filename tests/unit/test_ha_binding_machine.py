"""The HA's binding machine is its transition table: every (state, event) pair is enumerated.

For each pair the HA is put in the state (NONE: fresh; BOUND: a binding restored from a record)
and the event is fired through ``HomeAgent._event``, the only way the machine moves: a pair in
``BINDING_TRANSITIONS`` reaches the table's new state with the table's effect visible in the
returned actions; a pair not in the table is refused with UsageError and changes nothing.
"""

from __future__ import annotations

import itertools

import pytest

from mipsec.errors import UsageError
from mipsec.node.actions import BindingChanged
from mipsec.node.home_agent import (
    BINDING_TRANSITIONS,
    BindingEffect,
    BindingEvent,
    BindingState,
)
from mipsec.sim.topology import build_topology
from mipsec.store import BindingRecord

HOME = "10.1.0.100"
OLD, NEW = "172.16.1.10", "172.16.2.10"


def _ha(state: BindingState):
    ha = build_topology(1, seed=7, with_apps=False).ha.role
    if state is BindingState.BOUND:
        ha.restore([BindingRecord(HOME, OLD, 600, ha.wallclock() + 600)], {}, 0.0)
    assert ha.binding_state(HOME) is state
    return ha


def _context(ha, event: BindingEvent) -> dict:
    if event is BindingEvent.ACCEPT:
        return dict(care_of=NEW, lifetime=300, identification=7, via_gateway=True)
    if event is BindingEvent.RESTORE:
        return dict(record=BindingRecord(HOME, NEW, 600, ha.wallclock() + 600))
    return {}


EXPECTED_ACTIONS = {
    BindingEffect.BIND: [BindingChanged(HOME, NEW)],
    BindingEffect.RESTORE: [BindingChanged(HOME, NEW)],
    BindingEffect.UNBIND: [BindingChanged(HOME, None)],
    BindingEffect.NOTHING: [],
}


@pytest.mark.parametrize("state, event", list(itertools.product(BindingState, BindingEvent)))
def test_every_pair_follows_the_table_or_is_refused(state, event):
    ha = _ha(state)
    entry = BINDING_TRANSITIONS.get((state, event))
    before = {h: b.as_dict() for h, b in ha.bindings.items()}
    if entry is None:
        with pytest.raises(UsageError):
            ha._event(HOME, event, 1.0, **_context(ha, event))
        assert ha.binding_state(HOME) is state
        assert {h: b.as_dict() for h, b in ha.bindings.items()} == before
        return
    new, effect = entry
    actions = ha._event(HOME, event, 1.0, **_context(ha, event))
    assert ha.binding_state(HOME) is new
    assert actions == EXPECTED_ACTIONS[effect]
    if new is BindingState.BOUND:
        binding = ha.bindings[HOME]
        assert binding.care_of_address == NEW
        assert ha.get_timer() is not None and ha.get_timer() <= binding.expires
        if effect is BindingEffect.BIND and state is BindingState.BOUND:
            assert binding.gw_old == OLD          # a move remembers where the GW's SA was
    elif effect is BindingEffect.UNBIND:
        assert ha.machine.retired[HOME][0] == OLD       # reverse-tunnel grace for the old CoA


def test_the_table_covers_what_the_ha_does():
    """What the HA can meet, and nothing else: restore only when unbound (at start), expire only
    a binding, accept and deregister in both states."""
    assert set(BINDING_TRANSITIONS) == {
        (BindingState.NONE, BindingEvent.RESTORE), (BindingState.NONE, BindingEvent.ACCEPT),
        (BindingState.BOUND, BindingEvent.ACCEPT), (BindingState.BOUND, BindingEvent.DEREGISTER),
        (BindingState.NONE, BindingEvent.DEREGISTER), (BindingState.BOUND, BindingEvent.EXPIRE)}
    assert {effect for _new, effect in BINDING_TRANSITIONS.values()} == set(BindingEffect)
