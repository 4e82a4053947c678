"""Delayed, duplicated and reordered SIUs can never move the GW's SA back to an older address.

The HA registers an MN through a random walk of care-of addresses (real RRQs, real SIUs); the
SIUs then reach the GW in a random order, with duplicates and losses.  Whatever arrives, each
re-pointing of the GW's SA applies a newer registration than the previous one, and the SA only
ever points at a CoA the HA bound at some time.
"""

import random as _random

from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.node.config import make_lab_configs
from mipsec.node.gateway import VpnGateway
from mipsec.node.home_agent import HomeAgent
from mipsec.node.packet import a2b, build_udp_packet
from mipsec.wire.mip import RegistrationRequest, RequestFlags, build_registration_request

COAS = ["172.16.1.10", "172.16.2.10", "172.16.3.10", "172.16.4.10"]
EPOCH = 1_767_225_600.0


def _sius_for_walk(walk):
    lab = make_lab_configs(1, keys_from=_random.Random(1))
    clock = [EPOCH]
    ha = HomeAgent(lab.home_agent, wallclock=lambda: clock[0])
    mn_cfg = lab.mobiles[0]
    msa = MobilitySecurityAssociation(mn_cfg.msa.spi, mn_cfg.msa.key)
    sius = []
    for i, coa in enumerate(walk):
        clock[0] = EPOCH + i
        rrq = RegistrationRequest(home_address=mn_cfg.home_address, home_agent=mn_cfg.home_agent,
                                  care_of_address=coa, identification=msa.new_identification(clock[0]),
                                  lifetime=600, flags=RequestFlags.D | RequestFlags.T)
        pkt = build_udp_packet(a2b(coa), a2b(mn_cfg.home_agent), 434, 434,
                               msa.sign(build_registration_request(rrq)))
        actions = ha.receive_from_net(pkt, float(i))
        sius += [(i, a.packet) for a in actions if hasattr(a, "packet")]
    return lab, sius


@settings(max_examples=examples(60), deadline=None)
@given(walk=st.lists(st.sampled_from(COAS), min_size=2, max_size=7),
       order_seed=st.integers(0, 2**32 - 1))
def test_sius_in_any_order_never_move_the_sa_back(walk, order_seed):
    lab, sius = _sius_for_walk(walk)
    assert len(sius) == len(walk)
    rnd = _random.Random(order_seed)
    delivered = [s for s in sius if rnd.random() > 0.2]           # some lost
    delivered += [rnd.choice(sius) for _ in range(rnd.randrange(4))]   # some duplicated
    rnd.shuffle(delivered)                                         # any order
    gw = VpnGateway(lab.gateway)
    mobile = next(iter(gw.mobiles.values()))
    for coa in walk:     # each registration came through the GW's tunnel from its CoA
        mobile.note_rrq_source(a2b(coa), a2b(coa), None, 0.0)
    applied = []
    for step, packet in delivered:
        before = mobile.care_of
        gw.receive_siu(packet, 0.0)                                # never raises
        if mobile.care_of != before:
            applied.append(step)
            assert mobile.care_of == walk[step]
            assert mobile.outbound.remote == walk[step]
    assert applied == sorted(set(applied))                          # only ever forwards
    # everything else was refused for one of the two reasons that protect the order
    from mipsec.drops import DropReason
    assert set(gw.drops) <= {DropReason.SIU_REPLAYED, DropReason.SIU_STALE_CARE_OF}
    if delivered:
        # whatever arrives first binds the fresh SA (nothing to move back from yet)
        assert applied[0] == delivered[0][0]
