"""ChildSaBook: IKE events in, the right ESP SA pairs installed, moved and removed."""

import pytest

from ike_harness import GW_ADDR, MN_ADDR, establish
from mipsec.ike.book import (
    ChildSaBook,
    FellBack,
    InboundForgotten,
    PairInstalled,
    PairRefused,
    PairRemoved,
    PairRetired,
    SendingSwitched,
)
from mipsec.ike.child import ChildKeys, ChildSa
from mipsec.ike.codec import TrafficSelector
from mipsec.ike.constants import CHILD_SA_DELETE_GRACE_S
from mipsec.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    IkeSaRekeyed,
)
from mipsec.ike.proposals import parse_esp_suite
from mipsec.ike.sa import State
from test_ike_exchanges import INNER_DOWN, INNER_UP


def books(net, **kw):
    out = {MN_ADDR: ChildSaBook(), GW_ADDR: ChildSaBook(**kw)}
    for who, ev in net.events:
        out[who].apply(ev)
    return out


def replay(net, b, start):
    for who, ev in net.events[start:]:
        b[who].apply(ev)
    return len(net.events)


def works(b):
    mn, gw = b[MN_ADDR], b[GW_ADDR]
    up = mn.outbound.encapsulate(INNER_UP)
    spi = int.from_bytes(up[20:24], "big") if up[9] == 50 else int.from_bytes(up[28:32], "big")
    assert gw.inbound[spi].decapsulate(up) == INNER_UP
    down = gw.outbound.encapsulate(INNER_DOWN)
    spi = int.from_bytes(down[20:24], "big") if down[9] == 50 else int.from_bytes(down[28:32], "big")
    assert mn.inbound[spi].decapsulate(down) == INNER_DOWN


def test_book_follows_rekeys_moves_and_deletes():
    net, I, R = establish(ike_lifetime_s=None, child_lifetime_s=None, dpd_interval_s=None)
    b = books(net, inbound_any_source=True)
    seen = len(net.events)
    assert len(b[MN_ADDR].pairs) == 1 and b[GW_ADDR].pairs
    assert next(iter(b[GW_ADDR].inbound.values())).remote is None      # wildcard source
    works(b)

    sa_i = next(s for s in I.ike_sas if s.is_established)
    net.deliver(sa_i.rekey_child(next(iter(sa_i.children)), 1.0), MN_ADDR)
    seen = replay(net, b, seen)
    assert len(b[MN_ADDR].pairs) == 1 and len(b[GW_ADDR].pairs) == 1
    works(b)

    net.deliver(sa_i.rekey(2.0), MN_ADDR)                   # IKE re-key: children stay
    seen = replay(net, b, seen)
    assert sa_i.state == State.CLOSED and len(b[MN_ADDR].pairs) == 1
    works(b)

    new_i = next(s for s in I.ike_sas if s.is_established)
    net.endpoints["172.16.2.10"] = I
    del net.endpoints[MN_ADDR]
    net.deliver(new_i.update_addresses(("172.16.2.10", 4500), 3.0), "172.16.2.10")
    for who, ev in net.events[seen:]:
        b[MN_ADDR if who == "172.16.2.10" else who].apply(ev)
    seen = len(net.events)
    assert b[MN_ADDR].outbound.local == "172.16.2.10"
    assert b[GW_ADDR].outbound.remote == "172.16.2.10"
    works(b)

    new_r = next(s for s in R.ike_sas if s.is_established)
    net.deliver(new_r.delete(4.0), GW_ADDR)
    for who, ev in net.events[seen:]:
        b[MN_ADDR if who == "172.16.2.10" else who].apply(ev)
    assert not b[MN_ADDR].pairs and not b[GW_ADDR].pairs
    assert b[MN_ADDR].outbound is None and not b[GW_ADDR].inbound


