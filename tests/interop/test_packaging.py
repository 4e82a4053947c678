"""Packaging: the wheel and the sdist are built from a copy of the tree; the wheel installs into
a fresh virtual environment with the docs beside it, its `mipsec install-units` writes units
whose ExecStart is that environment's Python, and `systemd-analyze verify` accepts them (it is
required in CI: tests/needs.py); the sdist carries the license, the docs and the tests with
their helpers, and some of those tests run from the unpacked sdist."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import needs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """(wheel path, sdist path), built from a clean copy of the source tree."""
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache",
        ".mypy_cache", ".ruff_cache"))
    out = base / "dist"
    for what in ("sdist", "wheel"):        # one process each: setuptools keeps state
        code = f"import sys; from setuptools import build_meta as b; b.build_{what}(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("mipsec-*.whl")
    (sdist,) = out.glob("mipsec-*.tar.gz")
    return wheel, sdist


def test_the_sdist_carries_license_docs_and_test_helpers(dist, tmp_path):
    _, sdist = dist
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path, filter="data")
    for needed in ("LICENSE", "README.md", "docs/operations.md", "tests/needs.py",
                   "tests/control_thread.py", "tests/interop/strongswan/peer.py", "tools/test.sh",
                   "mipsec/units.py"):
        assert needed in names, needed
    (top,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    license_text = (top / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert "License :: OSI Approved :: MIT License" in (top / "PKG-INFO").read_text() or \
        "License: MIT" in (top / "PKG-INFO").read_text()
    # the sdist's own tests run from it (a quick subset; the whole suite is tools/test.sh)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/unit/test_config.py", "tests/unit/test_check.py"], cwd=top,
                          env={**os.environ, "PYTHONPATH": str(top)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout


def test_the_wheel_installs_and_its_units_verify(dist, tmp_path):
    wheel, _ = dist
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert any(n.endswith(".data/data/share/doc/mipsec/operations.md") for n in names), names
    assert any(n.endswith("dist-info/licenses/LICENSE") or n.endswith("dist-info/LICENSE")
               for n in names)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    # install without its dependencies (no package index needed): install-units needs none
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "--no-deps", "--no-index", "-q", str(wheel)], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0 and "no such option: --python" in proc.stderr:
        pytest.fail(f"pip too old for --python: {proc.stderr}")
    assert proc.returncode == 0, proc.stderr
    assert (venv / "share" / "doc" / "mipsec" / "operations.md").exists()
    units = tmp_path / "units"
    proc = subprocess.run([str(venv / "bin" / "mipsec"), "install-units", "--dir", str(units)],
                          capture_output=True, text=True, timeout=60, env={
                              k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    for role in ("mn", "gw", "ha"):
        text = (units / f"mipsec-{role}@.service").read_text()
        assert f"ExecStart={python} -m mipsec {role} --config /etc/mipsec/%i.toml" in text
        assert f"Documentation=file://{venv}/share/doc/mipsec/operations.md" in text
    analyze = needs.systemd_analyze()
    for role in ("mn", "gw", "ha"):
        # verify an instance of the template (the unit file itself is not loadable)
        instance = units / f"mipsec-{role}@{role}.service"
        shutil.copy(units / f"mipsec-{role}@.service", instance)
        proc = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "mipsec" not in proc.stderr, proc.stderr


def test_verify_catches_a_unit_whose_command_is_missing(tmp_path):
    """The check above can fail: a unit naming a command that is not there is refused."""
    from mipsec.units import unit_text
    analyze = needs.systemd_analyze()
    unit = tmp_path / "mipsec-gw@gw.service"
    unit.write_text(unit_text("gw", python=str(tmp_path / "no-such-python")))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "no-such-python" in proc.stderr
