"""What a test needs from the machine (root, tshark, strongSwan, namespaces), in one place; and
``tshark_fields``, tshark's reading of a capture with our ESP key file.

The common rule for every test: a missing requirement FAILS when ``CI=true`` (CI installs and
runs everything, so a skip there would hide the check) and skips with the reason elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mipsec.io.pcap import tshark_options


def need(problem: str | None, ci_message: str | None = None) -> None:
    """Fail in CI / skip elsewhere when ``problem`` says what is missing; nothing when None."""
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(ci_message or problem)
        pytest.skip(problem)


def systemd_analyze() -> str:
    """systemd-analyze's path: the packaging test verifies the installed units with it."""
    path = shutil.which("systemd-analyze")
    need(None if path else "systemd-analyze not installed (Debian package systemd)",
         "systemd-analyze is required in CI (tools/setup.sh installs Debian's systemd)")
    return path


def tshark() -> str:
    """tshark's path: the tests that compare against Wireshark's dissectors."""
    path = shutil.which("tshark")
    need(None if path else "tshark not installed (Debian package tshark)",
         "tshark is required in CI (tools/setup.sh installs Debian's tshark)")
    return path  # type: ignore[return-value]


def tshark_in_ci() -> str | None:
    """tshark's path for a test whose main check runs without it: None outside CI if missing."""
    path = shutil.which("tshark")
    if path is None and os.environ.get("CI") == "true":
        pytest.fail("tshark is required in CI (tools/setup.sh installs Debian's tshark)")
    return path


def tshark_fields(tshark: str, pcap: str | os.PathLike[str],
                  keyfile: str | os.PathLike[str] | list[str | os.PathLike[str]],
                  fields: list[str]) -> list[list[str]]:
    """One row per packet of ``pcap`` decoded with ``keyfile`` (an esp_sa file, or a list of key
    files: esp_sa and ikev2_decryption_table; every ICV checked):
    the values of ``fields`` (several occurrences joined by ","); fails the test if tshark does."""
    options = [opt for field in fields for opt in ("-e", field)]
    proc = subprocess.run([tshark, "-r", str(pcap), *tshark_options(keyfile), "-T", "fields",
                           "-E", "separator=;", *options],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [line.split(";") for line in proc.stdout.splitlines()]
