"""Manual keys and nonces (docs/security.md §3.6): manual keys with an AEAD transform are refused
at load with why and what instead; `mipsec keys` writes IKEv2 configurations unless told
otherwise, and its manual keys are AES-CBC + HMAC.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mipsec import cli
from mipsec.config import (
    DaemonConfig,
    DaemonSettings,
    dump_config,
    load_config,
    make_key_set,
)
from mipsec.errors import ConfigError
from mipsec.files import write_private
from mipsec.node.config import make_lab_configs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _manual_aead_files(tmp_path, encryption: str) -> dict[str, str]:
    """An MN and a GW file with manual keys and an AEAD transform, as an old `mipsec keys`
    wrote them (make_key_set refuses to build them now)."""
    lab = make_lab_configs(1, encryption=encryption, sa_source="manual")
    cfgs = {"mn": DaemonConfig("mn", DaemonSettings(interfaces=("va0",)), lab.mobiles[0]),
            "gw": DaemonConfig("gw", DaemonSettings(inside_interface="in0"), lab.gateway)}
    out = {}
    for name, cfg in cfgs.items():
        out[name] = str(tmp_path / f"{encryption}-{name}.toml")
        write_private(out[name], dump_config(cfg))
    return out


@pytest.mark.parametrize("encryption", ["ENCR_AES_GCM_16", "ENCR_CHACHA20_POLY1305"])
def test_manual_keys_with_an_aead_transform_are_refused_at_load(tmp_path, encryption):
    for role, path in _manual_aead_files(tmp_path, encryption).items():
        with pytest.raises(ConfigError) as err:
            load_config(path)
        msg = str(err.value)
        assert path in msg and "[daemon] sa_source" in msg and encryption in msg
        assert "RFC 4106 §8.1" in msg and "RFC 7634" in msg         # why
        assert "nonce" in msg and "restart" in msg
        assert 'sa_source = "ikev2"' in msg and "ENCR_AES_CBC" in msg  # what instead
        if role == "gw":
            assert "mobile 10.1.0.100" in msg


def test_the_daemon_stops_with_exit_status_2_and_that_one_message(tmp_path):
    path = _manual_aead_files(tmp_path, "ENCR_AES_GCM_16")["mn"]
    proc = subprocess.run([sys.executable, "-m", "mipsec", "mn", "--config", path],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "RFC 4106 §8.1" in lines[0], proc.stderr


def test_make_key_set_builds_no_manual_aead_set():
    with pytest.raises(ConfigError, match="RFC 4106"):
        make_key_set(1, encryption="ENCR_AES_GCM_16")
    sets = make_key_set(1)                                     # manual: CBC + HMAC by default
    assert sets["mn"].node.esp_in.encryption == "ENCR_AES_CBC"
    assert sets["mn"].node.esp_in.integrity == "AUTH_HMAC_SHA2_256_128"


def test_keys_writes_ikev2_by_default_and_manual_cbc_on_request(tmp_path, capsys):
    assert cli.main(["keys", "--out", str(tmp_path / "ike")]) == 0
    mn = load_config(tmp_path / "ike" / "mn.toml", require_private=True)
    assert mn.daemon.sa_source == "ikev2" and mn.node.esp_in is None
    assert mn.node.ike.esp_proposals == ("aes128gcm16",)
    assert cli.main(["keys", "--out", str(tmp_path / "man"), "--manual-keys"]) == 0
    mn = load_config(tmp_path / "man" / "mn.toml", require_private=True)
    assert mn.daemon.sa_source == "manual" and mn.node.esp_in.encryption == "ENCR_AES_CBC"
    capsys.readouterr()
    for encryption in ("ENCR_AES_GCM_16", "ENCR_CHACHA20_POLY1305"):
        assert cli.main(["keys", "--out", str(tmp_path / encryption), "--manual-keys",
                         "--encryption", encryption]) == 2
        err = capsys.readouterr().err
        assert "RFC 4106 §8.1" in err and 'sa_source = "ikev2"' in err
        assert not os.path.exists(tmp_path / encryption / "mn.toml")
