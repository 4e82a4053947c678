"""The roles' fast paths (``net_fast_path`` / ``tun_fast_path`` of GW and MN, which the event loop
uses on its data path) behave exactly like ``receive_from_net`` / ``receive_from_tun``: for a set of good and
bad packets, two identical roles (same seed: same keys, same state) fed one through each path
give the same bytes out, the same drops and the same counters (the whole ``status()``).
"""

from __future__ import annotations

import json

import pytest

from mipsec.errors import Dropped
from mipsec.mip import ipip
from mipsec.node.actions import SendToNet, WriteToTun
from mipsec.node.packet import a2b
from mipsec.node.packet import build_udp_packet as build_udp
from mipsec.sim.topology import build_topology
from mipsec.wire.ipv4 import checksum


def build_udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes,
                     ident: int = 0) -> bytes:
    """IPv4 + UDP between dotted addresses, both checksums valid."""
    return build_udp(a2b(src), a2b(dst), sport, dport, payload, identification=ident)


CN, HOME, HA = "10.1.0.10", "10.1.0.100", "10.1.0.2"
NOW = 2.0


def registered_topology(**kwargs):
    topo = build_topology(1, internet_delay_s=0.002, seed=11, **kwargs)
    topo.move("a")
    topo.sim.run(until=2.0)
    assert topo.ha.role.bindings[HOME].care_of_address == topo.care_of["a"][0]
    return topo


def fix_checksum(packet: bytes, ihl: int = 20) -> bytes:
    header = bytearray(packet[:ihl])
    header[10:12] = b"\0\0"
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + packet[ihl:]


def with_byte(packet: bytes, at: int, value: int, *, recheck: bool = True) -> bytes:
    out = packet[:at] + bytes([value]) + packet[at + 1:]
    return fix_checksum(out) if recheck else out


def with_options(packet: bytes) -> bytes:
    """The same packet with a 4-byte option (NOP x 4) in its header: IHL 6."""
    body = packet[20:]
    header = bytes([0x46]) + packet[1:2] + (len(packet) + 4).to_bytes(2, "big") + packet[4:20]
    return fix_checksum(header + b"\x01" * 4 + body, 24)


def fragment(packet: bytes) -> bytes:
    return with_byte(packet, 6, packet[6] | 0x20)          # More Fragments


def uplink_packets(topo) -> list[bytes]:
    """ESP from the MN to the GW: good ones, and every kind of bad one."""
    mn = topo.mn.role
    sa = mn.outbound
    coa = topo.care_of["a"][0]
    gw_out = topo.gw.role.outside

    def esp(inner: bytes) -> bytes | None:
        try:
            return sa.encapsulate(inner, 1.0)
        except Dropped:         # an SA with traffic selectors (IKEv2) refuses to send it
            return None

    good = [a.packet for i in range(8)
            for a in mn.receive_from_tun(build_udp_packet(HOME, 6000, CN, 5000, bytes([i]) * (9 * i + 1),
                                                          ident=i), 1.0)
            if isinstance(a, SendToNet)]
    assert len(good) == 8
    rrq = mn._send_rrq(1.0)
    plain_up = build_udp_packet(HOME, 6000, CN, 5000, b"plain")
    out = list(good)
    out += [good[0], good[1][:-1] + bytes([good[1][-1] ^ 1]), good[2][:30], good[2][:10],
            good[3] + b"x", fragment(good[3]), with_options(good[4]),
            with_byte(good[4], 10, good[4][10] ^ 0xFF, recheck=False),       # header checksum
            with_byte(good[5], 20, good[5][20] ^ 0x55),                       # unknown SPI
            with_byte(good[5], 9, 6),                                         # TCP, not ESP
            with_byte(good[5], 0, 0x65),                                      # IPv6 nibble
            good[5][:16] + bytes(ipip.packed(topo.gw.role.inside)) + good[5][20:],
            fix_checksum(good[5][:16] + bytes([172, 16, 0, 99]) + good[5][20:]),
            build_udp_packet(coa, 4500, gw_out, 4500, b"\xff"),              # NAT keepalive
            build_udp_packet(coa, 4500, gw_out, 4500, bytes(4) + b"ike"),     # non-ESP marker
            build_udp_packet(coa, 4500, gw_out, 4500, good[6][20:]),          # ESP in UDP
            esp(plain_up),                                                    # no reverse tunnel
            esp(fragment(plain_up)),                                          # inner fragment
            esp(with_options(plain_up)),                                      # inner options
            esp(build_udp_packet(HOME, 1, "192.0.2.1", 2, b"away")),         # forbidden dst
            esp(build_udp_packet("10.1.0.50", 1, CN, 2, b"spoof")),          # forbidden src
            esp(ipip.encapsulate(build_udp_packet("10.1.0.51", 1, CN, 2, b"x"), coa, HA)),
            rrq.packet, rrq.packet]                                           # RRQ, and again
    fresh = esp(ipip.encapsulate(build_udp_packet(HOME, 1, CN, 2, b"fresh"), coa, HA))
    out += [fresh[:-1] + bytes([fresh[-1] ^ 1]), fresh]                       # ICV, then good
    out += good[6:]                                                           # late, replayed
    return [p for p in out if p is not None]


