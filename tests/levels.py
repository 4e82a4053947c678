"""The test levels: one folder per level under tests/ (see tests/conftest.py); and the "fast"
profile a developer runs them with (README.md, "Developing").

``pytest --hypothesis-profile=fast`` (tests/conftest.py sets ``fast``) runs every property test
with a tenth of its examples (``examples(n)``, at least 10) and the time-bounded fuzz test for
one round; without it (CI, ``tools/test.sh``) each runs its full count.  Same tests, same
assertions, fewer inputs.
"""

from __future__ import annotations

import pathlib

TESTS = pathlib.Path(__file__).resolve().parent
LEVELS = ("vectors", "unit", "sim", "io", "lab", "interop", "security")
FAST_PROFILE = "fast"
fast = False          # True under ``--hypothesis-profile=fast`` (set before test modules load)


def examples(n: int) -> int:
    """A property test's example count: ``n``, or a tenth of it (at least 10) when fast."""
    return max(10, n // 10) if fast else n


def level_of(path: pathlib.Path) -> str | None:
    """The level folder a test file is in (None for a file directly in tests/ or elsewhere)."""
    parts = path.resolve().relative_to(TESTS).parts
    return parts[0] if len(parts) > 1 and parts[0] in LEVELS else None
