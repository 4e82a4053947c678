"""`mipsec check FILE...`: a matching set agrees; every kind of mismatch between the files is
named with both files and both keys, and keys are never printed."""

from __future__ import annotations

import dataclasses
import random

import pytest

from mipsec import cli
from mipsec.check import check_files
from mipsec.config import KeySetLayout, make_key_set, write_config
from mipsec.lab.lab import lab_key_kwargs


def write(tmp_path, sets):
    paths = {}
    for name, cfg in sets.items():
        path = str(tmp_path / f"{name}.toml")
        write_config(cfg, path)
        paths[name] = path
    return paths


def key_set(n=2, sa_source="manual"):
    kw = lab_key_kwargs("ENCR_AES_GCM_16" if sa_source == "ikev2" else "ENCR_AES_CBC", False,
                        sa_source, "siu")
    return make_key_set(n, KeySetLayout(), keys_from=random.Random(4), **kw)


def node(cfg, **changes):
    return dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, **changes))


def flip(key: bytes) -> bytes:
    return bytes([key[0] ^ 0x80]) + key[1:]


def mobiles(cfg, index, **changes):
    ms = list(cfg.node.mobiles)
    ms[index] = dataclasses.replace(ms[index], **changes)
    return node(cfg, mobiles=tuple(ms))


@pytest.mark.parametrize("sa_source", ["manual", "ikev2"])
def test_a_generated_set_agrees(tmp_path, sa_source, capsys):
    paths = write(tmp_path, key_set(2, sa_source))
    assert check_files(paths.values())[1] == []
    assert cli.main(["check", *paths.values()]) == 0
    assert "4 file(s) agree" in capsys.readouterr().out


