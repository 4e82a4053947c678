"""A GW pool in the in-memory network: several MNs spread over two GWs, each with an ordered list.

Checks that the HA sends every SIU to the GW that holds the MN's SAs (it learns the GW from the
path of the Registration Request), that the downlink follows the GW, and that when one GW is
gone its MNs re-establish with the next GW in their list and register through it while the
other GW's MNs go on untouched.  The first GW comes back only by the deliberate rule: a new
start (the MN leaves home again).
"""

import pytest

from mipsec.errors import ConfigError
from mipsec.mip.constants import SIU_PORT
from mipsec.node.config import make_lab_configs
from mipsec.node.correspondent import Correspondent
from mipsec.node.mobile_node import RegState
from mipsec.sim.hosts import CorrespondentHost
from mipsec.sim.scenario import wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.siu import SiuType, parse_siu

N_MOBILES = 4


def _pool(mode="siu", n=N_MOBILES):
    topo = build_topology(n, sa_source="ikev2", n_gateways=2, seed=3, internet_delay_s=0.005,
                          handover_mode=mode)
    for i in range(n):
        topo.move("a", i)
    assert wait_registered(topo, 10.0)
    return topo


def _inside(topo, k):
    return topo.gateways[k - 1].role.config.inside_address


def _first_gw(i):
    return 1 + i % 2            # make_lab_configs spreads MN i over GW (i mod 2) + 1


def _siu_targets(capture):
    """(time, SIU type, home address, destination) of every SIU the HA sent on the home link."""
    out = []
    for t, sender, packet in capture:
        ihl = (packet[0] & 0x0F) * 4
        if sender == "ha" and packet[9] == 17 and \
                int.from_bytes(packet[ihl + 2:ihl + 4], "big") == SIU_PORT:
            siu = parse_siu(packet[ihl + 8:])
            if siu.type != SiuType.ACK:
                out.append((t, siu.type, siu.home_address, ".".join(map(str, packet[16:20]))))
    return out


def _downlink_after(topo, i, since):
    return sum(1 for a in topo.mobiles[i].app.arrivals if a[3] >= since)


def _streams(topo, start, stop, interval_s=0.02):
    """A downlink to every MN, each from its own correspondent on the home link (one stream per
    sender), and every MN's uplink to the CN."""
    for i, m in enumerate(topo.mobiles):
        address = f"10.1.0.{50 + i}"
        cn = CorrespondentHost(topo.sim, f"cn{i}", Correspondent(f"cn{i}", address))
        cn.add_interface("home", address, topo.home)
        cn.app.start_stream(m.role.home_address, interval_s=interval_s, start=start, stop=stop,
                            size=64)
        cn.driver.rearm()
        m.app.start_stream(topo.cn.app.address, interval_s=interval_s, start=start, stop=stop,
                           size=64)
        m.app_driver.rearm()


def test_lab_configs_spread_mobiles_over_the_pool():
    c = make_lab_configs(4, sa_source="ikev2", n_gateways=2)
    outs = [g.outside_address for g in c.gateways]
    assert [m.gateway for m in c.mobiles] == [outs[0], outs[1], outs[0], outs[1]]
    assert all(sorted(m.gateways) == sorted(outs) for m in c.mobiles)
    assert [m.gateway for m in c.home_agent.mobiles] == [
        c.gateways[i % 2].inside_address for i in range(4)]
    with pytest.raises(ConfigError, match="several GWs need"):
        make_lab_configs(2, n_gateways=2)           # manual keys: one SA pair, one GW


@pytest.mark.parametrize("mode", ["siu", "mobike"])
def test_each_siu_goes_to_the_gw_holding_the_sas(mode):
    topo = _pool(mode)
    capture = topo.home.start_capture()
    for i in range(N_MOBILES):
        topo.move("b", i)
    assert wait_registered(topo, 10.0)
    ha = topo.ha.role
    for i, m in enumerate(topo.mobiles):
        home = m.role.home_address
        k = _first_gw(i)
        assert ha._mobiles[home].gateway == _inside(topo, k)
        gw = topo.gateways[k - 1].role
        assert gw.mobiles[home].care_of == topo.care_of["b"][i]
        other = topo.gateways[2 - k].role
        assert home not in other.mobiles or other.mobiles[home].care_of is None
    targets = _siu_targets(capture)
    assert len({h for _t, _ty, h, _d in targets}) == N_MOBILES
    for _t, _ty, home, dst in targets:
        i = [m.role.home_address for m in topo.mobiles].index(home)
        assert dst == _inside(topo, _first_gw(i)), (home, dst)


