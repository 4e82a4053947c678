"""Scale in the simulator: 1,000 MNs registered through one GW and one HA, then 100 of them
handing over at the same instant: all complete, nobody else is disturbed.  (The 10,000 / 1,000
run is benchmarks/bench_scale.py.)"""

from collections import Counter

from mipsec.node.mobile_node import RegState
from mipsec.sim.scenario import wait_registered
from mipsec.sim.topology import build_topology

N, MOVING = 1000, 100


def test_thousand_mobiles_hundred_simultaneous_handovers():
    topo = build_topology(N, internet_delay_s=0.010, seed=4, record=False, with_apps=False)
    for i in range(N):
        topo.move("a", i)
    assert wait_registered(topo, 5.0)
    gw, ha = topo.gw.role, topo.ha.role
    assert len(ha.bindings) == N
    assert all(m.care_of == topo.care_of["a"][i] for i, m in enumerate(gw.mobiles.values()))

    t0 = topo.sim.now
    for i in range(MOVING):
        topo.move("b", i)
    assert wait_registered(topo, 5.0)
    elapsed = topo.sim.now - t0
    assert elapsed < 1.0                      # one round trip each, no retransmission needed
    for i, host in enumerate(topo.mobiles):
        where = "b" if i < MOVING else "a"
        coa = topo.care_of[where][i]
        mn = host.role
        assert mn.state is RegState.REGISTERED and mn.care_of == coa
        assert gw.mobiles[mn.home_address].care_of == coa
        assert gw.mobiles[mn.home_address].outbound.remote == coa
        assert ha.bindings[mn.home_address].care_of_address == coa
    kinds = Counter(e.kind for e in gw.timeline)
    assert kinds["gw-sa-repointed"] == N + MOVING and kinds["rrp-forwarded"] == N + MOVING
    assert not gw.drops and not ha.drops
    assert not any(h.role.drops for h in topo.mobiles)
    assert sum(e.kind == "rrq-retransmitted" for h in topo.mobiles for e in h.role.timeline) == 0
