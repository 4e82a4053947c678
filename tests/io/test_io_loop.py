"""The event loop with the in-memory TUN and net fakes: actions in order, one timer, the clock
read only by the loop, a role's exception logged and survived, the control socket."""

from __future__ import annotations

import json
import os

import pytest

from control_thread import serving
from mipsec.io import control
from mipsec.io.loop import EventLoop
from mipsec.io.pcap import PcapWriter, read_pcap
from mipsec.io.transports import FakeNet
from mipsec.io.tun import FakeTun
from mipsec.node.actions import BindingChanged, CareOfAddressChanged, Log, RebindSa, SendToNet, WriteToTun
from mipsec.node.packet import a2b, build_udp_packet

PKT = build_udp_packet(a2b("10.1.0.10"), a2b("10.1.0.100"), 5000, 6000, b"payload")


class ScriptedRole:
    """A role stand-in that records its calls and returns scripted actions."""

    def __init__(self):
        self.calls = []
        self.deadline = None
        self.raise_next = False
        self.timeline = []
        self.drops = {}

    def receive_from_tun(self, packet, now):
        self.calls.append(("tun", packet, now))
        return [SendToNet(b"E" + packet, "va0"), Log("info", "tun packet")]

    def receive_from_net(self, packet, now):
        if self.raise_next:
            self.raise_next = False
            raise RuntimeError("bug in role")
        self.calls.append(("net", packet, now))
        return [RebindSa(0x100, "1.1.1.1", None), WriteToTun(packet[1:]),
                BindingChanged("10.1.0.100", "172.16.1.10")]

    def handle_event(self, event, now):
        self.calls.append(("event", event, now))
        return []

    def handle_timer(self, now):
        self.calls.append(("timer", None, now))
        self.deadline = None
        return [SendToNet(b"timer")]

    def get_timer(self):
        return self.deadline

    def status(self):
        return {"sas": [{"spi": 256}]}


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def parts():
    role, tun, net = ScriptedRole(), FakeTun(), FakeNet()
    clock = FakeClock()
    loop = EventLoop(role, tun=tun, sender=net, receivers=[net], clock=clock,
                     wallclock=lambda: 1_700_000_000.5)
    yield role, tun, net, loop, clock
    loop.close()
    tun.close()
    net.close()


def test_tun_packet_goes_to_the_role_and_its_actions_are_carried_out(parts):
    role, tun, net, loop, clock = parts
    tun.inject(PKT)
    loop.run_once(max_wait=0.5)
    assert role.calls == [("tun", PKT, 100.0)]
    assert net.sent == [(b"E" + PKT, "va0")]
    assert loop.stats["from_tun"] == 1 and loop.stats["to_net"] == 1


def test_net_packet_actions_in_order_with_hooks(parts):
    role, tun, net, loop, clock = parts
    seen = []
    loop.on_action[RebindSa] = lambda a: seen.append(("rebind", len(tun.written)))
    loop.on_action[BindingChanged] = lambda a: seen.append(("binding", len(tun.written)))
    net.inject(b"X" + PKT)
    loop.run_once(max_wait=0.5)
    # RebindSa is carried out before the WriteToTun that follows it, BindingChanged after.
    assert seen == [("rebind", 0), ("binding", 1)]
    assert tun.written == [PKT]


def test_one_timer_from_get_timer_fires_with_now(parts):
    role, tun, net, loop, clock = parts
    role.deadline = 100.5
    loop.run_once(max_wait=0.0)
    assert not [c for c in role.calls if c[0] == "timer"]
    clock.t = 100.5
    loop.run_once(max_wait=0.0)
    assert ("timer", None, 100.5) in role.calls
    assert net.sent[-1] == (b"timer", None)
    assert loop.stats["timers"] == 1