def test_nat_remapping_moves_the_udp_ports_of_the_book_sas():
    nat = {(MN_ADDR, 500): ("172.16.2.254", 40000), (MN_ADDR, 4500): ("172.16.2.254", 40001)}
    net, I, R = establish(nat=nat, dpd_interval_s=None)
    b = books(net)
    seen = len(net.events)
    net.nat[(MN_ADDR, 4500)] = ("172.16.2.254", 40777)
    net.deliver(next(s for s in I.ike_sas if s.is_established).check_liveness(1.0), MN_ADDR)
    replay(net, b, seen)
    assert b[GW_ADDR].outbound.udp_encap.remote_port == 40777


def test_mobike_onto_a_nat_rekeys_the_child_instead_of_moving_it():
    net, I, R = establish(dpd_interval_s=None)
    b = books(net)
    seen = len(net.events)
    old = next(iter(b[MN_ADDR].pairs.values()))[0]
    assert not old.udp_encap
    # the MN moves behind a NAT
    new_coa = "192.168.7.10"
    net.endpoints[new_coa] = I
    del net.endpoints[MN_ADDR]
    net.nat = {(new_coa, 4500): ("172.16.2.254", 41000)}
    sa_i = next(s for s in I.ike_sas if s.is_established)
    net.deliver(sa_i.update_addresses((new_coa, 4500), 1.0), new_coa)
    for who, ev in net.events[seen:]:
        b[MN_ADDR if who == new_coa else who].apply(ev)
    (child_i, sin_i, sout_i), = b[MN_ADDR].pairs.values()
    (child_r, sin_r, sout_r), = b[GW_ADDR].pairs.values()
    assert child_i.udp_encap and child_r.udp_encap and child_i.spi_in != old.spi_in
    assert child_r.remote_port == 41000
    up = sout_i.encapsulate(INNER_UP)
    # the NAT rewrites the outer source address and port
    from mipsec.wire.ipv4 import Ipv4Header, UdpHeader, build_ipv4, build_udp
    natted = build_ipv4(Ipv4Header("172.16.2.254", GW_ADDR, 17),
                        build_udp(UdpHeader(41000, 4500), up[28:]))
    assert sin_r.decapsulate(natted) == INNER_UP


def test_rekey_answered_sends_on_old_until_delete_and_old_inbound_has_a_grace_period():
    from mipsec.ike.constants import CHILD_SA_DELETE_GRACE_S
    from mipsec.ike.events import ChildSaDeleted, ChildSaRekeyed
    net, I, R = establish(ike_lifetime_s=None, child_lifetime_s=None, dpd_interval_s=None)
    b = books(net, inbound_any_source=True)
    seen = len(net.events)
    mn, gw = b[MN_ADDR], b[GW_ADDR]
    old_gw_out, old_mn_out = gw.outbound, mn.outbound
    old_gw_in, old_mn_in = set(gw.inbound), set(mn.inbound)
    sa_i = next(s for s in I.ike_sas if s.is_established)
    net.deliver(sa_i.rekey_child(next(iter(sa_i.children)), 1.0), MN_ADDR)
    for who, ev in net.events[seen:]:
        book = b[who]
        book.apply(ev, 1.0)
        if isinstance(ev, ChildSaRekeyed) and who == GW_ADDR:
            # the GW answered: the MN has not installed the new pair yet
            assert ev.send_on_new is False and gw.outbound is old_gw_out
        if isinstance(ev, ChildSaRekeyed) and who == MN_ADDR:
            assert ev.send_on_new is True and mn.outbound is not old_mn_out
        if isinstance(ev, ChildSaDeleted) and who == GW_ADDR:
            assert gw.outbound is not old_gw_out            # the Delete: now the new one
    works(b)
    # the old inbound SAs still decrypt, for the grace period only
    assert old_gw_in <= set(gw.inbound) and old_mn_in <= set(mn.inbound)
    assert len(gw.pairs) == len(mn.pairs) == 1 and len(gw.retired) == len(mn.retired) == 1
    assert gw.get_timer() == 1.0 + CHILD_SA_DELETE_GRACE_S
    assert gw.expire(1.0 + CHILD_SA_DELETE_GRACE_S - 0.01) == []
    gone = gw.expire(1.0 + CHILD_SA_DELETE_GRACE_S)
    assert [type(g) for g in gone] == [InboundForgotten] and gw.get_timer() is None
    assert set(gw.inbound) == set(gw.pairs) and not (old_gw_in & set(gw.inbound))
    # an IKE SA that ends takes the retired inbound SAs with it
    new_r = next(s for s in R.ike_sas if s.is_established)
    seen = len(net.events)
    net.deliver(new_r.delete(2.0), GW_ADDR)
    for who, ev in net.events[seen:]:
        b[who].apply(ev, 2.0)
    assert not mn.inbound and not mn.retired and mn.get_timer() is None


