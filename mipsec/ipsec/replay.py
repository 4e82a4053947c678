"""Anti-replay window (RFC 4303 §3.4.3 and Appendix A).

Theory of operation: ``top`` is the highest authenticated sequence number seen; bit ``i`` of the
integer ``bitmap`` says whether ``top - i`` was seen.  ``check(seq)`` is the pre-check done before
the ICV (it changes nothing); ``update(seq)`` is called only once the packet has been
authenticated (and decrypted), so a forged packet can never move the window.

With extended sequence numbers only the low 32 bits travel; ``infer(seq_low)`` reconstructs the
full 64-bit number from the window position (RFC 4303 Appendix A2.2).  If the guess is wrong the
ICV check fails, which is how the RFC intends it.
"""

from __future__ import annotations

from mipsec.drops import DropReason
from mipsec.errors import ConfigError
from mipsec.ipsec.constants import REPLAY_WINDOW_BITS

_LOW = 2**32


class ReplayWindow:
    """A sliding window of ``size`` bits over sequence numbers (32- or 64-bit)."""

    __slots__ = ("size", "top", "bitmap", "_mask")

    def __init__(self, size: int = REPLAY_WINDOW_BITS):
        if not isinstance(size, int) or size < 32:
            # RFC 4303 §3.4.3: "a minimum window size of 32 packets MUST be supported"
            raise ConfigError(f"replay window: size {size!r} must be an integer >= 32")
        self.size = size
        self.top = 0          # highest authenticated sequence number; 0 = none yet
        self.bitmap = 0       # bit i <=> top - i was received
        self._mask = (1 << size) - 1

    def infer(self, seq_low: int) -> int:
        """The full 64-bit sequence number for the received low half (RFC 4303 Appendix A2.2)."""
        top = self.top
        th, tl = top >> 32, top & 0xFFFFFFFF
        w = self.size
        if tl >= w - 1:
            # Case A: the window lies within one sequence number subspace.
            if seq_low >= tl - w + 1 or th == 0xFFFFFFFF:
                # (there is no subspace after the last: numbers never cycle, RFC 4303 §3.3.3)
                return (th << 32) | seq_low
            return ((th + 1) << 32) | seq_low
        # Case B: the window spans two subspaces.
        if seq_low >= (tl - w + 1) % _LOW:
            if th == 0:
                return seq_low  # nothing below subspace 0: a number ahead in subspace 0
            return ((th - 1) << 32) | seq_low
        return (th << 32) | seq_low

    def check(self, seq: int) -> DropReason | None:
        """Pre-check before the ICV: None if ``seq`` may be new, else the reason.  No change."""
        top = self.top
        if seq > top:
            return None
        if seq == 0:
            return DropReason.TOO_OLD  # RFC 4303 §3.3.3: the first packet has number 1
        diff = top - seq
        if diff >= self.size:
            return DropReason.TOO_OLD
        if (self.bitmap >> diff) & 1:
            return DropReason.REPLAYED
        return None

    def update(self, seq: int) -> None:
        """Record an authenticated ``seq`` (only after ``check`` passed and the ICV verified)."""
        top = self.top
        if seq > top:
            shift = seq - top
            if shift >= self.size:
                self.bitmap = 1
            else:
                self.bitmap = ((self.bitmap << shift) | 1) & self._mask
            self.top = seq
        else:
            self.bitmap |= 1 << (top - seq)

    def snapshot(self) -> tuple[int, int]:
        """(top, bitmap): for tests that assert the window did not move."""
        return self.top, self.bitmap
