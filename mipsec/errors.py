"""The two error channels (docs/design.md, "Errors").

* Local misuse and bad configuration raise early: ``ConfigError`` / ``UsageError``, with a message
  that names the problem.
* Remote bad input never escapes a role: parsers raise ``ParseError`` which the role catches and
  turns into a ``DropReason`` counter.  ``Dropped`` carries such a reason out of a library call
  (``SecurityAssociation.decapsulate``) to the caller, which counts it.
"""

from __future__ import annotations

from mipsec.drops import DropReason


class MipsecError(Exception):
    """Base class of every exception mipsec raises on purpose."""


class ConfigError(MipsecError):
    """A configuration file or value is wrong.  ``str()`` names file, key and problem."""


class UsageError(MipsecError):
    """The local caller used an API wrongly (a programming error, not remote input)."""


class ParseError(MipsecError, ValueError):
    """Remote input does not parse.  ``reason`` is the DropReason a role counts for it."""

    def __init__(self, message: str, reason: DropReason = DropReason.MALFORMED):
        super().__init__(message)
        self.reason = reason


class Dropped(MipsecError):
    """A packet was refused; ``reason`` says why.  Raised by library entry points only."""

    __slots__ = ("reason",)

    def __init__(self, reason: DropReason):
        super().__init__(reason.value)
        self.reason = reason


class SaExhausted(MipsecError):
    """The SA's sequence number space is used up (RFC 4303 §3.3.3): it needs a new key."""