def test_exception_in_role_is_logged_as_bug_and_the_loop_goes_on(parts, caplog):
    role, tun, net, loop, clock = parts
    role.raise_next = True
    net.inject(b"X" + PKT)
    net.inject(b"Y" + PKT)
    loop.run_once(max_wait=0.5)
    assert loop.stats["bugs"] == 1
    assert [c[1] for c in role.calls if c[0] == "net"] == [b"Y" + PKT]
    assert any("BUG" in r.message for r in caplog.records)


def test_events_reach_the_role_after_observers(parts):
    role, tun, net, loop, clock = parts
    order = []
    loop.on_event.append(lambda ev: order.append(("observer", ev)))
    ev = CareOfAddressChanged("172.16.2.10", "vb0")
    loop.feed_event(ev)
    order.append(("role", role.calls[-1][1]))
    assert order == [("observer", ev), ("role", ev)]


def test_pcap_records_net_traffic_with_the_injected_wall_clock(parts, tmp_path):
    role, tun, net, loop, clock = parts
    loop.pcap = PcapWriter(tmp_path / "c.pcap")
    net.inject(b"X" + PKT)
    tun.inject(PKT)
    loop.run_once(max_wait=0.5)
    loop.run_once(max_wait=0.1)
    records = read_pcap(tmp_path / "c.pcap")
    assert sorted(r[1] for r in records) == sorted([b"X" + PKT, b"E" + PKT])
    assert all(abs(r[0] - 1_700_000_000.5) < 1e-3 for r in records)
    loop.pcap.close()


def test_stop_ends_run(parts):
    role, tun, net, loop, clock = parts
    loop.max_wait = 0.01
    calls = []

    def until():
        calls.append(1)
        if len(calls) == 3:
            loop.stop("test")
        return False

    assert loop.run(until=lambda: until() or len(calls) >= 3) in ("test", "done")


def test_control_socket_serves_json_commands(tmp_path):
    path = str(tmp_path / "ctl.sock")
    replies = {"status": {"ok": True, "role": "mn"}}
    server = control.ControlServer(path, lambda cmd, args: replies.get(cmd) or
                                   {"ok": False, "error": f"unknown {cmd} {args}"})
    try:
        with serving(server):
            assert control.request(path, "status") == {"ok": True, "role": "mn"}
            assert control.request(path, "handover 1.2.3.4")["error"] == "unknown handover ['1.2.3.4']"
            assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    finally:
        server.close()
    assert not os.path.exists(path)


def test_control_socket_replaces_a_stale_socket_but_not_a_live_one(tmp_path):
    path = str(tmp_path / "ctl.sock")
    first = control.ControlServer(path, lambda c, a: {"ok": True})
    with pytest.raises(FileExistsError, match="another daemon"):
        control.ControlServer(path, lambda c, a: {"ok": True})
    first._sock.close()          # "killed": the file stays, nobody listens
    second = control.ControlServer(path, lambda c, a: {"ok": True})
    second.close()


def test_fake_tun_protocol():
    tun = FakeTun()
    assert tun.read() is None
    tun.inject(b"a")
    tun.inject(b"b")
    assert tun.read() == b"a" and tun.read() == b"b" and tun.read() is None
    tun.write(b"c")
    assert tun.written == [b"c"]
    tun.close()
    assert json.dumps({"ok": True})


def test_a_failing_source_is_a_counted_bug_not_the_end(parts):
    role, tun, net, loop, clock = parts

    class Broken:
        name = "broken"

        def __init__(self):
            self._r, self._w = __import__("socket").socketpair()
            self._w.send(b"x")

        def fileno(self):
            return self._r.fileno()

    broken = Broken()
    loop.add_reader(broken, lambda src: 1 / 0)
    tun.inject(PKT)
    loop.run_once(max_wait=0.1)
    loop.remove_reader(broken)
    loop.run_once(max_wait=0.1)
    assert loop.stats["bugs"] == 1
    assert role.calls and role.calls[0][0] == "tun"
    broken._r.close()
    broken._w.close()
