"""Local files (docs/security.md §3.7): a local user on the machine must not read mipsec's keys,
make it write through a link or into a file they created, make it load a file they can change,
or make one lab's commands touch another lab.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile

import pytest

import labs
import needs
from mipsec import cli, files
from mipsec.config import load_config, make_key_set, write_config
from mipsec.errors import ConfigError
from mipsec.io import pcap
from mipsec.lab import demo
from mipsec.lab.lab import Lab
from mipsec.lab.topology import existing_namespaces

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = 65534
SET = ["gw.toml", "ha.toml", "mn.toml"]


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    return victim


# --- writing: O_EXCL | O_NOFOLLOW temporary files, 0600, rename ----------------------------------

def test_a_planted_tmp_symlink_is_not_written_through(tmp_path):
    """The old writer opened ``gw.toml.tmp`` with O_TRUNC: a symlink planted there made root
    overwrite its target, a planted 0666 file kept its owner and mode."""
    out = tmp_path / "keys"
    out.mkdir()
    victim = _victim(tmp_path)
    (out / "gw.toml.tmp").symlink_to(victim)
    planted = out / "ha.toml.tmp"
    planted.write_text("")
    os.chmod(planted, 0o666)
    assert cli.main(["keys", "--out", str(out)]) == 0
    assert victim.read_text() == "precious\n"
    assert planted.read_text() == "" and _mode(planted) == 0o666     # not used, not changed
    for name in SET:
        st = os.lstat(out / name)
        assert stat.S_ISREG(st.st_mode) and _mode(out / name) == 0o600
        assert st.st_uid == os.geteuid()
    assert load_config(out / "gw.toml", require_private=True).role == "gw"
    # no temporary file of ours is left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(SET + ["gw.toml.tmp", "ha.toml.tmp"])


def test_write_private_creates_exclusive_nofollow_0600_then_renames(tmp_path, monkeypatch):
    opened = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    target = tmp_path / "k.toml"
    files.write_private(target, "secret")
    ((path, flags, mode),) = opened
    assert os.path.dirname(path) == str(tmp_path) and path != str(target)
    for flag in (os.O_CREAT, os.O_EXCL, os.O_NOFOLLOW):
        assert flags & flag
    assert mode == 0o600 and _mode(target) == 0o600 and target.read_text() == "secret"


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    victim = _victim(tmp_path)
    target = tmp_path / "gw.pcap.esp_sa"
    target.symlink_to(victim)
    pcap.write_esp_sa_file(target, ['"IPv4","*","*","0x00001001","AES-CBC [RFC3602]",'
                                    '"0x00","HMAC-SHA-256-128 [RFC4868]","0x00"'])
    assert victim.read_text() == "precious\n"
    assert not target.is_symlink() and _mode(target) == 0o600


def test_the_umask_does_not_widen_the_mode(tmp_path):
    old = os.umask(0)
    try:
        write_config(make_key_set(1)["gw"], tmp_path / "gw.toml")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "gw.toml") == 0o600


# --- mipsec keys: no overwrite without --force ----------------------------------------------------

def test_keys_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "keys"
    assert cli.main(["keys", "--out", str(out)]) == 0
    before = {n: (out / n).read_bytes() for n in SET}
    (out / "mn.toml").unlink()               # one file missing: still nothing is written
    assert cli.main(["keys", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists already" in err and "--force" in err and str(out / "gw.toml") in err
    assert not (out / "mn.toml").exists()
    assert {n: (out / n).read_bytes() for n in SET if n != "mn.toml"} == \
        {n: b for n, b in before.items() if n != "mn.toml"}
    assert cli.main(["keys", "--out", str(out), "--force"]) == 0
    after = {n: (out / n).read_bytes() for n in SET}
    assert after["gw.toml"] != before["gw.toml"]              # fresh keys
    assert all(_mode(out / n) == 0o600 for n in SET)


def test_keys_refuses_a_planted_symlink_at_a_target(tmp_path, capsys):
    out = tmp_path / "keys"
    out.mkdir()
    victim = _victim(tmp_path)
    (out / "gw.toml").symlink_to(victim)
    assert cli.main(["keys", "--out", str(out)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert cli.main(["keys", "--out", str(out), "--force"]) == 0     # replaced, not followed
    assert victim.read_text() == "precious\n"
    assert not (out / "gw.toml").is_symlink() and _mode(out / "gw.toml") == 0o600


# --- loading: refused unless private -------------------------------------------------------------

@pytest.fixture
def gw_file(tmp_path):
    path = tmp_path / "gw.toml"
    write_config(make_key_set(1, sa_source="ikev2")["gw"], path)
    return path


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_a_config_open_to_group_or_others_is_refused(gw_file, mode):
    os.chmod(gw_file, mode)
    with pytest.raises(ConfigError) as err:
        load_config(gw_file, require_private=True)
    assert str(gw_file) in str(err.value) and f"mode {mode:04o}" in str(err.value)
    assert f"chmod 600 {gw_file}" in str(err.value)
    os.chmod(gw_file, 0o600)
    assert load_config(gw_file, require_private=True).role == "gw"
    os.chmod(gw_file, 0o400)
    assert load_config(gw_file, require_private=True).role == "gw"


def test_a_config_owned_by_another_user_is_refused(gw_file):
    needs.need(None if os.geteuid() == 0 else "chown to another user needs root")
    os.chown(gw_file, NOBODY, -1)
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}"):
        load_config(gw_file, require_private=True)


def test_the_daemon_refuses_a_readable_config_with_exit_status_2(gw_file):
    os.chmod(gw_file, 0o644)
    proc = subprocess.run([sys.executable, "-m", "mipsec", "gw", "--config", str(gw_file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{gw_file}: not private: mode 0644" in lines[0]


def test_a_symlinked_config_is_judged_by_the_file_it_names(tmp_path, gw_file):
    link = tmp_path / "link.toml"
    link.symlink_to(gw_file)
    assert load_config(link, require_private=True).role == "gw"
    os.chmod(gw_file, 0o644)
    with pytest.raises(ConfigError, match="not private"):
        load_config(link, require_private=True)


# --- the lab demo's capture directory ------------------------------------------------------------

def test_demo_capture_goes_to_a_fresh_private_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # what an attacker could create for the old predictable name
    planted = tmp_path / f"mipsec-demo-capture-{os.getpid()}"
    planted.mkdir()
    os.chmod(planted, 0o777)
    state = tmp_path / "state"
    state.mkdir()
    (state / "gw.pcap").write_bytes(b"pcap")
    (state / "gw.pcap.esp_sa").write_bytes(b"keys")
    where = demo.keep_capture(str(state))
    assert where != str(planted) and os.path.dirname(where) == str(tmp_path)
    assert _mode(where) == 0o700 and os.stat(where).st_uid == os.geteuid()
    assert sorted(os.listdir(where)) == ["gw.pcap", "gw.pcap.esp_sa"]
    assert list(planted.iterdir()) == []
    # a directory that exists already is never used
    with pytest.raises(FileExistsError):
        demo.keep_capture(str(state), str(planted))


# --- lab prefixes match exactly ------------------------------------------------------------------

def test_lab_down_with_a_prefix_leaves_a_lab_whose_prefix_starts_with_it():
    labs.require()
    short = labs.prefix("lf")
    longer = f"{short}b-"
    mine, theirs = f"{short}cn", f"{longer}cn"
    try:
        for ns in (mine, theirs):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        assert existing_namespaces(short) == [mine]
        assert existing_namespaces(longer) == [theirs]
        removed = Lab(prefix=short).down()
        assert mine in removed and theirs not in removed
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert theirs in listed and mine not in listed.split()
    finally:
        for ns in (mine, theirs):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