def downlink_ipip(topo) -> list[bytes]:
    """What the GW's TUN sees: the HA's IP-in-IP, good and bad."""
    ha = topo.ha.role
    coa = topo.care_of["a"][0]
    good = [a.packet for i in range(8)
            for a in ha.receive_from_tun(build_udp_packet(CN, 5000, HOME, 6000, bytes([i]) * (7 * i + 3),
                                                          ident=i), 1.0)]
    assert len(good) == 8
    udp = build_udp_packet(CN, 5000, HOME, 6000, b"not tunnelled")
    return good + [good[0][:10], good[0][:39], good[1] + b"y", fragment(good[1]),
                   with_options(good[2]), with_byte(good[2], 0, 0x55), udp,
                   good[3][:36] + bytes([10, 1, 0, 99]) + good[3][40:],
                   ipip.encapsulate(b"\x45" + bytes(10), HA, coa)] + good[4:]


def downlink_esp(topo) -> list[bytes]:
    """ESP from the GW to the MN: good ones, and bad ones inside and out."""
    gw = topo.gw.role
    sa = gw.mobiles[HOME].outbound
    coa = topo.care_of["a"][0]
    tunnelled = [gw.receive_from_tun(p, 1.0) for p in downlink_ipip(topo)[:8]]
    good = [a[0].packet for a in tunnelled]
    inner = build_udp_packet(CN, 5000, HOME, 6000, b"downlink")

    def esp(packet: bytes) -> bytes | None:
        try:
            return sa.encapsulate(packet, 1.0)
        except Dropped:         # an SA with traffic selectors (IKEv2) refuses to send it
            return None

    wrapped = ipip.encapsulate(inner, HA, coa)
    return [p for p in good[:5] + [
        good[0], good[7][:-1] + bytes([good[7][-1] ^ 1]), good[2][:25], good[2] + b"z",
        fragment(good[2]), with_options(good[3]), with_byte(good[3], 21, good[3][21] ^ 0x11),
        esp(ipip.encapsulate(inner, "10.1.0.77", coa)),                 # not our HA
        esp(with_byte(wrapped, 10, wrapped[10] ^ 1, recheck=False)),    # IP-in-IP checksum
        esp(fragment(wrapped)),                                         # IP-in-IP fragment
        esp(with_options(wrapped)),                                     # IP-in-IP options
        esp(ipip.encapsulate(fragment(inner), HA, coa)),                # innermost fragment
        esp(ipip.encapsulate(with_options(inner), HA, coa)),            # innermost options
        esp(wrapped[:20] + b"\x45" + wrapped[21:22] + (999).to_bytes(2, "big") + wrapped[24:]),
        esp(build_udp_packet(CN, 1, HOME, 2, b"no tunnel")),            # MIP_NOT_FOR_US
        esp(build_udp_packet(HA, 434, coa, 434, b"\x03" + bytes(30))),  # a bogus reply
    ] + good[5:] if p is not None]


