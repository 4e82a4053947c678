"""Hostile traffic interleaved with real handovers, in the deterministic in-memory network.

test_roles_fuzz.py feeds mutated packets to roles at rest.  Here an attacker on every segment
keeps injecting mutated copies of everything it has seen (ESP both ways, RRQs, SIUs and their
ACKs, IP-in-IP, direct replies) WHILE the mobile node hands over twice and returns home with a
stream running.  Remote garbage must not derail the procedure: the same handovers must complete,
and end in exactly the state a clean run ends in (bindings, SA addresses, MN state), with no
re-establishment request, and every injected packet refused or harmlessly accepted.
"""

from __future__ import annotations

import random

import pytest

from mipsec.node.mobile_node import RegState
from mipsec.sim.scenario import start_streams, wait_registered
from mipsec.sim.topology import build_topology


def _final_state(topo):
    gw, ha, mn = topo.gw.role, topo.ha.role, topo.mn.role
    m = gw.mobiles[mn.home_address]
    # (with IKEv2 the MN's SAs end at home with its IKE SA: None in both runs)
    return {"mn": (mn.state, mn.care_of, getattr(mn.outbound, "local", None),
                   getattr(mn.inbound, "local", None)),
            "gw": (m.care_of, m.outbound.remote),
            "ha": {h: b.care_of_address for h, b in ha.bindings.items()},
            "reestablish": [len(h.driver.reestablish) for h in topo.mobiles]}


def _mutate(packet: bytes, rnd: random.Random) -> bytes:
    kind = rnd.randrange(4)
    if kind == 0:
        return packet[:rnd.randrange(len(packet))]
    b = bytearray(packet)
    if kind == 1:
        for _ in range(rnd.randrange(1, 4)):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
    elif kind == 2:
        b[rnd.randrange(20, len(b)) if len(b) > 20 else 0] = rnd.randrange(256)
    else:
        return bytes(b)                                   # a plain replay, delayed
    return bytes(b)


def _run(attack: bool, seed: int, sa_source: str = "manual"):
    topo = build_topology(1, internet_delay_s=0.003, seed=seed, sa_source=sa_source)
    sim = topo.sim
    rnd = random.Random(seed)
    seen: list[bytes] = []
    targets = [topo.gw.driver, topo.ha.driver, topo.mn.driver]
    # mostly to the host the packet was addressed to (the GW's two addresses, the HA, the
    # MN's care-of addresses), sometimes to anyone
    by_address = {}
    for host in (topo.gw, topo.ha, topo.mn):
        for iface in host.interfaces.values():
            by_address[iface.address_bytes] = host.driver
    injected = [0]
    if attack:
        caps = [seg.start_capture() for seg in (topo.home, topo.outside, *topo.visited.values())]

        def attacker():
            for cap in caps:
                while cap:
                    seen.append(cap.pop()[2])
                    del seen[:-400]
            if seen:
                for _ in range(3):
                    original = rnd.choice(seen)
                    bad = _mutate(original, rnd)
                    target = by_address.get(original[16:20])
                    if target is None or rnd.random() < 0.2:
                        target = rnd.choice(targets)
                    target.net(bad)
                    injected[0] += 1
            sim.after(0.0007, attacker)

        sim.after(0.0, attacker)
    topo.move("a")
    assert wait_registered(topo, 2.0)
    start_streams(topo, interval_s=0.002, start=sim.now, stop=sim.now + 1.2)
    sim.run_for(0.1)
    topo.move("b")
    sim.run_for(0.4)
    assert topo.mn.role.state is RegState.REGISTERED
    topo.move("a", make_before_break=True)
    sim.run_for(0.4)
    topo.detach("b")
    sim.run_for(0.1)
    state_away = _final_state(topo)
    topo.move("home")
    sim.run_for(0.4)
    return topo, state_away, _final_state(topo), injected[0]


@pytest.mark.parametrize("sa_source", ["manual", "ikev2"])
@pytest.mark.parametrize("seed", [1, 2])
def test_handovers_under_hostile_injection_end_like_a_clean_run(seed, sa_source):
    """With ``ikev2`` the attacker also replays and mutates IKE (UDP 500/4500) and the ESP SAs
    come from IKE_AUTH."""
    _clean, clean_away, clean_home, _ = _run(False, seed, sa_source)
    topo, away, home, injected = _run(True, seed, sa_source)
    assert injected > 2000
    assert away == clean_away
    assert home == clean_home
    drops = sum(sum(r.drops.values()) for r in topo.roles())
    assert drops > injected // 2                # refused and counted (the rest: replays of
                                                # unprotected-field variants, or harmless)