@pytest.mark.parametrize("mode", ["siu", "mobike"])
def test_killed_gw_its_mobiles_move_to_the_next_the_others_are_untouched(mode):
    topo = _pool(mode)
    sim = topo.sim
    _streams(topo, start=sim.now + 0.1, stop=sim.now + 60.0)
    sim.run(until=sim.now + 1.0)
    assert all(_downlink_after(topo, i, 0.0) > 0 for i in range(N_MOBILES))
    marks = [len(m.role.timeline) for m in topo.mobiles]
    spis = [m.role.outbound.spi for m in topo.mobiles]
    killed_at = sim.now
    topo.kill_gateway(1)
    ha = topo.ha.role
    on_gw1 = [i for i in range(N_MOBILES) if _first_gw(i) == 1]
    on_gw2 = [i for i in range(N_MOBILES) if _first_gw(i) == 2]

    def recovered():
        return all(topo.mobiles[i].role.gateway == topo.gateways[1].role.config.outside_address
                   and topo.mobiles[i].role.state is RegState.REGISTERED
                   and ha._mobiles[topo.mobiles[i].role.home_address].gateway == _inside(topo, 2)
                   for i in on_gw1)

    assert sim.run_until(recovered, 60.0), [
        (m.role.gateway, m.role.state, m.role.waiting_for()) for m in topo.mobiles]
    back_at = sim.now
    sim.run(until=sim.now + 2.0)
    for i in on_gw1:
        m = topo.mobiles[i].role
        kinds = [e.kind for e in m.timeline[marks[i]:]]
        assert "gateway-changed" in kinds and "rrp-received" in kinds
        assert _downlink_after(topo, i, back_at) > 0           # downlink through GW 2 again
        home = m.home_address
        assert topo.gateways[1].role.mobiles[home].care_of == topo.care_of["a"][i]
    for i in on_gw2:
        m = topo.mobiles[i].role
        kinds = [e.kind for e in m.timeline[marks[i]:]]
        assert "gateway-changed" not in kinds and "reestablish-requested" not in kinds
        assert "ike-initiated" not in kinds
        assert m.outbound.spi == spis[i] and m.state is RegState.REGISTERED
        # never interrupted: downlink arrived all along the failover of the others
        arrivals = [a[3] for a in topo.mobiles[i].app.arrivals if killed_at <= a[3] <= back_at]
        gaps = [b - a for a, b in zip([killed_at, *arrivals], [*arrivals, back_at], strict=True)]
        assert max(gaps) < 0.5, max(gaps)
    assert ha.counters["gateway-changed"] == len(on_gw1)


def test_back_to_the_first_gw_only_after_a_new_start():
    topo = _pool(n=1)
    sim = topo.sim
    mn = topo.mn.role
    first, second = mn.gateways
    topo.kill_gateway(1)
    _streams(topo, start=sim.now + 0.05, stop=sim.now + 40.0)
    assert sim.run_until(lambda: mn.gateway == second and mn.state is RegState.REGISTERED, 40.0)
    # GW 1 comes back: the MN stays with GW 2 while GW 2 answers
    for iface in topo.gw.interfaces.values():
        iface.bring_up()
    topo.gw.driver.stopped = False
    sim.run(until=sim.now + 10.0)
    assert mn.gateway == second and mn.state is RegState.REGISTERED
    # home, then away again: a new start, with the first GW of the list
    topo.move("home")
    assert wait_registered(topo, 10.0) and mn.state is RegState.AT_HOME
    assert mn.gateway == first
    topo.move("b")
    assert wait_registered(topo, 10.0)
    assert mn.gateway == first
    assert topo.ha.role._mobiles[mn.home_address].gateway == _inside(topo, 1)


def test_config_file_takes_an_ordered_gw_list_and_the_old_single_key():
    import tomllib

    from mipsec.config import config_from_dict, dump_config, make_key_set
    sets = make_key_set(2, sa_source="ikev2", n_gateways=2)
    assert sorted(sets) == ["gw", "gw2", "ha", "mn1", "mn2"]
    data = tomllib.loads(dump_config(sets["mn2"]))
    assert data["mobile_node"]["gateways"] == ["172.16.0.2", "172.16.0.1"]
    del data["mobile_node"]["gateway"]                       # the list alone is enough
    node = config_from_dict(data, "mn2.toml").node
    assert node.gateway == "172.16.0.2" and node.gateway_list == ("172.16.0.2", "172.16.0.1")
    single = tomllib.loads(dump_config(make_key_set(1, sa_source="ikev2")["mn"]))
    assert "gateways" not in single["mobile_node"] or single["mobile_node"]["gateways"] == []
    assert config_from_dict(single, "mn.toml").node.gateway_list == ("172.16.0.1",)
    data["mobile_node"]["gateway"] = "172.16.0.1"            # not the first of the list
    with pytest.raises(ConfigError, match=r"mn2.toml.*gateways: the first entry"):
        config_from_dict(data, "mn2.toml")
    manual = tomllib.loads(dump_config(make_key_set(1)["mn"]))
    manual["mobile_node"]["gateways"] = ["172.16.0.1", "172.16.0.2"]
    with pytest.raises(ConfigError, match="several GWs need IKEv2"):
        config_from_dict(manual, "mn.toml")
