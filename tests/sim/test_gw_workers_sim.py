"""A GW split into a control process and worker processes (``workers = 2``), modelled in one
object (``ShardedGateway``) in the in-memory network: three MNs with IKEv2, streams both ways,
handovers and child re-keys.  Every SA is in exactly one worker, the one its SPI selects; each
SPI's ESP sequence numbers on the GW's outside link never repeat; nothing is lost that the
single-process GW would not lose."""

from __future__ import annotations

import pytest

from mipsec.ike.constants import CHILD_SA_DELETE_GRACE_S
from mipsec.ipsec.shard import worker_of
from mipsec.node.gateway_sharded import ShardedGateway
from mipsec.sim.scenario import wait_registered
from mipsec.sim.topology import build_topology

MOBILES = 3


def _topo(workers: int, **kw):
    return build_topology(MOBILES, internet_delay_s=0.005, seed=5,
                          make_gateway=lambda cfg, wallclock: ShardedGateway(
                              cfg, workers, wallclock=wallclock), **kw)


def _ring_streams(topo, *, start: float, stop: float) -> None:
    """MN i streams to MN i+1 (through the GW, the home network, the HA and the GW again):
    every MN's uplink and downlink, each received stream from one sender."""
    for i, host in enumerate(topo.mobiles):
        peer = topo.mobiles[(i + 1) % MOBILES].role.home_address
        host.application.start_stream(peer, interval_s=0.002, start=start, stop=stop, size=64)
        host.application_driver.rearm()


def _esp_sequences(capture, gw_outside: bytes) -> dict[int, list[int]]:
    """SPI -> sequence numbers, in order, of the ESP the GW sent (raw and in UDP)."""
    out: dict[int, list[int]] = {}
    for _t, _sender, packet in capture:
        if packet[12:16] != gw_outside:
            continue
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] == 50:
            at = ihl
        elif (packet[9] == 17 and len(packet) >= ihl + 16 and packet[ihl:ihl + 2] == b"\x11\x94"
              and packet[ihl + 8:ihl + 12] != bytes(4)):            # from 4500, not IKE
            at = ihl + 8
        else:
            continue
        spi = int.from_bytes(packet[at:at + 4], "big")
        out.setdefault(spi, []).append(int.from_bytes(packet[at + 4:at + 8], "big"))
    return out


def _check_one_worker_per_sa(gw: ShardedGateway) -> None:
    n = len(gw.workers)
    where: dict[str, int] = {}
    for w in gw.workers:
        rep = w.report()
        for spi in rep["inbound_spis"] + rep["outbound_spis"]:
            assert spi not in where, f"SPI {spi} in workers {where[spi]} and {w.index}"
            where[spi] = w.index
        for spi in rep["inbound_spis"]:
            assert worker_of(int(spi, 16), n) == w.index
    for home, m in gw.control.mobiles.items():
        owner = worker_of(m.inbound.spi, n)
        assert where[f"0x{m.outbound.spi:08x}"] == owner, home
        for spi in (m.inbound.spi, *gw.control.other_inbound(m)):
            assert where[f"0x{spi:08x}"] == owner
    assert gw.sync.off_shard == 0


@pytest.mark.parametrize("sa_source", ["ikev2", "manual", "manual-udp"])
def test_workers_keep_each_sa_in_one_worker_through_handovers_and_rekeys(sa_source):
    kw: dict = {"ike": {"child_lifetime_s": 1.5, "ike_lifetime_s": 100.0, "dpd_interval_s": 0}} \
        if sa_source == "ikev2" else {}
    if sa_source == "manual-udp":       # ESP in UDP 4500: the reuseport selector's split
        sa_source, kw = "manual", {"udp_encap": True}
    topo = _topo(2, sa_source=sa_source, **kw)
    gw: ShardedGateway = topo.gw.role
    capture = topo.outside.start_capture()
    for i in range(MOBILES):
        topo.move("a", index=i)
    assert wait_registered(topo, 3.0)
    _ring_streams(topo, start=0.5, stop=4.0)
    topo.sim.run(until=1.2)
    for i in range(MOBILES):
        topo.move("b", index=i, make_before_break=True)
    topo.sim.run(until=4.3)
    assert wait_registered(topo, 1.0)
    _check_one_worker_per_sa(gw)
    # the MNs are spread over both workers, and both carried traffic
    reports = [w.report() for w in gw.workers]
    assert all(r["mobiles"] >= 1 for r in reports), reports
    assert all(r["packets_up"] > 0 and r["packets_down"] > 0 for r in reports), reports
    assert sum(r["handoffs_out"] for r in reports) == sum(r["handoffs_in"] for r in reports) > 0
    sequences = _esp_sequences(capture, bytes(map(int, gw.outside.split("."))))
    assert len(sequences) >= MOBILES
    for spi, seqs in sequences.items():
        assert all(a < b for a, b in zip(seqs, seqs[1:], strict=False)), f"SPI 0x{spi:08x}: {seqs[:20]}"
    if sa_source == "ikev2":
        assert any(e.kind == "gw-sas-rekeyed" for e in gw.control.timeline)
        assert gw.messages["AddInbound"] > 0 and gw.messages["SetOutbound"] > 0
    assert gw.messages["SendInner"] >= 2 * MOBILES        # each RRP after an SIU
    for i in range(MOBILES):
        receiver = topo.mobiles[(i + 1) % MOBILES].application
        rep = receiver.report(topo.mobiles[i].application.sent, since=1.3, until=4.0)
        assert rep.lost == 0 and rep.duplicates == 0 and rep.received > 1000, (i, rep)
    for r in reports:
        assert not r["control_errors"], r
    if sa_source == "ikev2":       # the re-keyed inbound SAs leave their worker after the grace
        topo.sim.run(until=4.3 + CHILD_SA_DELETE_GRACE_S)
        assert gw.messages["RemoveInbound"] > 0
        _check_one_worker_per_sa(gw)
        assert sum(len(w.sad) for w in gw.workers) == len(gw.control.sad)


def test_the_rrp_after_an_siu_leaves_through_the_repointed_sa():
    """The HA's reply is encrypted by the worker after the control's re-point reached it."""
    topo = _topo(2, sa_source="manual")
    gw: ShardedGateway = topo.gw.role
    capture = topo.outside.start_capture()
    topo.move("a", index=0)
    assert wait_registered(topo, 3.0, index=0)
    topo.move("b", index=0)
    assert wait_registered(topo, 3.0, index=0)
    b = topo.care_of["b"][0]
    home = topo.mobiles[0].role.home_address
    m = gw.control.mobiles[home]
    w = gw.workers[worker_of(m.inbound.spi, 2)]
    assert w.mobiles[home].outbound.remote == b and w.mobiles[home].care_of == b
    to_b = [p for _t, _s, p in capture if p[16:20] == bytes(map(int, b.split("."))) and
            p[12:16] == bytes(map(int, gw.outside.split(".")))]
    assert to_b, "the RRP went to the new care-of address"
    assert m.outbound.sequence == 0        # the control's SA is a specification, never used
