"""Remote bad input never raises out of a role and changes no state.

Real packets are captured in a running simulation (ESP to the GW and to the MN, SIUs, RRQs,
reverse-tunnelled IP-in-IP, direct RRPs), delivered once, then fed again truncated, extended and
with bytes flipped at random positions to every entry point of every role; plus random bytes.
Each call must return normally, count a DropReason (or, for a mutation that happens to stay
valid, merely forward), and leave bindings, SA addresses, replay windows and registration state
as they were.
"""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.sim.network import b2a
from mipsec.sim.scenario import start_streams, wait_registered
from mipsec.sim.topology import build_topology


def _state(topo):
    gw, ha = topo.gw.role, topo.ha.role
    mns = [m.role for m in topo.mobiles]
    return (
        {h: (m.care_of, m.inbound.local, m.inbound.remote, m.inbound.replay.top,
             m.outbound.local, m.outbound.remote) for h, m in gw.mobiles.items()},
        dict(gw.verifier.last_sequence),
        {h: (b.care_of_address, b.expires, b.gw_old, b.identification)
         for h, b in ha.bindings.items()},
        {spi: msa.last_accepted_id for spi, (msa, _o) in ha._msa_by_spi.items()},
        [(m.state, m.care_of, m.reg.pending_id, m.inbound.local, m.inbound.replay.top,
          m.outbound.local, m.msa.clock_offset_s) for m in mns],
    )


def _running_lab():
    topo = build_topology(2, internet_delay_s=0.002, seed=11)
    topo.move("a", 0)
    topo.move("a", 1)
    assert wait_registered(topo, 1.0)
    captures = {name: seg.start_capture() for name, seg in
                [("home", topo.home), ("outside", topo.outside), ("a", topo.visited["a"])]}
    start_streams(topo, interval_s=0.01, start=topo.sim.now, stop=topo.sim.now + 0.2)
    topo.move("b", 1)
    topo.sim.run_for(0.5)
    topo.move("home", 1)
    topo.sim.run_for(0.5)
    for seg in (topo.home, topo.outside, topo.visited["a"]):
        seg.capture = None
    packets = [p for cap in captures.values() for _t, _who, p in cap]
    return topo, packets


def _mutations(packet, rnd):
    yield packet[: rnd.randrange(len(packet))]
    yield packet + bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 9)))
    for _ in range(6):
        b = bytearray(packet)
        for _ in range(rnd.randrange(1, 4)):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        yield bytes(b)


def test_mutated_real_packets_never_raise_or_change_state():
    topo, packets = _running_lab()
    roles = [topo.gw.role, topo.ha.role] + [m.role for m in topo.mobiles]
    assert len(packets) > 50
    kinds = {(p[9], b2a(p[16:20])) for p in packets}
    assert {(50, "172.16.0.1"), (50, "172.16.1.10"), (17, "10.1.0.1"), (4, "10.1.0.2"),
            (17, "10.1.0.2")} <= kinds, kinds          # ESP both ways, SIU, IP-in-IP, RRQ
    rnd = random.Random(5)
    now = topo.sim.now + 0.001
    baseline = _state(topo)
    fed = 0
    for packet in packets:
        for bad in _mutations(packet, rnd):
            for role in roles:
                for entry in (role.receive_from_net, role.receive_from_tun):
                    entry(bad, now)              # must not raise
                    fed += 1
            assert _state(topo) == baseline, (packet.hex(), bad.hex())
    assert fed > 2000
    for role in roles:
        assert sum(role.drops.values()) > 0


@settings(max_examples=examples(150), deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_never_raise(data):
    topo = _LAB[0]
    roles = [topo.gw.role, topo.ha.role] + [m.role for m in topo.mobiles]
    baseline = _state(topo)
    for role in roles:
        role.receive_from_net(data, topo.sim.now)
        role.receive_from_tun(data, topo.sim.now)
    assert _state(topo) == baseline


_LAB = _running_lab()
