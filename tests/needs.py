"""What a test needs from the machine (root, tshark, strongSwan, namespaces), in one place.

The common rule for every test: a missing requirement FAILS when ``CI=true`` (CI installs and
runs everything, so a skip there would hide the check) and skips with the reason elsewhere.
"""

from __future__ import annotations

import os
import shutil

import pytest


def need(problem: str | None, ci_message: str | None = None) -> None:
    """Fail in CI / skip elsewhere when ``problem`` says what is missing; nothing when None."""
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(ci_message or problem)
        pytest.skip(problem)


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