def app_packets(topo) -> list[bytes]:
    """What the MN's TUN sees: application packets from the home address, good and bad."""
    good = [build_udp_packet(HOME, 6000, CN, 5000, bytes([i]) * (13 * i + 1), ident=i)
            for i in range(8)]
    huge = build_udp_packet(HOME, 6000, CN, 5000, bytes(65490))         # no room for IP-in-IP
    return good[:4] + [good[0][:12], good[0][:25], good[1] + b"w", fragment(good[1]),
                       with_options(good[2]), with_byte(good[2], 0, 0x65), huge,
                       build_udp_packet("10.1.0.55", 1, CN, 2, b"not ours")] + good[4:]


def as_actions(result, kind, role):
    if result is None:
        return []
    if isinstance(result, bytes):
        return [kind(result, role)]
    return result


def state(role) -> str:
    return json.dumps({"drops": {str(k): v for k, v in role.drops.items() if v},
                       "status": role.status(),
                       "counters": dict(getattr(role, "counters", {}))},
                      sort_keys=True, default=str)


def to_tun(packet, role):
    return WriteToTun(packet)


def to_net(packet, role):
    return SendToNet(packet, getattr(role, "data_interface", None))


CASES = {
    "gw-net": (lambda t: t.gw.role, uplink_packets, "receive_from_net", "net_fast_path",
               to_tun),
    "gw-tun": (lambda t: t.gw.role, downlink_ipip, "receive_from_tun", "tun_fast_path",
               to_net),
    "mn-net": (lambda t: t.mn.role, downlink_esp, "receive_from_net", "net_fast_path",
               to_tun),
    "mn-tun": (lambda t: t.mn.role, app_packets, "receive_from_tun", "tun_fast_path",
               to_net),
    # ESP in UDP 4500 (RFC 3948)
    "mn-net-udp": (lambda t: t.mn.role, downlink_esp, "receive_from_net", "net_fast_path",
                   to_tun, {"udp_encap": True}),
    "gw-net-udp": (lambda t: t.gw.role, uplink_packets, "receive_from_net", "net_fast_path",
                   to_tun, {"udp_encap": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_equals_slow_path(case):
    role_of, make_packets, slow_name, fast_name, kind, *extra = CASES[case]
    kwargs = extra[0] if extra else {}
    packets = make_packets(registered_topology(**kwargs))
    slow_role = role_of(registered_topology(**kwargs))
    fast_role = role_of(registered_topology(**kwargs))
    assert state(slow_role) == state(fast_role)
    slow_fn, fast_fn = getattr(slow_role, slow_name), getattr(fast_role, fast_name)
    delivered = 0
    for i, packet in enumerate(packets):
        slow = slow_fn(packet, NOW)
        fast = as_actions(fast_fn(packet, NOW), kind, fast_role)
        assert fast == slow, f"packet {i}"
        delivered += sum(1 for a in slow if isinstance(a, (WriteToTun, SendToNet)))
    assert state(fast_role) == state(slow_role)
    drops = sum(slow_role.drops.values())
    # the good packets went through, every bad one was dropped and counted
    assert delivered >= 8 and drops >= len(packets) - delivered - 2
    assert len({str(k) for k, v in slow_role.drops.items() if v}) >= 4


def test_fast_paths_take_the_common_case_themselves():
    """Good data packets do not fall back to the slow path (which would make them no faster)."""
    topo = registered_topology()
    gw, mn = topo.gw.role, topo.mn.role
    up = uplink_packets(registered_topology())[:8]
    down = downlink_ipip(registered_topology())[:8]
    esp_down = downlink_esp(registered_topology())[:5]
    calls = []
    for role in (gw, mn):
        for name in ("receive_from_net", "receive_from_tun"):
            original = getattr(role, name)
            setattr(role, name, lambda p, now, o=original, n=name: calls.append(n) or o(p, now))
    assert all(isinstance(gw.net_fast_path(p, NOW), bytes) for p in up)
    assert all(isinstance(gw.tun_fast_path(p, NOW), bytes) for p in down)
    mn._awaiting_first_downlink = False
    assert all(isinstance(mn.net_fast_path(p, NOW), bytes) for p in esp_down)
    app = app_packets(registered_topology())[:4]
    assert all(isinstance(mn.tun_fast_path(p, NOW), bytes) for p in app)
    assert calls == []
