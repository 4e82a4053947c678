"""Guardrails: ruff and mypy, configured in pyproject.toml, report nothing.

ruff (pycodestyle, pyflakes, import order, bugbear, pyupgrade) checks the whole tree; mypy checks
mipsec/ with the strict flags on the pure layers (wire, crypto, ipsec, mip, mobility) and its
defaults plus ``check_untyped_defs`` elsewhere.  Both come with the test extra (tools/setup.sh);
missing, they fail in CI and skip elsewhere (tests/needs.py).  A finding fails the test with the
tool's own output, file:line first.

Marked ``guardrails`` (besides ``unit``): mypy over mipsec/ is most of the unit level's CPU, so
the fast run of README.md "Developing" leaves these out and runs them as a step of their own.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

import needs

pytestmark = pytest.mark.guardrails

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tool(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        needs.need(f"{module} is not installed (pip install -e '.[test]')",
                   f"{module} is required in CI (tools/setup.sh installs the test extra)")


def _run(*args: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_ruff_reports_nothing():
    _tool("ruff")
    proc = _run("ruff", "check", "--output-format", "concise", ".")
    assert proc.returncode == 0, f"ruff check:\n{proc.stdout}{proc.stderr}"


def test_mypy_reports_nothing():
    _tool("mypy")
    proc = _run("mypy")                      # files and flags from pyproject.toml
    assert proc.returncode == 0, f"mypy:\n{proc.stdout}{proc.stderr}"
    assert proc.stdout.startswith("Success: no issues found"), proc.stdout


def test_ruff_sees_a_finding(tmp_path):
    _tool("ruff")
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\n\ndef f(items):\n    return zip(items, items)\n")
    proc = _run("ruff", "check", "--config", str(ROOT / "pyproject.toml"),
                "--output-format", "concise", "--no-cache", str(probe))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "F401" in proc.stdout and "B905" in proc.stdout, proc.stdout


def test_mypy_is_strict_on_the_pure_layers_only(tmp_path):
    """The same untyped function is an error in mipsec.wire and accepted in mipsec.node."""
    _tool("mypy")
    for package in ("mipsec", "mipsec/wire", "mipsec/node"):
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    for package in ("wire", "node"):
        (tmp_path / "mipsec" / package / "probe.py").write_text("def f(x):\n    return x\n")
    proc = _run("mypy", "--config-file", str(ROOT / "pyproject.toml"),
                "--cache-dir", str(ROOT / ".mypy_cache"), "mipsec", cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("mipsec/wire/probe.py:1: error: Function is missing a type "
                               "annotation"), proc.stdout
