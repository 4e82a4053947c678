"""The handover end to end, in the in-memory network (deterministic, virtual clock).

* a continuous CN <-> MN stream survives two handovers and a return home; the timeline shows every
  step in order; the GW never sends to the new CoA before the SIU nor to the old one after it;
* with 20 ms one-way Internet delay a break-before-make handover interrupts the downlink for at
  most one MN-GW-HA-GW round trip + 1 ms, and make-before-break loses nothing.
"""

from mipsec.node import timeline as tl
from mipsec.node.mobile_node import RegState
from mipsec.sim.scenario import gw_log, merged_timeline, start_streams, stream_reports, wait_registered
from mipsec.sim.topology import build_topology

HANDOVER_STEPS = ["coa-changed", "sa-repointed", "rrq-sent", "rrq-forwarded", "rrq-accepted",
                  "siu-sent", "gw-sa-repointed", "rrp-forwarded", "rrp-received",
                  "first-downlink-at-new-coa"]


def _check_gw_follows_sius(topo):
    """Walk the GW's actions in order: every ESP packet goes to the CoA of the latest rebind.

    So the GW never sends to a new CoA before the SIU that moves its SA there, nor to the old CoA
    after it.  Returns the sequence of CoAs the SA was moved to.
    """
    current, moves, sends = None, [], 0
    for _pos, _t, kind, dst in gw_log(topo):
        if kind == "rebind":
            current = dst
            moves.append(dst)
        elif kind == "send":
            assert dst == current, (dst, current)
            sends += 1
    assert sends > 0
    return moves


def test_stream_survives_two_handovers_and_return_home():
    topo = build_topology(1, internet_delay_s=0.010, seed=1)
    mn, gw, ha = topo.mn.role, topo.gw.role, topo.ha.role
    a, b = topo.care_of["a"][0], topo.care_of["b"][0]
    topo.move("a")
    assert wait_registered(topo, 2.0)
    start_streams(topo, interval_s=0.001, start=0.5, stop=3.5)
    topo.sim.run(until=1.0)
    topo.move("b")                                   # handover 1: A -> B
    topo.sim.run(until=2.0)
    topo.move("a")                                   # handover 2: B -> A
    topo.sim.run(until=3.0)
    topo.move("home")                                # return home
    topo.sim.run(until=4.0)

    # every claim of the procedure, in order, for each handover
    events = merged_timeline(topo)
    moves = tl.split_handovers(events)
    assert [m[0].kind for m in moves] == ["coa-changed"] * 3 + ["returned-home"]
    for move in moves[1:3]:
        assert tl.in_order(move, HANDOVER_STEPS), tl.format_table(move)
        gw_rebind = tl.first(move, "gw-sa-repointed")
        assert tl.first(move, "siu-sent").time <= gw_rebind.time <= tl.first(move, "rrp-forwarded").time
    home = moves[3]
    assert tl.in_order(home, ["returned-home", "rrq-sent", "rrq-accepted", "binding-deregistered",
                              "siu-sent", "rrp-received", "deregistered", "gw-binding-retired"]), \
        tl.format_table(home)
    assert tl.first(home, "rrp-received").detail["via"] == "direct"

    # the GW's sends switch exactly at each SIU; the first packet to a new CoA is the RRP
    assert _check_gw_follows_sius(topo) == [a, b, a]
    log = gw_log(topo)
    for i, (_pos, _t, kind, _dst) in enumerate(log):
        if kind == "rebind":
            assert log[i + 1][2] == "send"           # RRP encrypted and sent right after
    rrp_sends = [e for e in topo.gw.role.timeline if e.kind == "rrp-forwarded"]
    assert [e.detail["care_of"] for e in rrp_sends] == [a, b, a]

    # the stream: both directions kept flowing; the final state is "at home"
    reports = stream_reports(topo)
    for direction, r in reports.items():
        assert r.received > 0.97 * r.sent, (direction, r)
        assert r.duplicates == 0
        assert r.longest_interruption_s < 0.1, (direction, r)
    assert mn.state is RegState.AT_HOME
    assert ha.bindings == {}
    assert gw.mobiles[mn.home_address].care_of is None
    assert not mn.drops and not gw.drops and not ha.drops, (mn.drops, gw.drops, ha.drops)


def _handover_with_delay(make_before_break):
    topo = build_topology(1, internet_delay_s=0.020, lan_delay_s=0.0001, seed=2)
    topo.move("a")
    assert wait_registered(topo, 2.0)
    interval = 0.0002
    start_streams(topo, interval_s=interval, start=0.2, stop=1.0)
    topo.sim.run(until=0.5)
    t0 = topo.sim.now
    topo.move("b", make_before_break=make_before_break)
    topo.sim.run(until=0.7)
    if make_before_break:
        topo.detach("a")
    topo.sim.run(until=1.3)
    return topo, t0, interval


def test_break_before_make_interruption_is_one_round_trip():
    topo, t0, interval = _handover_with_delay(False)
    down = topo.mn.app.report(topo.cn.app.sent, since=0.3, until=0.9)
    rtt = topo.round_trip_s
    assert abs(rtt - 0.0404) < 1e-9       # 2 x (20 + 0.1) ms + 2 x 0.1 ms
    # the gap straddles the handover and is at most one round trip + 1 ms
    assert down.interruption_from <= t0 <= down.interruption_to
    assert down.longest_interruption_s <= rtt + 0.001, down
    # ... and it is not much shorter either: the GW keeps sending to A until the SIU
    assert down.longest_interruption_s >= rtt - 2 * interval, down
    ev = merged_timeline(topo)
    move = tl.split_handovers(ev)[1]
    first_new = tl.first(move, "first-downlink-at-new-coa")
    assert first_new.time - t0 <= rtt + 0.001


def test_make_before_break_loses_no_packet():
    topo, t0, interval = _handover_with_delay(True)
    reports = stream_reports(topo)
    for direction, r in reports.items():
        assert r.lost == 0, (direction, r)
        assert r.duplicates == 0
        assert r.longest_interruption_s <= 2 * interval + 1e-9, (direction, r)
    # the MN took downlink at the old CoA while registering, then only at the new one
    mn = topo.mn.role
    assert mn.inbound.local == topo.care_of["b"][0]
    assert not mn.drops and not topo.gw.role.drops and not topo.ha.role.drops
