"""mipsec.io.ike_udp on loopback: two endpoints over real UDP 500/4500 sockets (127.0.0.2 and
127.0.0.3), IKE up, then ESP-in-UDP both ways through send_esp / on_esp.

Binding port 500 needs root: in CI (CI=true) a missing privilege FAILS; elsewhere it skips."""

import socket
import time

import needs
from ike_harness import configs
from mipsec.ike.endpoint import IkeEndpoint
from mipsec.ike.events import ChildSaEstablished
from mipsec.io.ike_udp import IkeUdpAdapter
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4

A, B = "127.0.0.2", "127.0.0.3"


def _require_port_500():
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((A, 500))
        s.close()
    except OSError as e:
        needs.need(f"cannot bind UDP {A}:500: {e}", f"cannot bind UDP {A}:500 ({e}); CI must run as root")


def test_ike_and_esp_over_real_udp_sockets():
    _require_port_500()
    ci, cr = configs(i_force_encap=True)
    got = {A: [], B: []}
    ends = {}
    try:
        ends[A] = IkeUdpAdapter(IkeEndpoint(ci), A, on_esp=got[A].append)
        ends[B] = IkeUdpAdapter(IkeEndpoint(cr), B, on_esp=got[B].append)
        ends[A].initiate((B, 500))
        end = time.monotonic() + 10
        while time.monotonic() < end and not all(
                any(isinstance(e, ChildSaEstablished) for e in ad.events) for ad in ends.values()):
            for ad in ends.values():
                ad.poll(0.05)
        child = {k: next(e.child for e in ad.events if isinstance(e, ChildSaEstablished))
                 for k, ad in ends.items()}
        sas = {k: c.make_sas() for k, c in child.items()}
        assert child[A].udp_encap and child[B].udp_encap
        up = build_ipv4(Ipv4Header("10.1.0.100", "10.1.0.10", 17), b"\x00\x01\x00\x02\x00\x0cup!!")
        down = build_ipv4(Ipv4Header("10.1.0.10", "10.1.0.100", 17), b"\x00\x02\x00\x01\x00\x0cdn!!")
        ends[A].send_esp(sas[A][1].encapsulate(up))
        ends[B].send_esp(sas[B][1].encapsulate(down))
        end = time.monotonic() + 5
        while time.monotonic() < end and not (got[A] and got[B]):
            for ad in ends.values():
                ad.poll(0.05)
        assert sas[B][0].decapsulate(got[B][0]) == up
        assert sas[A][0].decapsulate(got[A][0]) == down
        # NAT keepalives and IKE on 4500 are told apart from ESP by the adapter
        assert not ends[A].endpoint.drops and not ends[B].endpoint.drops
    finally:
        for ad in ends.values():
            ad.close()
