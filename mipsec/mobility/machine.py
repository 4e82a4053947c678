"""One transition table, one current state: the shape every machine in this package has.

The table *is* the logic (as in h11's ``_state.py``): ``fire`` looks ``(state, event)`` up,
moves to the new state and returns the effect the table names; the caller carries the effect
out.  A pair that is not in the table is refused with ``IllegalTransition`` (a ``UsageError``:
a bug in the caller, never remote input: roles classify remote input into events only after
it passed their checks) and the state does not change.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

from mipsec.errors import UsageError

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)
X = TypeVar("X", bound=enum.Enum)


class IllegalTransition(UsageError):
    """An event the table does not allow in the current state."""


class Machine(Generic[S, E, X]):
    """``state`` plus the table it moves by; subclasses add the state the effects work on."""

    __slots__ = ("state", "table", "who")

    def __init__(self, table: Mapping[tuple[S, E], tuple[S, X]], initial: S, who: str = ""):
        self.table = table
        self.state = initial
        self.who = who

    def permits(self, event: E) -> bool:
        return (self.state, event) in self.table

    def fire(self, event: E) -> X:
        """Take the transition for ``event``; the effect the table names for it."""
        entry = self.table.get((self.state, event))
        if entry is None:
            raise IllegalTransition(f"{self.who}: {event.value} is not allowed in state "
                                    f"{self.state.value}")
        self.state, effect = entry
        return effect
