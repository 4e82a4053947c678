"""IKE and ESP on loopback through the daemons' own parts (tests/ike_sockets.py: their UDP 500 /
4500 receivers, RoleIke, the raw sender and the child SA book): two endpoints (127.0.0.2 and
127.0.0.3) bring IKE up over real sockets, then ESP-in-UDP goes both ways through the pairs the
book installed.

Binding port 500 needs root: in CI (CI=true) a missing privilege FAILS; elsewhere it skips."""

import socket
import time

import needs
from ike_harness import configs
from ike_sockets import IkeSockets
from mipsec.ike.book import PairInstalled
from mipsec.ike.events import ChildSaEstablished
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4

A, B = "127.0.0.2", "127.0.0.3"


def _require_port_500():
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((A, 500))
        s.close()
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except OSError as e:
        needs.need(f"cannot bind UDP {A}:500 or open a raw socket: {e}",
                   f"cannot bind UDP {A}:500 or open a raw socket ({e}); CI must run as root")


def test_ike_and_esp_over_real_udp_sockets():
    _require_port_500()
    ci, cr = configs(i_force_encap=True)
    got: dict[str, list[bytes]] = {A: [], B: []}
    installed: dict[str, list] = {A: [], B: []}
    ends: dict[str, IkeSockets] = {}

    def keep(who):
        return lambda ev, changes: installed[who].extend(
            c.pair for c in changes if isinstance(c, PairInstalled))

    try:
        ends[A] = IkeSockets(ci, A, on_esp=got[A].append, on_event=keep(A))
        ends[B] = IkeSockets(cr, B, on_esp=got[B].append, on_event=keep(B))
        ends[A].initiate((B, 500))
        end = time.monotonic() + 10
        while time.monotonic() < end and not all(installed.values()):
            for s in ends.values():
                s.poll(0.05)
        child = {k: next(e.child for e in s.events if isinstance(e, ChildSaEstablished))
                 for k, s in ends.items()}
        assert child[A].udp_encap and child[B].udp_encap
        # the book installed exactly the negotiated child, and sends on it
        (pair_a,), (pair_b,) = installed[A], installed[B]
        assert pair_a.child == child[A] and pair_b.child == child[B]
        assert ends[A].book.outbound is pair_a.outbound and ends[B].book.outbound is pair_b.outbound
        up = build_ipv4(Ipv4Header("10.1.0.100", "10.1.0.10", 17), b"\x00\x01\x00\x02\x00\x0cup!!")
        down = build_ipv4(Ipv4Header("10.1.0.10", "10.1.0.100", 17), b"\x00\x02\x00\x01\x00\x0cdn!!")
        ends[A].send_esp(ends[A].book.outbound.encapsulate(up))
        ends[B].send_esp(ends[B].book.outbound.encapsulate(down))
        end = time.monotonic() + 5
        while time.monotonic() < end and not (got[A] and got[B]):
            for s in ends.values():
                s.poll(0.05)
        spi_b = int.from_bytes(got[B][0][28:32], "big")
        spi_a = int.from_bytes(got[A][0][28:32], "big")
        assert ends[B].book.inbound[spi_b].decapsulate(got[B][0]) == up
        assert ends[A].book.inbound[spi_a].decapsulate(got[A][0]) == down
        # NAT keepalives and IKE on 4500 are told apart from ESP by RoleIke.is_ike
        assert not ends[A].endpoint.drops and not ends[B].endpoint.drops
    finally:
        for s in ends.values():
            s.close()