def test_an_spi_allocated_for_a_child_that_never_came_is_given_back():
    from test_ike_exchanges import only_sa
    net, I, R = establish(ike_lifetime_s=None, child_lifetime_s=None, dpd_interval_s=None)
    sa_i, sa_r = only_sa(I), only_sa(R)
    (x_r,), (x_i,) = list(sa_r.children), list(sa_i.children)
    held = sa_r.rekey_child(x_r, 1.0)               # the GW re-keys; its request is delayed
    assert R.sizes()["esp_spis"] == 2
    net.deliver(sa_i.delete_child(x_i, 1.0), MN_ADDR)   # meanwhile the MN deletes the child
    assert not sa_i.children and not sa_r.children
    net.deliver(held, GW_ADDR)                      # the MN answers CHILD_SA_NOT_FOUND
    assert R.sizes()["esp_spis"] == 0 and I.sizes()["esp_spis"] == 0
    # a re-key in flight when its IKE SA fails gives its SPI back too
    net.deliver(sa_i.create_child(2.0), MN_ADDR)
    assert I.sizes()["esp_spis"] == 1 and R.sizes()["esp_spis"] == 1
    net.tap = lambda d: None                        # the path is gone
    net.deliver(sa_i.rekey_child(next(iter(sa_i.children)), 3.0), MN_ADDR)
    assert I.sizes()["esp_spis"] == 2
    net.run_timers(60.0)
    assert sa_i.state == State.CLOSED and I.sizes() == {
        "ike_sas": 0, "spis": 0, "half_open": 0, "esp_spis": 0, "children": 0}


# --- the book's rules, one row each ------------------------------------------------------------

OLD_IKE, NEW_IKE = b"\x01" * 8, b"\x02" * 8
_SUITE = parse_esp_suite("aes128gcm16")
_ANY = (TrafficSelector("0.0.0.0", "255.255.255.255"),)


def _child(n: int) -> ChildSa:
    key = bytes([n]) * 20
    return ChildSa(spi_in=0x1000 + n, spi_out=0x2000 + n, suite=_SUITE,
                   keys=ChildKeys(key, b"", key, b""), local_ts=_ANY, remote_ts=_ANY,
                   local_address=MN_ADDR, remote_address=GW_ADDR, udp_encap=False)


def _spi(n: int | None) -> int | None:
    return None if n is None else 0x1000 + n


def _step(step: tuple, ike: list[bytes]) -> object:
    kind, *args = step
    where = (MN_ADDR, 500), (GW_ADDR, 500)
    if kind == "up":
        return ChildSaEstablished(ike[0], "gw", *where, _child(args[0]))
    if kind == "rekey":
        old, new, send_on_new = args
        return ChildSaRekeyed(ike[0], "gw", *where, _child(old), _child(new), send_on_new)
    if kind == "delete":
        return ChildSaDeleted(ike[0], "gw", _child(args[0]))
    if kind == "deleted-by-another-ike-sa":
        return ChildSaDeleted(b"\x09" * 8, "gw", _child(args[0]))
    if kind == "ike-rekey":
        ike[:] = [NEW_IKE]
        return IkeSaRekeyed(OLD_IKE, "old", NEW_IKE, "gw", *where)
    if kind == "ike-ended":
        return IkeSaDeleted(args[0], "x", "gw", where[1], "deleted by the peer")
    raise AssertionError(kind)


