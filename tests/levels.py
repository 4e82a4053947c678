"""The test levels: one folder per level under tests/ (see tests/conftest.py)."""

from __future__ import annotations

import pathlib

TESTS = pathlib.Path(__file__).resolve().parent
LEVELS = ("vectors", "unit", "sim", "io", "lab", "interop", "security")


def level_of(path: pathlib.Path) -> str | None:
    """The level folder a test file is in (None for a file directly in tests/ or elsewhere)."""
    parts = path.resolve().relative_to(TESTS).parts
    return parts[0] if len(parts) > 1 and parts[0] in LEVELS else None
