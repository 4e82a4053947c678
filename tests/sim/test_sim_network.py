"""The in-memory network: clock and queue order, delay, seeded loss, drop rules, reordering,
longest-prefix routing, proxy claims, timers of role hosts."""

import pytest

from mipsec.node.packet import a2b, build_udp_packet
from mipsec.sim.core import Simulator
from mipsec.sim.hosts import Driver
from mipsec.sim.network import Host, Router, Segment


def test_events_run_in_time_order_and_fifo_at_equal_times():
    sim = Simulator()
    seen = []
    sim.at(2.0, seen.append, "c")
    sim.at(1.0, seen.append, "a")
    sim.at(1.0, seen.append, "b")
    sim.after(0.5, lambda: sim.after(0.0, seen.append, "x"))
    assert sim.run(until=1.5) == 1.5
    assert seen == ["x", "a", "b"]
    sim.run()
    assert seen[-1] == "c" and sim.now == 2.0
    assert sim.run_until(lambda: False, 1.0) is False and sim.now == 3.0


def _pair(sim, **seg):
    net = Segment(sim, "lan", "192.0.2.0/24", **seg)
    a, b = Host(sim, "a"), Host(sim, "b")
    a.add_interface("eth", "192.0.2.1", net)
    b.add_interface("eth", "192.0.2.2", net)
    b.received = []
    return net, a, b


def _pkt(i, dst="192.0.2.2", src="192.0.2.1"):
    return build_udp_packet(a2b(src), a2b(dst), 1, 2, i.to_bytes(4, "big"), with_checksum=False)


def test_delay_and_fifo():
    sim = Simulator()
    _net, a, b = _pair(sim, delay_s=0.25)
    for i in range(5):
        sim.at(i * 0.01, a.send, _pkt(i))
    sim.run()
    assert [round(t, 6) for t, _ in b.received] == [0.25, 0.26, 0.27, 0.28, 0.29]
    assert [int.from_bytes(p[-4:], "big") for _, p in b.received] == list(range(5))


def test_seeded_loss_is_reproducible():
    def run(seed):
        sim = Simulator(seed)
        net, a, b = _pair(sim, loss=0.3)
        for i in range(1000):
            a.send(_pkt(i))
        sim.run()
        return [int.from_bytes(p[-4:], "big") for _, p in b.received], net.counters["lost"]
    first, lost = run(1)
    assert run(1) == (first, lost) and run(2)[0] != first
    assert 230 < lost < 370 and len(first) == 1000 - lost


def test_drop_next_matching_and_reordering():
    sim = Simulator(3)
    net, a, b = _pair(sim, delay_s=0.01, reorder=0.5, reorder_extra_s=0.05)
    net.drop_next(lambda p: p[-1] in (3, 4), count=2)
    for i in range(10):
        sim.at(i * 0.001, a.send, _pkt(i))
    sim.run()
    got = [int.from_bytes(p[-4:], "big") for _, p in b.received]
    assert sorted(got) == [0, 1, 2, 5, 6, 7, 8, 9]
    assert got != sorted(got) and net.counters["reordered"] > 0
    assert net.counters["dropped-by-rule"] == 2


def test_longest_prefix_routing_through_a_router_and_proxy_claims():
    sim = Simulator()
    left = Segment(sim, "left", "10.0.0.0/24", delay_s=0.001)
    right = Segment(sim, "right", "10.0.1.0/24", delay_s=0.001)
    r = Router(sim, "r")
    r.add_interface("l", "10.0.0.254", left)
    r.add_interface("r", "10.0.1.254", right)
    h1, h2, h3 = Host(sim, "h1"), Host(sim, "h2"), Host(sim, "h3")
    h1.add_interface("eth", "10.0.0.1", left)
    h1.add_route("0.0.0.0/0", "10.0.0.254", "eth")
    h1.add_route("10.0.1.2/32", "10.0.0.99", "eth")        # more specific: a black hole
    h2.add_interface("eth", "10.0.1.1", right)
    h3.add_interface("eth", "10.0.1.3", right)
    h2.received, h3.received = [], []
    h1.send(_pkt(1, "10.0.1.1", "10.0.0.1"))
    h1.send(_pkt(2, "10.0.1.2", "10.0.0.1"))
    sim.run()
    assert len(h2.received) == 1 and r.counters["forwarded"] == 1
    assert left.counters["undeliverable"] == 1                 # nobody owns 10.0.0.99
    right.claim("10.0.1.1", h3.interfaces["eth"])             # proxy ARP wins over the owner
    h3.claims = lambda dst: True
    h1.send(_pkt(3, "10.0.1.1", "10.0.0.1"))
    sim.run()
    assert len(h3.received) == 1 and len(h2.received) == 1
    h2.interfaces["eth"].bring_down()
    right.unclaim("10.0.1.1", h3.interfaces["eth"])
    h1.send(_pkt(4, "10.0.1.1", "10.0.0.1"))
    sim.run()
    assert right.counters["undeliverable"] == 1


class _Ticker:
    """A role-like object with a timer: fires at 1, 2, 4, 8."""
    def __init__(self):
        self.next, self.fired = 1.0, []

    def get_timer(self):
        return self.next

    def handle_timer(self, now):
        self.fired.append(now)
        self.next = now * 2 if now < 8 else None
        return []


def test_driver_keeps_one_timer_armed():
    sim = Simulator()
    t = _Ticker()
    d = Driver(sim, t, send=lambda a: None, tun=lambda p: None)
    d.rearm()
    d.rearm()                      # idempotent
    t.next = 0.5                   # an earlier deadline supersedes
    d.rearm()
    sim.run()
    assert t.fired == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_segment_needs_a_valid_prefix():
    with pytest.raises(ValueError):
        Segment(Simulator(), "bad", "10.0.0.1/24")
