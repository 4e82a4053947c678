"""The command line: complete --help for every (sub)command, `mipsec keys`, `mipsec status`
against a control socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from control_thread import serving
from mipsec import cli
from mipsec.config import load_config
from mipsec.io import control

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMMANDS = [
    ([], ["mn", "gw", "ha", "status", "handover", "keys", "demo", "lab"]),
    (["mn"], ["--config", "netlink", "SIGTERM"]),
    (["gw"], ["--config", "Security Information Update", "policy routing"]),
    (["ha"], ["--config", "proxy ARP", "434"]),
    (["status"], ["--socket", "--role", "--json", "last\nauthenticated"]),
    (["handover"], ["COA|home", "--interface"]),
    (["keys"], ["--out", "--mobiles", "--encryption", "0600"]),
    (["demo"], ["--sim", "simulator"]),
    (["lab"], ["up", "handover", "home", "down", "demo", "status"]),
    (["lab", "up"], ["--prefix", "--delay-ms", "gw.pcap", "--mobiles", "--nat"]),
    (["lab", "handover"], ["--prefix", "{a,b,n}", "--mobile"]),
    (["lab", "home"], ["--prefix", "deregisters", "--mobile"]),
    (["lab", "down"], ["--prefix", "after a crash"]),
    (["lab", "status"], ["--prefix", "--json", "--mobile"]),
    (["lab", "demo"], ["--prefix", "--delay-ms", "--rate", "interruption"]),
]


@pytest.mark.parametrize("words, expected", COMMANDS, ids=lambda x: " ".join(x) if x and
                         isinstance(x[0], str) and not x[0].startswith("-") else None)
def test_help_is_complete(words, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in expected:
        assert word in text, (words, word)
    assert "usage: mipsec" in text


def test_help_through_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "mipsec", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and "mobile node" in proc.stdout


def test_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert "mipsec 0.1.0" in capsys.readouterr().out


def test_keys_writes_a_loadable_set(tmp_path, capsys):
    assert cli.main(["keys", "--out", str(tmp_path), "--mobiles", "3", "--manual-keys",
                     "--encryption", "ENCR_AES_CBC", "--integrity", "AUTH_HMAC_SHA1_96"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gw.toml", "ha.toml", "mn1.toml", "mn2.toml", "mn3.toml"]
    mn = load_config(tmp_path / "mn2.toml")
    assert mn.node.esp_in.encryption == "ENCR_AES_CBC"
    assert mn.node.esp_in.integrity == "AUTH_HMAC_SHA1_96"
    assert "mn3:" in capsys.readouterr().out


def test_keys_refuses_a_bad_count(tmp_path, capsys):
    assert cli.main(["keys", "--out", str(tmp_path), "--mobiles", "0"]) == 2
    assert "n_mobiles" in capsys.readouterr().err


STATUS = {
    "ok": True, "role": "gw", "name": "gw", "pid": 42, "tun": "gtun0", "config": "/etc/gw.toml",
    "clock": {"monotonic": 1000.0, "wall": 1.7e9}, "io": {"from_net": 3, "to_net": 2},
    "drops": {"unknown-spi": 1},
    "node": {"mobiles": {"10.1.0.100": {"care_of": "172.16.1.10", "sas": {
        "inbound": {"spi": "0x10000000", "direction": "inbound", "local": "172.16.0.1",
                    "remote": "*", "encryption": "ENCR_AES_CBC",
                    "integrity": "AUTH_HMAC_SHA1_96", "sequence": 0,
                    "counters": {"packets": 5, "octets": 500, "drops": {"replayed": 2},
                                 "last_authenticated_time": 998.5,
                                 "last_authenticated_source": "172.16.1.10"}},
        "outbound": {"spi": "0x20000000", "direction": "outbound", "local": "172.16.0.1",
                     "remote": "172.16.1.10", "encryption": "ENCR_AES_GCM_16",
                     "integrity": None, "sequence": 7, "udp_encap": {"local_port": 4500},
                     "counters": {"packets": 7, "octets": 700, "drops": {}}}}}},
             "bindings": {"10.1.0.100": {"care_of": "172.16.1.10", "expires": 1600.0}}},
    "timeline": [{"time": 999.0, "node": "gw", "kind": "rrq-forwarded", "detail": {}},
                 {"time": 999.002, "node": "gw", "kind": "gw-sa-repointed",
                  "detail": {"remote": "172.16.1.10"}}],
}


@pytest.fixture
def fake_daemon(tmp_path):
    path = str(tmp_path / "gw.sock")
    server = control.ControlServer(path, lambda cmd, args: STATUS if cmd == "status" else
                                   {"ok": False, "error": f"unknown command {cmd!r}"})
    try:
        with serving(server):
            yield path
    finally:
        server.close()


def test_status_json(fake_daemon, capsys):
    assert cli.main(["status", "--socket", fake_daemon, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def test_status_human(fake_daemon, capsys):
    assert cli.main(["status", "--socket", fake_daemon]) == 0
    out = capsys.readouterr().out
    assert "gw gw  pid 42" in out
    assert ("SA 0x10000000 inbound  * -> 172.16.0.1  ENCR_AES_CBC+AUTH_HMAC_SHA1_96  seq 0"
            in out)
    assert ("packets 5, octets 500, drops replayed 2; last authenticated 1.5 s ago from "
            "172.16.1.10") in out
    assert "SA 0x20000000 outbound 172.16.0.1 -> 172.16.1.10  ENCR_AES_GCM_16 in UDP 4500" in out
    # loop-clock times are shown as UTC wall-clock times (wall 1.7e9 at monotonic 1000)
    assert "expires: 2023-11-14 22:23:20.000 UTC (in 600.0 s)" in out
    assert "unknown-spi 1" in out
    assert "gw-sa-repointed" in out and "2.00 ms" in out


def test_status_unreachable(tmp_path, capsys):
    assert cli.main(["status", "--socket", str(tmp_path / "none.sock")]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_handover_reports_the_daemons_error(fake_daemon, capsys):
    assert cli.main(["handover", "172.16.2.10", "--socket", fake_daemon]) == 1
    assert "unknown command 'handover'" in capsys.readouterr().err


def test_demo_sim_runs_the_simulator(capsys):
    assert cli.main(["demo", "--sim"]) == 0
    out = capsys.readouterr().out
    assert "interruption" in out and "lost" in out


def test_demo_without_lab_requirements_says_so_and_simulates(monkeypatch, capsys):
    import mipsec.lab.lab as lab_module
    monkeypatch.setattr(lab_module, "requirements_problem", lambda: "the lab needs root")
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mipsec demo: the lab needs root; running the same scenario in the "
                          "in-memory simulator")
    assert "interruption" in out


def test_keys_ikev2_writes_psks_and_no_esp_keys(tmp_path, capsys):
    assert cli.main(["keys", "--out", str(tmp_path), "--mobiles", "2", "--ikev2",
                     "--encryption", "ENCR_AES_CBC", "--handover-mode", "mobike"]) == 0
    mn, gw = load_config(tmp_path / "mn2.toml"), load_config(tmp_path / "gw.toml")
    assert mn.daemon.sa_source == "ikev2" and mn.node.esp_in is None
    assert mn.node.ike.esp_proposals == ("aes128-sha256",)
    assert mn.node.handover_mode == "mobike" == gw.node.handover_mode
    assert {m.ike_id for m in gw.node.mobiles} == {"mn1@mipsec.lab", "mn2@mipsec.lab"}
    # (IKEv2 is the default: mobike is refused only with --manual-keys)
    assert cli.main(["keys", "--out", str(tmp_path / "x"), "--manual-keys",
                     "--handover-mode", "mobike"]) == 2
    assert "--handover-mode mobike needs IKEv2" in capsys.readouterr().err
    assert cli.main(["keys", "--out", str(tmp_path / "y"), "--ikev2",
                     "--encryption", "ENCR_NULL"]) == 2
    assert "IKEv2 negotiates" in capsys.readouterr().err


def test_render_ike_shows_sas_children_and_last_rekey():
    ike = {"ike_sas": [{"spi_i": "0102030405060708", "spi_r": "1112131415161718",
                        "state": "established", "initiator": False, "peer_id": "mn@mipsec.lab",
                        "local": "172.16.0.1:500", "remote": "172.16.2.10:500", "mobike": True,
                        "nat_local": False, "nat_remote": False, "established_time": 990.0,
                        "children": [{"spi_in": "c0000001", "spi_out": "c0000002",
                                      "encryption": "ENCR_AES_GCM_16", "key_bits": 128,
                                      "integrity": None, "udp_encap": False,
                                      "local_ts": ["0.0.0.0-255.255.255.255"],
                                      "remote_ts": ["10.1.0.0-10.1.0.255"]}]}],
           "last_rekey_time": 995.0, "drops": {"ike-retransmission": 1}}
    out = "\n".join(cli.render_ike(ike, 1000.0))
    assert "IKE SAs: 1; last re-key 5.0 s ago" in out
    assert ("IKE 0102030405060708_i 1112131415161718_r  established  responder  peer "
            "mn@mipsec.lab  172.16.0.1:500 -> 172.16.2.10:500  MOBIKE  established 10.0 s ago"
            in out)
    assert "child in c0000001 out c0000002  ENCR_AES_GCM_16/128" in out
    assert "IKE drops: ike-retransmission 1" in out


def test_demo_sim_with_manual_keys_and_a_delay(capsys):
    assert cli.main(["demo", "--sim", "--manual-keys", "--delay-ms", "5"]) == 0
    out = capsys.readouterr().out
    assert "one-way Internet delay 5.0 ms" in out
    assert "IKEv2" not in out.split("\n\n")[0]      # the header names the key source
    assert "final state: MN at-home" in out


def test_demo_sim_mobike_mode(capsys):
    assert cli.main(["demo", "--sim", "--handover-mode", "mobike"]) == 0
    out = capsys.readouterr().out
    assert "MOBIKE" in out
    assert "final state: MN at-home" in out


@pytest.mark.parametrize("words", [["demo", "--sim"], ["lab", "demo"], ["lab", "up"]])
def test_mobike_with_manual_keys_is_refused_with_one_message(words, capsys):
    assert cli.main([*words, "--manual-keys", "--handover-mode", "mobike"]) in (1, 2)
    err = capsys.readouterr().err
    assert "--handover-mode mobike needs IKEv2-negotiated SAs" in err


def test_render_sa_shows_the_replay_window_inbound_and_the_counter_outbound():
    from mipsec.ipsec.sa import Direction, SecurityAssociation
    key = bytes(20)
    out = SecurityAssociation(spi=0x1001, direction=Direction.OUTBOUND, encryption="ENCR_AES_GCM_16",
                              encryption_key=key, local="172.16.1.10", remote="172.16.0.1")
    inb = SecurityAssociation(spi=0x1001, direction=Direction.INBOUND, encryption="ENCR_AES_GCM_16",
                              encryption_key=key, local="172.16.0.1", remote=None)
    inner = bytes.fromhex("4500001c000100004011f97b0a0100640a01000a04d2162e00080000")
    for _ in range(3):
        inb.decapsulate(out.encapsulate(inner))
    inbound = cli.render_sa(inb.describe(), now=None)[0]
    outbound = cli.render_sa(out.describe(), now=None)[0]
    assert "SA 0x00001001 inbound  * -> 172.16.0.1" in inbound
    assert "highest seq 3 (window 1024)" in inbound
    assert outbound.endswith("seq 3") and "172.16.1.10 -> 172.16.0.1" in outbound
