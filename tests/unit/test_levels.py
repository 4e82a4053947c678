"""The test levels (tests/conftest.py): every test module lives in a level folder, each level's
marker is registered and selects exactly its folder's tests (plus netns tests as lab)."""

from __future__ import annotations

import configparser

from levels import LEVELS, TESTS, level_of

ROOT = TESTS.parent


def test_every_test_module_is_in_a_level_folder():
    stray = sorted(p.relative_to(ROOT).as_posix() for p in TESTS.rglob("test_*.py")
                   if level_of(p) is None)
    assert not stray, f"put these in one of tests/{{{','.join(LEVELS)}}}: {stray}"


def test_each_level_has_its_folder_and_its_marker():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    markers = {line.split(":")[0].strip()
               for line in cfg["tool:pytest"]["markers"].splitlines() if line.strip()}
    for level in LEVELS:
        assert level in markers, level
        assert any((TESTS / level).glob("test_*.py")), f"tests/{level} has no tests"


def test_level_of_reads_the_folder():
    assert level_of(TESTS / "unit" / "test_x.py") == "unit"
    assert level_of(TESTS / "security" / "test_x.py") == "security"
    assert level_of(TESTS / "test_x.py") is None
    assert level_of(TESTS / "elsewhere" / "test_x.py") is None
