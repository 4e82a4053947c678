"""The GW's binding state machine: every (state, event) pair, in the table or not.

``BINDING_TRANSITIONS`` is the logic: a pair in the table gives the next state and the effect
(checked on the SA and the actions), a pair that is not is refused as SIU_STALE_CARE_OF and
changes nothing.
"""

import random

import pytest

from mipsec.drops import DropReason as R
from mipsec.mip.constants import SIU_PORT
from mipsec.mip.siu import SiuSigner
from mipsec.node.actions import RebindSa, SendToNet
from mipsec.node.config import make_lab_configs
from mipsec.node.gateway import (
    BINDING_TRANSITIONS,
    Effect,
    VpnGateway,
    classify,
)
from mipsec.node.gateway import (
    BindingEvent as E,
)
from mipsec.node.gateway import (
    BindingState as S,
)
from mipsec.node.packet import a2b, build_udp_packet
from mipsec.wire.mip import RegistrationReply, ReplyCode, build_registration_reply
from mipsec.wire.siu import SiuType

A, B, C = "172.16.1.10", "172.16.2.10", "172.16.3.10"


class Rig:
    def __init__(self):
        lab = make_lab_configs(1, keys_from=random.Random(5))
        self.gw = VpnGateway(lab.gateway)
        ha = lab.gateway.home_agents[0]
        self.ha = ha.address
        self.signer = SiuSigner(ha.address, ha.key, ha.key_id)
        self.mobile = next(iter(self.gw.mobiles.values()))
        for coa in (A, B, C):                      # the MN registered from each of them
            self.mobile.note_rrq_source(a2b(coa), a2b(coa), None, 0.0)

    def siu(self, kind, old, new):
        home = self.mobile.home_address
        rrp = build_registration_reply(RegistrationReply(
            code=ReplyCode.ACCEPTED, home_address=home, home_agent=self.ha, identification=1,
            lifetime=600 if kind != SiuType.DEREGISTER else 0))
        data = self.signer.build(kind, home_address=home, old_care_of=old or "0.0.0.0",
                                 new_care_of=new or "0.0.0.0", gateway_spi=0,
                                 lifetime=0 if kind == SiuType.DEREGISTER else 600, rrp=rrp,
                                 wallclock=0.0, gateway_epoch=self.gw.epoch)
        return self.gw.receive_siu(build_udp_packet(a2b(self.ha), a2b(self.gw.inside), SIU_PORT,
                                                    SIU_PORT, data), 0.0)

    def into(self, state):
        if state is S.IKE_BOUND:                   # IKE installed the pair from A
            self.gw._bind_to_ike(self.mobile, (A, 4500), 0.0)
        elif state is not S.FRESH:
            self.siu(SiuType.UPDATE, None, A)
        if state is S.UNBOUND:
            self.siu(SiuType.DEREGISTER, A, None)
        assert self.mobile.state is state and not self.gw.drops
        return self


