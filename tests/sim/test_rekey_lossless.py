"""Lossless child SA re-keys in the roles (RFC 7296 §2.8), in the simulator.

A continuous stream runs both ways between the CN and the MN's home address while child SAs
are re-keyed, initiated by either side, with and without PFS.  The receiver's IKE and ESP paths
are skewed against each other, as two sockets of a daemon may be:

* ESP late (``esp``): ESP the peer sent on the old SA before it switched is processed after the
  old SA's Delete; the old inbound SA must still decrypt it (the grace period after the Delete);
* IKE late (``ike``): the answer to a CREATE_CHILD_SA request reaches the initiator after ESP
  the responder sent; the responder must not send on the new SA before the initiator installed
  it (it waits for the old SA's Delete).

Nothing may be lost, and once the grace period is over only the current SPIs are known.
"""

import pytest

from mipsec.drops import DropReason
from mipsec.ike.constants import CHILD_SA_DELETE_GRACE_S
from mipsec.node.mobile_node import RegState
from mipsec.sim.scenario import start_streams, stream_reports, wait_registered
from mipsec.sim.topology import build_topology

SKEW_S = 0.030            # longer than a round trip MN <-> GW (2 x 10.1 ms)


def _is_ike(packet: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    if packet[9] != 17:
        return False
    dport = int.from_bytes(packet[ihl + 2:ihl + 4], "big")
    return dport == 500 or (dport == 4500 and packet[ihl + 8:ihl + 12] == bytes(4))


def _skew(topo, host, late: str) -> None:
    """Hand ``host``'s role the ``late`` kind of packet ("ike" or "esp") SKEW_S later than it
    arrived; the other kind at once (each kind keeps its own order)."""
    deliver = host.driver.net

    def net(packet: bytes) -> None:
        if _is_ike(packet) == (late == "ike"):
            topo.sim.after(SKEW_S, deliver, packet)
        else:
            deliver(packet)
    host.driver.net = net


def _rekey(topo, host) -> None:
    """``host``'s role re-keys its newest child SA now (its own timers are far away)."""
    role, now = host.role, topo.sim.now
    (sa,) = [s for s in role.ike.endpoint.ike_sas if s.is_established]
    newest = max(sa.children.values(), key=lambda c: c.created)
    host.driver.perform(role._ike_outputs(sa.rekey_child(newest.spi_in, now), now))


def _known_spis(topo):
    gw, mn = topo.gw.role, topo.mn.role
    return set(gw._by_spi), set(mn._inbound_sas)


@pytest.mark.parametrize("pfs", ["", "ecp256"])
@pytest.mark.parametrize("late", ["esp", "ike"])
@pytest.mark.parametrize("initiator", ["mn", "gw"])
def test_rekeys_under_a_stream_both_ways_lose_nothing(initiator, late, pfs):
    topo = build_topology(1, sa_source="ikev2", seed=3, internet_delay_s=0.010,
                          ike={"child_lifetime_s": 3600, "ike_lifetime_s": 7200, "dpd_interval_s": 0,
                               "pfs_group": pfs})
    mn, gw = topo.mn.role, topo.gw.role
    topo.move("a")
    assert wait_registered(topo, 2.0)
    for host in (topo.mn, topo.gw):
        _skew(topo, host, late)
    start_streams(topo, interval_s=0.001, start=0.5, stop=4.5)
    spis_used = set()
    for k in range(6):                            # one re-key every 0.5 s, under the stream
        topo.sim.run(until=1.0 + 0.5 * k)
        spis_used |= set().union(*_known_spis(topo))
        _rekey(topo, topo.mn if initiator == "mn" else topo.gw)
    topo.sim.run(until=5.0)

    kinds = [e.kind for e in mn.timeline]
    assert kinds.count("sas-rekeyed") == 6, kinds
    rekeys = [e for e in gw.timeline if e.kind == "gw-sas-rekeyed"]
    assert len(rekeys) == 6
    # the responder of each re-key held its new outbound SA until the old SA's Delete
    assert all(e.detail["send_on_new"] == (initiator == "gw") for e in rekeys)
    rep = stream_reports(topo, since=0.5, until=4.5)
    assert rep["downlink"].lost == 0 and rep["uplink"].lost == 0, rep
    assert rep["downlink"].received > 3000 and rep["uplink"].received > 3000, rep
    assert DropReason.UNKNOWN_SPI not in gw.sad.drops, gw.sad.drops
    assert sum(mn.drops.values()) == 0 and sum(gw.drops.values()) == 0, (mn.drops, gw.drops)
    assert mn.state is RegState.REGISTERED
    m = gw.mobiles[mn.home_address]
    assert mn.outbound.spi == m.inbound.spi and mn.inbound.spi == m.outbound.spi

    # after the grace period only the current pair is known, on both ends
    topo.sim.run(until=4.5 + SKEW_S + CHILD_SA_DELETE_GRACE_S + 0.1)
    gw_spis, mn_spis = _known_spis(topo)
    assert gw_spis == {m.inbound.spi} and set(gw.sad._sas) == {m.inbound.spi}
    assert mn_spis == {mn.inbound.spi}
    assert not gw.book.retired and not mn.book.retired
    # nor do the IKE endpoints keep the SPIs of deleted children reserved
    for role in (mn, gw):
        sizes = role.status()["sizes"]
        assert sizes["ike_esp_spis"] == sizes["ike_children"] == 1, sizes
    assert len(spis_used) >= 7


def _nonces(sa, *firsts: bytes):
    """``sa``'s next nonces start with ``firsts`` (then random): which of two colliding re-keys
    used the lowest nonce, and so which new pair is closed (RFC 7296 §2.8.1), is then known."""
    import os

    from mipsec.ike.constants import NONCE_LEN
    queue = list(firsts)

    def random(n: int) -> bytes:
        if n == NONCE_LEN and queue:
            return queue.pop(0) + os.urandom(n - 1)
        return os.urandom(n)
    sa._random = random


@pytest.mark.parametrize("closed", ["gw", "mn"])
def test_simultaneous_rekeys_of_one_child_keep_the_mobile_on_the_gw(closed):
    # both ends re-key the same child at once: two new pairs; the one whose exchange used the
    # lowest nonce is closed by whoever made it.  "gw": the GW's own re-key loses (the GW
    # deletes the pair it initiated); "mn": the MN's loses (the MN deletes the pair it
    # initiated, the GW's newest one when the GW's own answer came first)
    topo = build_topology(1, sa_source="ikev2", seed=3, internet_delay_s=0.010,
                          ike={"child_lifetime_s": 3600, "ike_lifetime_s": 7200,
                               "dpd_interval_s": 0})
    mn, gw = topo.mn.role, topo.gw.role
    topo.move("a")
    assert wait_registered(topo, 2.0)
    (gw_sa,) = [s for s in gw.ike.endpoint.ike_sas if s.is_established]
    (mn_sa,) = [s for s in mn.ike.endpoint.ike_sas if s.is_established]
    low, high = b"\x00", b"\xff"
    # the GW draws the nonce of its own request first, then the one of its answer to the MN
    _nonces(gw_sa, *((low, high) if closed == "gw" else (high, low)))
    _nonces(mn_sa, high)
    start_streams(topo, interval_s=0.005, start=0.5, stop=3.0)
    topo.sim.run(until=1.0)
    _rekey(topo, topo.mn)
    _rekey(topo, topo.gw)
    topo.sim.run(until=3.5)

    assert [e.kind for e in gw.timeline].count("gw-sas-rekeyed") == 2
    assert "mobile-removed" not in [e.kind for e in gw.timeline]
    m = gw.mobiles[mn.home_address]
    assert mn.outbound.spi == m.inbound.spi and mn.inbound.spi == m.outbound.spi
    rep = stream_reports(topo, since=0.5, until=3.0)
    assert rep["downlink"].lost == 0 and rep["uplink"].lost == 0, rep
    assert rep["downlink"].received > 400 and rep["uplink"].received > 400, rep
    assert sum(mn.drops.values()) == 0 and sum(gw.drops.values()) == 0, (mn.drops, gw.drops)
    # one child survives, the same on both ends, and nothing else is kept once the grace
    # period is over
    topo.sim.run(until=3.5 + CHILD_SA_DELETE_GRACE_S + 0.1)
    gw_spis, mn_spis = _known_spis(topo)
    assert gw_spis == {m.inbound.spi} and mn_spis == {mn.inbound.spi}
    assert set(gw_sa.children) == {m.inbound.spi} and set(mn_sa.children) == {mn.inbound.spi}
    for role in (mn, gw):
        sizes = role.status()["sizes"]
        assert sizes["ike_esp_spis"] == sizes["ike_children"] == sizes["pairs"] == 1, sizes
