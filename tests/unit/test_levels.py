"""The test levels (tests/conftest.py): every test module lives in a level folder, each level's
marker is registered and selects exactly its folder's tests (plus netns tests as lab); the fast
profile (tests/levels.py) cuts example counts only when asked for, and CI never asks."""

from __future__ import annotations

import configparser

import levels
from levels import LEVELS, TESTS, examples, level_of

ROOT = TESTS.parent


def test_every_test_module_is_in_a_level_folder():
    stray = sorted(p.relative_to(ROOT).as_posix() for p in TESTS.rglob("test_*.py")
                   if level_of(p) is None)
    assert not stray, f"put these in one of tests/{{{','.join(LEVELS)}}}: {stray}"


def _markers() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {line.split(":")[0].strip()
            for line in cfg["tool:pytest"]["markers"].splitlines() if line.strip()}


def test_each_level_has_its_folder_and_its_marker():
    markers = _markers()
    for level in LEVELS:
        assert level in markers, level
        assert any((TESTS / level).glob("test_*.py")), f"tests/{level} has no tests"


def test_level_of_reads_the_folder():
    assert level_of(TESTS / "unit" / "test_x.py") == "unit"
    assert level_of(TESTS / "security" / "test_x.py") == "security"
    assert level_of(TESTS / "test_x.py") is None
    assert level_of(TESTS / "elsewhere" / "test_x.py") is None


def test_the_fast_profile_cuts_example_counts_and_only_when_asked(monkeypatch):
    monkeypatch.setattr(levels, "fast", False)
    assert [examples(n) for n in (50, 150, 300)] == [50, 150, 300]
    monkeypatch.setattr(levels, "fast", True)
    assert [examples(n) for n in (50, 150, 300)] == [10, 15, 30]


def test_ci_runs_every_level_with_full_counts():
    """tools/test.sh (what CI runs) selects no marker and no profile: the guardrails, the lab and
    every property test's full example count run there."""
    script = (ROOT / "tools" / "test.sh").read_text()
    command = [line for line in script.splitlines() if "pytest" in line and "exec" in line]
    assert len(command) == 1, command
    options = command[0].split(" -m pytest", 1)[1]
    assert " -m " not in options and "hypothesis-profile" not in options, command
    assert "guardrails" in _markers()
