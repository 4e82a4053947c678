"""The event loop's batched data path behaves exactly like its single-packet path: the same bytes
on the wire and into the TUN, in the same order, the same drops and the same counters, for the
GW and HA roles fed valid, invalid and replayed packets; and sendmmsg / recvmmsg (ctypes) give
the same datagrams and the same per-packet failures as one sendto / recv each.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

import needs
from mipsec.io import mmsg
from mipsec.io.loop import EventLoop
from mipsec.io.transports import FakeNet, RawReceiver, RawSender
from mipsec.io.tun import FakeTun
from mipsec.node.actions import SendToNet, WriteToTun
from mipsec.node.packet import a2b, build_udp_packet
from mipsec.sim.topology import build_topology

CN, HOME = "10.1.0.10", "10.1.0.100"


def registered_topology():
    topo = build_topology(1, internet_delay_s=0.002, seed=7)
    topo.move("a")
    topo.sim.run(until=1.0)
    assert topo.ha.role.bindings[HOME].care_of_address == topo.care_of["a"][0]
    return topo


def traffic(topo):
    """Packets for the HA's TUN, the GW's TUN and the GW's net side: valid ones, truncated and
    malformed ones, some for nobody, and replays."""
    ha, mn = topo.ha.role, topo.mn.role
    down = [build_udp_packet(a2b(CN), a2b(HOME), 5000, 6000, bytes([i]) * (10 + 7 * i),
                             identification=i)
            for i in range(40)]
    ha_in = down + [down[0][:15], build_udp_packet(a2b(CN), a2b("10.1.0.99"), 1, 2, b"nobody"),
                    down[0][:2] + b"\x00\x10" + down[0][4:]] + down[:3]
    gw_in = [a.packet for p in down for a in ha.receive_from_tun(p, 1.0)]
    # (the GW matches the HA's IP-in-IP by the home address inside: one for nobody has an
    # inner destination no MN has)
    gw_in += [gw_in[0][:10], gw_in[1][:36] + bytes([10, 1, 0, 99]) + gw_in[1][40:]]
    up = [build_udp_packet(a2b(HOME), a2b(CN), 6000, 5000, bytes([i]) * (5 + 11 * i),
                           identification=i)
          for i in range(40)]
    esp = [a.packet for p in up for a in mn.receive_from_tun(p, 1.0)
           if isinstance(a, SendToNet)]
    assert len(esp) == len(up)
    tampered = esp[5][:-1] + bytes([esp[5][-1] ^ 1])
    net_in = esp[:20] + [tampered, esp[3], esp[0][:30]] + esp[20:] + [esp[21]]
    return ha_in, gw_in, net_in


def run_loop(role, tun_packets, net_packets, batch):
    tun, net = FakeTun(), FakeNet()
    loop = EventLoop(role, tun=tun, sender=net, receivers=[net], clock=lambda: 2.0,
                     wallclock=lambda: 1.0, batch=batch)
    try:
        for p in tun_packets:
            tun.inject(p)
        for p in net_packets:
            net.inject(p)
        for _ in range(10):
            loop.run_once(0)
        return {"sent": net.sent, "written": tun.written, "stats": loop.stats}
    finally:
        loop.close()
        tun.close()
        net.close()


def role_state(role):
    return json.dumps({"drops": {str(k): v for k, v in role.drops.items() if v},
                       "status": role.status(),
                       "counters": dict(getattr(role, "counters", {}))},
                      sort_keys=True, default=str)


@pytest.mark.parametrize("which", ["ha", "gw"])
def test_batch_path_equals_single_packet_path(which):
    results = {}
    for batch in (False, True):
        topo = registered_topology()      # same seed: the same keys and state both times
        ha_in, gw_in, net_in = traffic(topo)
        role = topo.ha.role if which == "ha" else topo.gw.role
        tun_in = ha_in if which == "ha" else gw_in
        out = run_loop(role, tun_in, net_in if which == "gw" else [], batch)
        results[batch] = (out, role_state(role), sum(role.drops.values()))
    (single, single_state, drops), (batched, batched_state, _) = results[False], results[True]
    assert batched["sent"] == single["sent"] and single["sent"]
    assert batched["written"] == single["written"]
    if which == "gw":
        assert len(single["written"]) == 40          # the 40 good uplink packets, once each
    assert batched["stats"] == single["stats"]
    assert batched_state == single_state
    assert drops >= 3                                 # the bad packets were dropped and counted


def test_mn_uplink_batch_path_equals_single_packet_path():
    """The MN's uplink (its tun_fast_path, sent on its interface in one batch) against one
    packet at a time: the same packets, on the same interface, the same state."""
    results = {}
    for batch in (False, True):
        topo = registered_topology()
        mn = topo.mn.role
        up = [build_udp_packet(a2b(HOME), a2b(CN), 6000, 5000, bytes([i]) * (5 + 11 * i),
                               identification=i) for i in range(30)]
        up[3:3] = [up[0][:12], up[1] + b"x", b"\x65" + up[2][1:]]
        out = run_loop(mn, up, [], batch)
        results[batch] = (out, role_state(mn))
    (single, single_state), (batched, batched_state) = results[False], results[True]
    assert batched["sent"] == single["sent"]
    assert len(single["sent"]) == 30 and {i for _p, i in single["sent"]} == {topo.mn.role.interface}
    assert batched["stats"] == single["stats"]
    assert batched_state == single_state


def test_tun_fast_path_is_receive_from_tun():
    topo = registered_topology()
    ha = topo.ha.role
    ha_in, _gw_in, _net = traffic(topo)
    for p in ha_in:
        slow = ha.receive_from_tun(p, 1.0)
        fast = ha.tun_fast_path(p, 1.0)
        assert ([SendToNet(fast)] if fast is not None else []) == slow


def test_data_hook_keeps_the_general_path():
    """A hook on SendToNet / WriteToTun sees every data action (no shortcut around it)."""
    topo = registered_topology()
    ha_in, gw_in, net_in = traffic(topo)
    seen = []
    tun, net = FakeTun(), FakeNet()
    loop = EventLoop(topo.gw.role, tun=tun, sender=net, receivers=[net], clock=lambda: 2.0)
    loop.on_action[SendToNet] = lambda a: seen.append("net")
    loop.on_action[WriteToTun] = lambda a: seen.append("tun")
    for p in gw_in:
        tun.inject(p)
    for p in net_in:
        net.inject(p)
    loop.run_once(0)
    loop.run_once(0)
    assert seen.count("net") == len(net.sent) == 40 and seen.count("tun") == 40
    loop.close(), tun.close(), net.close()


# --- sendmmsg / recvmmsg against one call per packet -------------------------------------------

def _udp_pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return tx, rx


@pytest.mark.skipif(not mmsg.available(), reason="sendmmsg/recvmmsg are Linux system calls")
def test_mmsg_equals_one_call_per_packet():
    payloads = [os.urandom(n) for n in (1, 64, 1400, 65508, 200, 0, 9000)] * 12
    outcomes = {}
    for use in (False, True):
        tx, rx = _udp_pair()
        dst = rx.getsockname()
        try:
            results = mmsg.MultiSender(tx, use_mmsg=use).send_batch([(p, dst) for p in payloads])
            receiver = mmsg.MultiReceiver(rx, 65535, use_mmsg=use)
            got = []
            while True:
                chunk = receiver.receive()
                if not chunk:
                    break
                got += chunk
            outcomes[use] = (results, got)
        finally:
            tx.close()
            rx.close()
    assert outcomes[True] == outcomes[False]
    results, got = outcomes[True]
    # 65508 bytes do not fit a UDP datagram (EMSGSIZE): that one fails, the batch goes on
    assert results == [len(p) <= 65507 for p in payloads]
    assert got == [p for p in payloads if len(p) <= 65507]


@pytest.mark.skipif(not mmsg.available(), reason="sendmmsg/recvmmsg are Linux system calls")
@pytest.mark.parametrize("interface", [None, "lo"])
def test_raw_sender_and_receiver_batches_equal_single_calls(interface):
    needs.need(None if os.geteuid() == 0 else "raw sockets need root")
    packets = [build_udp_packet(a2b("127.0.0.1"), a2b("127.0.0.1"), 4000, 4001, bytes([i]) * i,
                                identification=i)
               for i in range(1, 90)]
    packets.insert(7, b"short")
    outcomes = {}
    for use in (False, True):
        receiver = RawReceiver(socket.IPPROTO_UDP, use_mmsg=use)
        sender = RawSender(use_mmsg=use)
        try:
            if use:
                results = (sender.send_batch(packets) if interface is None
                           else sender.send_batch(packets, interface))
            else:
                results = [sender.send(p, interface) for p in packets]
            got = []
            for _ in range(20):
                chunk = receiver.receive()
                got += [p for p in chunk if p[20:22] == (4000).to_bytes(2, "big")]
                if not chunk:
                    break
            outcomes[use] = (results, [p[20:] for p in got], sender.sent, sender.errors)
        finally:
            receiver.close()
            sender.close()
    assert outcomes[True] == outcomes[False]
    results, got, sent, errors = outcomes[True]
    assert results.count(False) == errors == 1 and sent == len(packets) - 1
    assert got == [p[20:] for p in packets if len(p) >= 20]
