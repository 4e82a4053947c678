"""A road warrior at the GW: a plain IPsec client (no Mobile IPv4, e.g. strongSwan's charon)
whose IKEv2 child SA the GW installs for ``[[gateway.mobiles]] road_warrior = true``.

The uplink is the client's inner packets (source = its address) to the allowed destinations;
the downlink is the home side's plain packets for its address (no HA, no IP-in-IP), which an
ordinary MN's entry never takes (NO_POLICY: its downlink comes from its HA only).
"""

from __future__ import annotations

import pytest

from mipsec.config import config_from_dict
from mipsec.drops import DropReason
from mipsec.errors import ConfigError
from mipsec.ike.config import IkeConfig
from mipsec.ike.endpoint import IkeEndpoint
from mipsec.ike.events import ChildSaEstablished, SendDatagram
from mipsec.node.actions import SendToNet, WriteToTun
from mipsec.node.config import (
    GatewayConfig,
    GatewayHomeAgent,
    GatewayMobile,
    IkeSettings,
)
from mipsec.node.gateway import VpnGateway
from mipsec.node.packet import a2b, b2a, build_udp_packet
from mipsec.node.reload import reconfigure

GW, INSIDE, RW = "172.16.0.1", "10.1.0.1", "172.16.9.9"
RW_INNER, HOST, MN_HOME, HA = "10.50.0.7", "10.1.0.20", "10.1.0.100", "10.1.0.2"
PSK = b"road warrior shared key"


def _gw_config(*, road_warrior: bool = True) -> GatewayConfig:
    rw = GatewayMobile(home_address=RW_INNER, home_agent="" if road_warrior else HA,
                       esp_in=None, esp_out=None, allowed_destinations=("10.1.0.0/24",),
                       ike_id="rw@example", psk=PSK, road_warrior=road_warrior)
    mn = GatewayMobile(home_address=MN_HOME, home_agent=HA, esp_in=None, esp_out=None,
                       allowed_destinations=("10.1.0.0/24",), ike_id="mn@example", psk=b"m" * 16)
    return GatewayConfig(name="gw", outside_address=GW, inside_address=INSIDE,
                         mobiles=(rw, mn), home_agents=(GatewayHomeAgent(HA, 1, b"k" * 16),),
                         ike=IkeSettings(local_id="gw.example", force_encap=True))


def _icmp(src: str, dst: str) -> bytes:
    from mipsec.wire.ipv4 import Ipv4Header, build_ipv4
    return build_ipv4(Ipv4Header(source=src, destination=dst, protocol=1),
                      b"\x08\x00\xf7\xff\x00\x00\x00\x00")


class Pair:
    """The client's IkeEndpoint and the GW role, pumped through whole IPv4 + UDP packets."""

    def __init__(self, gw: VpnGateway):
        self.gw = gw
        self.ep = IkeEndpoint(IkeConfig.from_dict({
            "local_id": "rw@example", "remote_id": "gw.example",
            "psks": {"gw.example": PSK.decode()}, "local_ts": [RW_INNER + "/32"],
            "remote_ts": ["10.1.0.0/24"], "force_encap": True}))
        self.children = []

    def pump(self, outputs, now: float) -> list:
        left = []
        while outputs:
            out = outputs.pop(0)
            if isinstance(out, SendDatagram):
                pkt = build_udp_packet(a2b(out.local[0]), a2b(out.remote[0]), out.local[1],
                                       out.remote[1], out.data)
                for act in self.gw.receive_from_net(pkt, now):
                    if isinstance(act, SendToNet) and act.packet[9] == 17:
                        p = act.packet
                        ihl = (p[0] & 0x0F) * 4
                        outputs += self.ep.receive_datagram(
                            p[ihl + 8:], local=(b2a(p[16:20]), int.from_bytes(p[ihl + 2:ihl + 4], "big")),
                            remote=(b2a(p[12:16]), int.from_bytes(p[ihl:ihl + 2], "big")), now=now)
            elif isinstance(out, ChildSaEstablished):
                self.children.append(out.child)
            else:
                left.append(out)
        return left