# (steps, current pair, sending pair, retired pairs, the last step's changes)
BOOK_TABLE = {
    "first child": ([("up", 1)], 1, 1, set(), [PairInstalled]),
    "re-key we started: send on new at once": (
        [("up", 1), ("rekey", 1, 2, True)], 2, 2, set(), [PairInstalled, SendingSwitched]),
    "re-key we answered: keep sending on old": (
        [("up", 1), ("rekey", 1, 2, False)], 2, 1, set(), [PairInstalled]),
    "... until the old pair's Delete": (
        [("up", 1), ("rekey", 1, 2, False), ("delete", 1)], 2, 2, {1},
        [PairRetired, SendingSwitched]),
    "re-key we started, old deleted: grace only": (
        [("up", 1), ("rekey", 1, 2, True), ("delete", 1)], 2, 2, {1}, [PairRetired]),
    "simultaneous re-keys, ours deleted: fall back": (
        [("up", 1), ("rekey", 1, 2, False), ("rekey", 1, 3, True), ("delete", 3)], 2, 2, {3},
        [PairRetired, SendingSwitched, FellBack]),
    "simultaneous re-keys, theirs deleted": (
        [("up", 1), ("rekey", 1, 2, False), ("rekey", 1, 3, True), ("delete", 2)], 3, 3, {2},
        [PairRetired]),
    "last child deleted: its retired ones go too": (
        [("up", 1), ("rekey", 1, 2, True), ("delete", 1), ("delete", 2)], None, None, set(),
        [PairRemoved, InboundForgotten]),
    "unknown child deleted": ([("up", 1), ("delete", 7)], 1, 1, set(), []),
    "a child of another IKE SA with the same SPI deleted": (
        [("up", 1), ("deleted-by-another-ike-sa", 1)], 1, 1, set(), []),
    "inbound SPI already in use: refused": (
        [("up", 1), ("up", 1)], 1, 1, set(), [PairRefused]),
    "IKE SA re-keyed: the children follow it": (
        [("up", 1), ("ike-rekey",), ("ike-ended", OLD_IKE)], 1, 1, set(), []),
    "IKE SA ended with a child left": (
        [("up", 1), ("ike-ended", OLD_IKE)], None, None, set(), [PairRemoved]),
}


@pytest.mark.parametrize("row", list(BOOK_TABLE))
def test_book_table(row):
    steps, current, sending, retired, last = BOOK_TABLE[row]
    book, ike = ChildSaBook(), [OLD_IKE]
    changes: list = []
    for step in steps:
        changes = book.apply(_step(step, ike), 1.0)
    lane = book.lane(ike[0])
    assert (lane.current.child.spi_in if lane and lane.current else None) == _spi(current)
    assert (lane.sending.child.spi_in if lane and lane.sending else None) == _spi(sending)
    assert set(book.retired) == {_spi(n) for n in retired}
    assert [type(c) for c in changes] == last
    # the data path knows exactly the live and the retired inbound SAs
    assert set(book.inbound) == set(book.pairs) | set(book.retired)


def test_book_switch_keeps_the_binding_and_the_grace_period_ends():
    book, ike = ChildSaBook(), [OLD_IKE]
    book.apply(_step(("up", 1), ike))
    first = book.lane(OLD_IKE).sending.outbound
    first.rebind(remote="172.16.9.9")              # e.g. the GW's binding moved meanwhile
    book.apply(_step(("rekey", 1, 2, False), ike), 1.0)
    (switched,) = [c for c in book.apply(_step(("delete", 1), ike), 2.0)
                   if isinstance(c, SendingSwitched)]
    assert switched.old is first and switched.new.remote == "172.16.9.9"
    assert book.get_timer() == 2.0 + CHILD_SA_DELETE_GRACE_S
    assert book.expire(2.0 + CHILD_SA_DELETE_GRACE_S - 0.01) == []
    (gone,) = book.expire(2.0 + CHILD_SA_DELETE_GRACE_S)
    assert isinstance(gone, InboundForgotten) and gone.inbound.spi == 0x1001
    assert set(book.inbound) == {0x1002} and book.get_timer() is None
