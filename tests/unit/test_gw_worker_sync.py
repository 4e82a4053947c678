"""WorkerSync, the control side of a GW with workers: the first comparison installs every MN in
the worker its inbound SPI selects and tells everyone the owner; an unchanged role gives no
message; a re-point gives exactly that MN's Bind; a removed MN is removed where it was."""

from __future__ import annotations

import random

from mipsec.mobility.gw_binding import BindingState
from mipsec.node import gw_worker_messages as wm
from mipsec.node.config import make_lab_configs
from mipsec.node.gateway_worker import ControlGateway, WorkerSync


def _setup(mobiles: int = 6, workers: int = 2):
    cfg = make_lab_configs(mobiles, random.Random(3)).gateway
    return ControlGateway(cfg), WorkerSync(workers)


def test_first_comparison_installs_each_mn_in_its_worker():
    role, sync = _setup()
    msgs = sync.messages(role)
    installs = [(w, m) for w, m in msgs if isinstance(m, wm.InstallPair)]
    assert len(installs) == len(role.mobiles)
    for w, m in installs:
        assert w == m.inbound.spi % 2 and m.outbound.spi == role.mobiles[m.home_address].outbound.spi
    owners = [m for w, m in msgs if isinstance(m, wm.Owner)]
    assert all(w is None for w, m in msgs if isinstance(m, wm.Owner))
    assert {o.home_address: o.worker for o in owners} == {
        h: mob.inbound.spi % 2 for h, mob in role.mobiles.items()}
    assert sync.messages(role) == []                # nothing changed: nothing to say


def test_a_repoint_is_one_bind_and_a_removal_is_one_remove():
    role, sync = _setup()
    sync.messages(role)
    home, mobile = next(iter(role.mobiles.items()))
    mobile.outbound.rebind(remote="172.16.2.10")
    mobile.care_of, mobile.state = "172.16.2.10", BindingState.BOUND
    msgs = sync.messages(role)
    assert msgs == [(mobile.inbound.spi % 2, wm.Bind(home, "bound", "172.16.2.10",
                                                     "172.16.2.10", None))]
    role.remove_mobile(home)
    msgs = sync.messages(role)
    assert msgs == [(mobile.inbound.spi % 2, wm.RemoveMobile(home)), (None, wm.Owner(home, -1))]
    assert sync.worker_of_mobile(home) is None and sync.messages(role) == []


def test_ike_spis_of_one_peer_stay_in_its_worker_and_peers_spread():
    _role, sync = _setup(workers=3)
    first = {peer: sync.esp_spi(1000 + i, peer) % 3 for i, peer in enumerate("abcdef")}
    assert sorted(first.values()) == [0, 0, 1, 1, 2, 2]     # the least loaded worker each time
    for peer, worker in first.items():
        assert all(sync.esp_spi(c, peer) % 3 == worker for c in (256, 77777, 0xFFFFFFFF))