def _event(rig, event):
    """Send what makes ``event`` in the rig's state; (actions, new CoA) or None if the event
    cannot happen in that state (classify never names it there)."""
    cur = rig.mobile.care_of
    other = B if cur != B else C
    if event is E.MOBIKE_MOVED:
        return rig.gw._mobike_move(rig.mobile, (other, 4500), 0.0), other
    if event is E.IKE_INSTALLED:       # only ever on a pair just installed (always FRESH)
        if rig.mobile.state is not S.FRESH:
            return None
        return rig.gw._bind_to_ike(rig.mobile, (other, 4500), 0.0), other
    kind, old, new = {
        E.UPDATE_FROM_CURRENT: (SiuType.UPDATE, cur, other),
        E.UPDATE_TO_CURRENT: (SiuType.UPDATE, B if cur == A else A, cur),
        E.UPDATE_FROM_OTHER: (SiuType.UPDATE, C if cur != C else B, other),
        E.DEREGISTER_FROM_CURRENT: (SiuType.DEREGISTER, cur, None),
        E.DEREGISTER_FROM_OTHER: (SiuType.DEREGISTER, C if cur != C else B, None),
        E.REJECT: (SiuType.REJECT, cur, other),
    }[event]
    if classify(kind, old, new, cur) is not event:
        return None
    return rig.siu(kind, old, new), new


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("event", list(E))
def test_every_pair(state, event):
    rig = Rig().into(state)
    before = (rig.mobile.care_of, rig.mobile.outbound.remote, rig.mobile.outbound.sequence)
    made = _event(rig, event)
    if made is None:
        assert (state, event) not in BINDING_TRANSITIONS   # the table names no impossible pair
        return
    actions, new = made
    step = BINDING_TRANSITIONS.get((state, event))
    sa = rig.mobile.outbound
    if step is None:
        assert rig.gw.drops == {R.SIU_STALE_CARE_OF: 1}
        assert rig.mobile.state is state
        assert (rig.mobile.care_of, sa.remote, sa.sequence) == before
        return
    next_state, effect = step
    assert rig.mobile.state is next_state
    assert R.SIU_STALE_CARE_OF not in rig.gw.drops
    sent = [a.packet for a in actions if isinstance(a, SendToNet)
            and a.packet[16:20] != a2b(rig.ha)]               # ESP to the MN (not the ACK)
    rebinds = [a for a in actions if isinstance(a, RebindSa)]
    if effect in (Effect.REPOINT, Effect.MOBIKE, Effect.BIND_IKE):
        assert rig.mobile.care_of == new and sa.remote == new and len(rebinds) == 1
        assert len(sent) == (1 if effect is Effect.REPOINT else 0)   # the reply, after
        if sent:           # re-pointed BEFORE the reply is encrypted and sent (there)
            reply_at = next(i for i, a in enumerate(actions)
                            if isinstance(a, SendToNet) and a.packet is sent[0])
            assert actions.index(rebinds[0]) < reply_at
            assert sent[0][16:20] == a2b(new)
    elif effect is Effect.CONFIRM:
        assert rebinds == [] and sa.remote == before[1] and len(sent) == 1
    elif effect is Effect.RETIRE:
        assert rig.mobile.care_of is None and len(sent) == 1 and sent[0][16:20] == a2b(before[0])
    elif effect is Effect.REJECT:
        assert rebinds == [] and (rig.mobile.care_of, sa.remote) == before[:2]
        assert len(sent) == 1 and sent[0][16:20] == a2b(new)   # one packet there, SA untouched
    else:
        assert effect is Effect.NOTHING and sent == [] and rebinds == []
        assert (rig.mobile.care_of, sa.remote, sa.sequence) == before


def test_table_covers_only_known_states_and_events():
    for (state, event), (next_state, effect) in BINDING_TRANSITIONS.items():
        assert isinstance(state, S) and isinstance(event, E)
        assert isinstance(next_state, S) and isinstance(effect, Effect)
    # FRESH is left only by binding; nothing ever goes back to FRESH
    assert all(n is not S.FRESH for (s, _e), (n, _x) in BINDING_TRANSITIONS.items()
               if s is not S.FRESH)


@pytest.mark.parametrize("state", list(S))
def test_downlink_uses_the_sa_only_where_it_has_a_destination(state):
    """The HA's IP-in-IP for the MN leaves through its outbound SA in the states that gave the
    SA a destination (an SIU, or IKE at install), and is NO_SA where none did."""
    from mipsec.mip import ipip
    from mipsec.mobility.gw_binding import CARRIES_DOWNLINK

    rig = Rig().into(state)
    home = rig.mobile.home_address
    inner = build_udp_packet(a2b("10.1.0.1"), a2b(home), 9000, 9000, b"x" * 32)
    packet = ipip.encapsulate(inner, rig.ha, rig.mobile.care_of or A)
    actions = rig.gw.receive_from_tun(packet, 0.0)
    if state in CARRIES_DOWNLINK:
        assert [a.packet[16:20] for a in actions] == [a2b(rig.mobile.care_of)], actions
        assert rig.mobile.packets_down == 1 and not rig.gw.drops
    else:
        assert actions == [] and rig.gw.drops == {R.NO_SA: 1}
    assert CARRIES_DOWNLINK == {S.BOUND, S.IKE_BOUND}