def _established(gw: VpnGateway) -> Pair:
    pair = Pair(gw)
    pair.pump(pair.ep.initiate(local=(RW, 500), remote=(GW, 500), now=0.0), 0.0)
    assert len(pair.children) == 1
    return pair


def test_road_warrior_traffic_both_ways_through_its_sa():
    gw = VpnGateway(_gw_config(), now=0.0)
    pair = _established(gw)
    inbound, outbound = pair.children[0].make_sas(now=0.0)
    mobile = gw.mobiles[RW_INNER]
    assert mobile.road_warrior and mobile.care_of == RW       # bound to where IKE came from
    assert gw.status()["mobiles"][RW_INNER]["road_warrior"] is True
    # uplink: the client's inner packet to a home-side host reaches the TUN unchanged
    up = _icmp(RW_INNER, HOST)
    assert gw.receive_from_net(outbound.encapsulate(up, 1.0), 1.0) == [WriteToTun(up)]
    # downlink: the host's plain reply goes through the client's SA (no IP-in-IP, no HA)
    down = _icmp(HOST, RW_INNER)
    (send,) = gw.receive_from_tun(down, 1.0)
    assert isinstance(send, SendToNet) and send.packet[16:20] == a2b(RW)
    assert inbound.decapsulate(send.packet, 1.0) == down
    (again,) = gw.tun_fast_path(down, 1.0)           # the event loop's path: the same
    assert inbound.decapsulate(again.packet, 1.0) == down
    assert not gw.drops, gw.drops


def test_plain_packet_for_an_ordinary_mobile_node_is_refused():
    gw = VpnGateway(_gw_config(road_warrior=False), now=0.0)
    pair = _established(gw)
    assert not gw.mobiles[RW_INNER].road_warrior
    assert "road_warrior" not in gw.status()["mobiles"][RW_INNER]
    # the same entry without road_warrior: its downlink is the HA's IP-in-IP only
    assert gw.receive_from_tun(_icmp(HOST, RW_INNER), 1.0) == []
    assert gw.drops[DropReason.NO_POLICY] == 1
    assert pair.children


def test_road_warrior_config_from_toml_and_its_errors():
    base = {"role": "gw", "daemon": {"inside_interface": "eth1", "sa_source": "ikev2"},
            "gateway": {"name": "gw", "outside_address": GW, "inside_address": INSIDE,
                        "ike": {"local_id": "gw.example"},
                        "mobiles": [{"home_address": RW_INNER, "home_agent": "",
                                     "allowed_destinations": ["10.1.0.0/24"],
                                     "ike_id": "rw@example", "psk": PSK.hex(),
                                     "road_warrior": True}]}}
    cfg = config_from_dict(base, "gw.toml")
    assert cfg.node.mobiles[0].road_warrior and cfg.node.home_agents == ()
    base["gateway"]["mobiles"][0]["home_agent"] = HA
    with pytest.raises(ConfigError, match=r"gw.toml: \[gateway.mobiles\[0\]\] mobile "
                                          r"10.50.0.7: a road warrior has no home agent"):
        config_from_dict(base, "gw.toml")
    base["gateway"]["mobiles"][0]["road_warrior"] = False
    with pytest.raises(ConfigError, match="is not a configured HA"):
        config_from_dict(base, "gw.toml")


def test_reload_turning_an_entry_into_a_road_warrior_reinstalls_it():
    gw = VpnGateway(_gw_config(road_warrior=False), now=0.0)
    _established(gw)
    _actions, changes = reconfigure(gw, _gw_config(road_warrior=True), 1.0)
    assert changes == [f"mobile {RW_INNER} changed"] and RW_INNER not in gw.mobiles
    pair = _established(gw)                  # the next child SA installs it as a road warrior
    assert gw.mobiles[RW_INNER].road_warrior and pair.children
