"""TOML configuration: a generated set round-trips; each bad case gives one clear message that
names the file, the key and the problem."""

from __future__ import annotations

import os
import random
import tomllib

import pytest

from mipsec import config as mconfig
from mipsec.config import (
    DaemonConfig,
    check_runtime,
    config_from_dict,
    dump_config,
    load_config,
    make_key_set,
    write_key_set,
)
from mipsec.errors import ConfigError


@pytest.fixture
def key_set(tmp_path):
    return write_key_set(tmp_path, 2, keys_from=random.Random(7))


def _data(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


def _write(tmp_path, data_text, name="bad.toml"):
    path = tmp_path / name
    path.write_text(data_text)
    return str(path)


def test_generated_set_loads_back_to_the_same_dataclasses(tmp_path):
    sets = make_key_set(2, keys_from=random.Random(1))
    for name, cfg in sets.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(dump_config(cfg))
        loaded = load_config(path)
        assert loaded.role == cfg.role
        assert loaded.node == cfg.node
        assert loaded.daemon == cfg.daemon


def test_generated_files_match_each_other(key_set):
    ha, gw = load_config(key_set["ha"]), load_config(key_set["gw"])
    mn1, mn2 = load_config(key_set["mn1"]), load_config(key_set["mn2"])
    assert {m.home_address for m in gw.node.mobiles} == {mn1.node.home_address, mn2.node.home_address}
    gm = {m.home_address: m for m in gw.node.mobiles}[mn1.node.home_address]
    assert gm.esp_in == mn1.node.esp_out and gm.esp_out == mn1.node.esp_in
    hm = {m.home_address: m for m in ha.node.mobiles}[mn2.node.home_address]
    assert hm.msa == mn2.node.msa
    assert ha.node.gateways[0].key == gw.node.home_agents[0].key
    assert mn1.node.esp_in.encryption_key != mn2.node.esp_in.encryption_key
    assert oct(os.stat(key_set["gw"]).st_mode & 0o777) == "0o600"


def _mutate(src_path, tmp_path, fn, name="bad.toml"):
    text = open(src_path).read()
    return _write(tmp_path, fn(text), name)


def _message(path) -> str:
    with pytest.raises(ConfigError) as info:
        cfg = load_config(path)
        check_runtime(cfg)
    return str(info.value)


def test_missing_key_names_file_table_and_key(key_set, tmp_path):
    path = _mutate(key_set["mn1"], tmp_path,
                   lambda t: "\n".join(ln for ln in t.splitlines() if not ln.startswith("home_agent =")))
    msg = _message(path)
    assert path in msg and "[mobile_node] home_agent" in msg and "missing key" in msg


def test_wrong_key_length_for_the_transform(key_set, tmp_path):
    data = open(key_set["mn1"]).read()
    old = [ln for ln in data.splitlines() if ln.startswith("encryption_key")][0]
    # (manual keys are AES-CBC: 16, 24 or 32 bytes)
    path = _write(tmp_path, data.replace(old, 'encryption_key = "00112233445566778899aabb"', 1))
    msg = _message(path)
    assert path in msg and "[mobile_node.esp_in]" in msg and "encryption_key" in msg
    assert "ENCR_AES_CBC" in msg and "got 12" in msg


def test_unknown_transform(key_set, tmp_path):
    path = _mutate(key_set["gw"], tmp_path,
                   lambda t: t.replace('encryption = "ENCR_AES_CBC"', 'encryption = "ENCR_3DES"', 1))
    msg = _message(path)
    assert path in msg and "[gateway.mobiles[0].esp_in]" in msg
    assert "unknown transform 'ENCR_3DES'" in msg


def test_interface_that_does_not_exist(key_set, tmp_path):
    path = _mutate(key_set["mn1"], tmp_path,
                   lambda t: t.replace('interfaces = ["va0", "vb0"]', 'interfaces = ["nosuch9"]'))
    msg = _message(path)
    assert path in msg and "[daemon] interfaces" in msg and "'nosuch9' does not exist" in msg


@pytest.mark.parametrize("edit, expect", [
    (lambda t: t.replace('role = "mn"', 'role = "router"'), "unknown role 'router'"),
    (lambda t: t.replace('role = "mn"\n', ''), "missing key 'role'"),
    (lambda t: "colour = 1\n" + t, "unknown key 'colour' at top level"),
    (lambda t: t + "\ncolour = 1\n", "[mobile_node.esp_out] colour: unknown key"),
    (lambda t: t.replace("[mobile_node]\n", "[mobile_node]\nhomeaddress = \"1.2.3.4\"\n"),
     "[mobile_node] homeaddress: unknown key"),
    (lambda t: t.replace("lifetime_s = 600", 'lifetime_s = "long"'),
     "[mobile_node] lifetime_s: must be an integer, got a string"),
    (lambda t: t.replace('algorithm = "hmac-md5"', 'algorithm = "hmac-md4"'),
     "[mobile_node.msa] msa.algorithm"),
    (lambda t: t.replace('home_address = "10.1.0.100"', 'home_address = "10.1.0.999"'),
     "not an IPv4 address"),
    (lambda t: t.replace('sa_source = "manual"', 'sa_source = "psk"'), "unknown SA source 'psk'"),
    (lambda t: t.replace("mtu = 1400", "mtu = 100"), "[daemon] mtu"),
    (lambda t: t.replace("[mobile_node]", "[mobile_node"), "not valid TOML"),
])
def test_each_bad_case_gives_one_named_message(key_set, tmp_path, edit, expect):
    path = _mutate(key_set["mn1"], tmp_path, edit)
    msg = _message(path)
    assert expect in msg and path in msg
    assert "\n" not in msg


def test_bad_hex_key(key_set, tmp_path):
    data = open(key_set["ha"]).read()
    old = [ln for ln in data.splitlines() if ln.startswith("key = ")][0]
    path = _write(tmp_path, data.replace(old, 'key = "not-hex"', 1))
    msg = _message(path)
    assert "not a hex string" in msg and "[home_agent.gateways[0]] key" in msg


def test_role_specific_daemon_keys(key_set, tmp_path):
    path = _mutate(key_set["gw"], tmp_path, lambda t: t.replace('inside_interface = "in0"',
                                                                'inside_interface = ""'))
    assert "[daemon] inside_interface: missing key" in _message(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/mipsec.toml")


def test_config_from_dict_needs_role_table():
    with pytest.raises(ConfigError, match=r"missing table \[gateway\]"):
        config_from_dict({"role": "gw"}, "x.toml")


def test_keyfile_defaults_next_to_the_capture():
    cfg = make_key_set(1, mconfig.KeySetLayout(pcap_dir="/tmp/x"))["gw"]
    assert isinstance(cfg, DaemonConfig)
    assert cfg.keyfile == "/tmp/x/gw.pcap.esp_sa"
    assert cfg.control_socket == "/run/mipsec/gw.sock"


# --- IKEv2 (sa_source = "ikev2") ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ike_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("ikekeys")
    return mconfig.write_key_set(out, 2, keys_from=random.Random(7), sa_source="ikev2",
                                 handover_mode="mobike",
                                 ike={"esp_proposals": ("aes128-sha256",), "pfs_group": "ecp256"})


def test_ikev2_set_loads_and_matches(ike_set):
    mn, gw, ha = (load_config(ike_set[n]) for n in ("mn2", "gw", "ha"))
    assert mn.daemon.sa_source == gw.daemon.sa_source == "ikev2"
    assert mn.node.esp_in is None and mn.node.ike.remote_id == gw.node.ike.local_id
    (entry,) = [m for m in gw.node.mobiles if m.home_address == mn.node.home_address]
    assert entry.esp_in is None and entry.ike_id == mn.node.ike.local_id
    assert entry.psk == mn.node.ike.psk and len(entry.psk) == 32
    assert mn.node.handover_mode == gw.node.handover_mode == "mobike"
    assert mn.node.ike.esp_proposals == ("aes128-sha256",) and mn.node.ike.pfs_group == "ecp256"
    assert all(m.gateway_spi == 0 for m in ha.node.mobiles)     # learned from the GW's ACKs
    cfg = mn.node.ike.ike_config(psks={"gw": mn.node.ike.psk}, mobike=True,
                                 local_ts=("0.0.0.0/0",), remote_ts=("10.1.0.0/24",))
    assert cfg.pfs_group and cfg.esp_suites[0].integrity_name == "AUTH_HMAC_SHA2_256_128"
    assert "psk" not in repr(mn.node.ike).split("remote_id")[1].split(",")[1]


@pytest.mark.parametrize("name, edit, expect", [
    ("mn1", lambda t: t.replace('sa_source = "ikev2"', 'sa_source = "manual"'),
     "[daemon] sa_source: 'manual' needs esp_in and esp_out; or set sa_source = \"ikev2\""),
    ("mn1", lambda t: t.split("[mobile_node.ike]")[0],
     "[mobile_node] esp_in and esp_out: needed without [ike] (manual keys)"),
    ("mn1", lambda t: t.replace('handover_mode = "mobike"', 'handover_mode = "teleport"'),
     "handover_mode: one of siu, mobike, got 'teleport'"),
    ("mn1", lambda t: t.replace('remote_id = "gw.mipsec.lab"', 'remote_id = ""'),
     "ike.remote_id: the GW's IKE identity must be set on an MN"),
    ("mn1", lambda t: t.replace('pfs_group = "ecp256"', 'pfs_group = "modp1024"'),
     "ike.pfs_group: one of ecp256, x25519, modp2048 or empty, got 'modp1024'"),
    ("mn1", lambda t: t.replace('esp_proposals = ["aes128-sha256"]', 'esp_proposals = ["rot13"]'),
     "[mobile_node.ike]"),
    ("gw", lambda t: t.replace('ike_id = "mn1@mipsec.lab"\n', ''),
     "mobile 10.1.0.100: needs esp_in/esp_out (manual keys) or ike_id and psk (IKEv2)"),
    ("gw", lambda t: t.replace('ike_id = "mn2@mipsec.lab"', 'ike_id = "mn1@mipsec.lab"'),
     "gateway mobiles: duplicate ike_id 'mn1@mipsec.lab'"),
])
def test_ikev2_config_errors_are_named(ike_set, tmp_path, name, edit, expect):
    path = _mutate(ike_set[name], tmp_path, edit)
    msg = _message(path)
    assert expect in msg and path in msg, msg
    assert "\n" not in msg


def test_manual_keys_refuse_mobike(key_set, tmp_path):
    path = _mutate(key_set["mn1"], tmp_path,
                   lambda t: t.replace('handover_mode = "siu"', 'handover_mode = "mobike"'))
    assert "handover_mode 'mobike' needs IKEv2" in _message(path)


def test_ikev2_source_needs_the_ike_table(key_set, tmp_path):
    path = _mutate(key_set["mn1"], tmp_path,
                   lambda t: t.replace('sa_source = "manual"', 'sa_source = "ikev2"'))
    assert ("[daemon] sa_source: 'ikev2' needs a [mobile_node.ike] table (local_id, remote_id, "
            "psk)") in _message(path)
    path = _mutate(key_set["gw"], tmp_path,
                   lambda t: t.replace('sa_source = "manual"', 'sa_source = "ikev2"'))
    assert "'ikev2' needs a [gateway.ike] table (local_id)" in _message(path)


def test_gw_workers_key(key_set, tmp_path):
    """``[daemon] workers``: 0 (one process) by default; a GW may have some, not an MN or HA;
    a negative or huge count names the key."""
    assert load_config(key_set["gw"]).daemon.workers == 0
    assert "workers = 0" in open(key_set["gw"]).read()
    path = _mutate(key_set["gw"], tmp_path, lambda t: t.replace("workers = 0", "workers = 2", 1))
    assert load_config(path).daemon.workers == 2
    for value in (-1, 65):
        path = _mutate(key_set["gw"], tmp_path,
                       lambda t, v=value: t.replace("workers = 0", f"workers = {v}", 1))
        msg = _message(path)
        assert "[daemon] workers" in msg and str(value) in msg
    path = _mutate(key_set["mn1"], tmp_path, lambda t: t.replace("[daemon]", "[daemon]\nworkers = 2", 1))
    assert "only a GW" in _message(path)
