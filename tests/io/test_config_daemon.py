"""The daemon started from the command line on a bad configuration (the messages themselves:
tests/unit/test_config.py): it stops at start-up with exit status 2 and one line that names the
file, the table and the key."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from mipsec.config import write_key_set

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def key_set(tmp_path):
    return write_key_set(tmp_path, 2, keys_from=random.Random(7))


def _write(tmp_path, data_text, name="bad.toml"):
    path = tmp_path / name
    path.write_text(data_text)
    return str(path)


def test_daemon_stops_at_start_up_with_one_message(key_set, tmp_path):
    """`mipsec mn --config bad.toml`: exit status 2, exactly one error line naming file and key."""
    data = open(key_set["mn1"]).read()
    old = [ln for ln in data.splitlines() if ln.startswith("encryption_key")][0]
    path = _write(tmp_path, data.replace(old, 'encryption_key = "0011"', 1))
    proc = subprocess.run([sys.executable, "-m", "mipsec", "mn", "--config", path],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert path in lines[0] and "[mobile_node.esp_in] esp.encryption_key" in lines[0]


def test_daemon_refuses_a_file_for_another_role(key_set):
    proc = subprocess.run([sys.executable, "-m", "mipsec", "gw", "--config", key_set["ha"]],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "for 'ha', not 'gw'" in proc.stderr