CASES = {
    # name: (sa_source, file to spoil, change, expected fragments of the one message)
    "msa key": ("manual", "mn1", lambda c: node(c, msa=dataclasses.replace(
        c.node.msa, key=flip(c.node.msa.key))),
        ["mn1.toml [mobile_node.msa] key and ", "ha.toml [[home_agent.mobiles]][0] msa.key differ"]),
    "msa spi": ("manual", "ha", lambda c: mobiles(c, 1, msa=dataclasses.replace(
        c.node.mobiles[1].msa, spi=4242)),
        ["mn2.toml [mobile_node.msa] spi = ", "ha.toml [[home_agent.mobiles]][1] msa.spi = 4242"]),
    "esp key": ("manual", "gw", lambda c: mobiles(c, 0, esp_in=dataclasses.replace(
        c.node.mobiles[0].esp_in, encryption_key=flip(c.node.mobiles[0].esp_in.encryption_key))),
        ["mn1.toml [mobile_node.esp_out] encryption_key and ",
         "gw.toml [[gateway.mobiles]][0] esp_in.encryption_key differ"]),
    "esp spi": ("manual", "mn2", lambda c: node(c, esp_in=dataclasses.replace(
        c.node.esp_in, spi=0x7777)),
        ["mn2.toml [mobile_node.esp_in] spi = 30583 but ",
         "gw.toml [[gateway.mobiles]][1] esp_out.spi = "]),
    "gateway spi at the ha": ("manual", "ha", lambda c: mobiles(c, 0, gateway_spi=0x9999),
        ["ha.toml [[home_agent.mobiles]][0] gateway_spi = 39321 but ",
         "gw.toml [[gateway.mobiles]] (10.1.0.100) esp_out.spi"]),
    "siu key": ("manual", "ha", lambda c: node(c, gateways=tuple(
        dataclasses.replace(g, key=flip(g.key)) for g in c.node.gateways)),
        ["gw.toml [[gateway.home_agents]][0] key and ", "ha.toml [[home_agent.gateways]][0] key differ"]),
    "psk": ("ikev2", "mn1", lambda c: node(c, ike=dataclasses.replace(
        c.node.ike, psk=flip(c.node.ike.psk))),
        ["mn1.toml [mobile_node.ike] psk and ", "gw.toml [[gateway.mobiles]][0] psk differ"]),
    "ike identity": ("ikev2", "mn2", lambda c: node(c, ike=dataclasses.replace(
        c.node.ike, local_id="someone@else")),
        ["mn2.toml [mobile_node.ike] local_id = 'someone@else' but ",
         "gw.toml [[gateway.mobiles]][1] ike_id = "]),
    "gw identity": ("ikev2", "mn1", lambda c: node(c, ike=dataclasses.replace(
        c.node.ike, remote_id="gw.elsewhere")),
        ["mn1.toml [mobile_node.ike] remote_id = 'gw.elsewhere' but ",
         "gw.toml [gateway.ike] local_id = "]),
    "gw address at the mn": ("manual", "mn1", lambda c: node(c, gateway="172.16.0.9"),
        ["mn1.toml [mobile_node] gateway = '172.16.0.9' but ", "gw.toml [gateway] outside_address"]),
    "ha address at the mn": ("manual", "mn2", lambda c: node(c, home_agent="10.1.0.9"),
        ["mn2.toml [mobile_node] home_agent = '10.1.0.9' but ", "ha.toml [home_agent] address"]),
    "home prefix": ("manual", "mn1", lambda c: node(c, home_prefix="10.1.0.0/16"),
        ["mn1.toml [mobile_node] home_prefix = '10.1.0.0/16' but ",
         "ha.toml [home_agent] home_prefix"]),
    "gw inside address at the ha": ("manual", "ha", lambda c: node(
        c, gateways=tuple(dataclasses.replace(g, address="10.1.0.77") for g in c.node.gateways),
        mobiles=tuple(dataclasses.replace(m, gateway="10.1.0.77") for m in c.node.mobiles)),
        ["ha.toml [[home_agent.mobiles]][0] gateway = '10.1.0.77' but ",
         "gw.toml [gateway] inside_address", "ha.toml [[home_agent.gateways]]: no entry for the "
         "GW 10.1.0.1"]),
    "sa source": ("ikev2", "mn1", lambda c: dataclasses.replace(c, daemon=dataclasses.replace(
        c.daemon, sa_source="manual")), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_mismatch_is_named_with_both_files_and_keys(tmp_path, case, capsys):
    sa_source, name, change, fragments = CASES[case]
    sets = key_set(2, sa_source)
    if case == "sa source":
        # a manual MN needs ESP keys of its own: take them from a manual set
        manual = key_set(2, "manual")["mn1"]
        sets["mn1"] = dataclasses.replace(manual, node=dataclasses.replace(
            manual.node, msa=sets["mn1"].node.msa))
        fragments = ["mn1.toml [daemon] sa_source = 'manual' but ",
                     "gw.toml [daemon] sa_source = 'ikev2'"]
    else:
        sets[name] = change(sets[name])
    paths = write(tmp_path, sets)
    _, problems = check_files(paths.values())
    assert len(problems) >= 1, problems
    text = "\n".join(problems)
    for fragment in fragments:
        assert fragment in text, problems
    assert cli.main(["check", *paths.values()]) == 2
    err = capsys.readouterr().err
    assert fragments[0] in err
    for cfg in sets.values():                         # keys are never printed
        for secret in _secrets(cfg.node):
            assert secret.hex() not in err


def _secrets(node):
    out = []
    for value in vars(node).values() if hasattr(node, "__dict__") else ():
        out += _secret_values(value)
    return out


def _secret_values(value):
    if isinstance(value, bytes) and len(value) >= 8:
        return [value]
    if dataclasses.is_dataclass(value):
        return [s for f in dataclasses.fields(value) for s in _secret_values(getattr(value, f.name))]
    if isinstance(value, tuple):
        return [s for v in value for s in _secret_values(v)]
    return []


def test_one_gw_and_one_ha_per_mn(tmp_path):
    sets = key_set(1)
    sets["gw2"] = dataclasses.replace(sets["gw"])
    sets["ha"] = node(sets["ha"], mobiles=())
    paths = write(tmp_path, sets)
    _, problems = check_files(paths.values())
    text = "\n".join(problems)
    assert "mn.toml [mobile_node] home_address 10.1.0.100: more than one GW serves it: " in text
    assert "mn.toml [mobile_node] home_address 10.1.0.100: no HA file of the set lists it" in text
    assert "gw.toml [[gateway.mobiles]][0] home_address 10.1.0.100: no HA file" in text


def test_a_file_that_does_not_load_is_reported_and_the_rest_still_checked(tmp_path):
    sets = key_set(1)
    sets["mn"] = node(sets["mn"], gateway="172.16.0.9")
    paths = write(tmp_path, sets)
    broken = tmp_path / "broken.toml"
    broken.write_text("role = 'gw'\n")
    _, problems = check_files([*paths.values(), str(broken)])
    assert any(p.startswith(f"{broken}: missing table [gateway]") for p in problems)
    assert any("[mobile_node] gateway = '172.16.0.9'" in p for p in problems)
