"""Role configs: a consistent lab set, and errors that name the field."""

import random

import pytest

from mipsec.errors import ConfigError
from mipsec.node import config as C


def test_lab_set_is_consistent():
    lab = C.make_lab_configs(3, keys_from=random.Random(1))
    assert [m.home_address for m in lab.mobiles] == ["10.1.0.100", "10.1.0.101", "10.1.0.102"]
    gw_by_home = {m.home_address: m for m in lab.gateway.mobiles}
    ha_by_home = {m.home_address: m for m in lab.home_agent.mobiles}
    for mn in lab.mobiles:
        g, h = gw_by_home[mn.home_address], ha_by_home[mn.home_address]
        assert g.esp_in == mn.esp_out and g.esp_out == mn.esp_in
        assert h.msa == mn.msa and h.gateway_spi == g.esp_out.spi
        assert mn.gateway == lab.gateway.outside_address and mn.home_agent == lab.home_agent.address
    assert lab.gateway.home_agents[0].key == lab.home_agent.gateways[0].key
    # distinct keys for distinct MNs
    assert len({m.esp_out.encryption_key for m in lab.mobiles}) == 3


def test_reproducible_with_seeded_random_and_fresh_otherwise():
    a = C.make_lab_configs(2, keys_from=random.Random(7))
    b = C.make_lab_configs(2, keys_from=random.Random(7))
    assert a == b
    assert C.make_lab_configs(2) != C.make_lab_configs(2)


def test_large_sets_use_a_larger_home_prefix():
    lab = C.make_lab_configs(400, keys_from=random.Random(0))
    assert lab.home_agent.home_prefix == "10.1.0.0/16"
    assert lab.mobiles[-1].home_address == "10.1.1.243"


def test_cbc_set_gets_an_integrity_key():
    lab = C.make_lab_configs(1, keys_from=random.Random(0), encryption="ENCR_AES_CBC")
    assert lab.mobiles[0].esp_out.integrity == "AUTH_HMAC_SHA2_256_128"
    assert len(lab.mobiles[0].esp_out.integrity_key) == 32


@pytest.mark.parametrize("kwargs, words", [
    (dict(spi=1000, encryption="ENCR_AES_GCM_16", encryption_key=b"k" * 16), "esp.encryption_key"),
    (dict(spi=1000, encryption="ENCR_FOO", encryption_key=b"k" * 16), "unknown transform"),
    (dict(spi=5, encryption="ENCR_AES_GCM_16", encryption_key=b"k" * 20), "esp.spi"),
    (dict(spi=1000, encryption="ENCR_AES_CBC", encryption_key=b"k" * 16), "esp.integrity"),
])
def test_esp_errors_name_the_field(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        C.EspSaConfig(**kwargs)


def test_mn_errors_name_the_field():
    lab = C.make_lab_configs(1, keys_from=random.Random(0))
    mn = lab.mobiles[0]
    import dataclasses
    with pytest.raises(ConfigError, match="home_address"):
        dataclasses.replace(mn, home_address="192.168.1.1")
    with pytest.raises(ConfigError, match="home_prefix"):
        dataclasses.replace(mn, home_prefix="10.1.0.1/24")
    with pytest.raises(ConfigError, match="msa.spi"):
        C.MobilitySecurityAssociationConfig(spi=3, key=b"k" * 16)
    with pytest.raises(ConfigError, match="not a configured HA"):
        dataclasses.replace(lab.gateway, home_agents=())
