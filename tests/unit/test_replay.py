"""Anti-replay window (RFC 4303 §3.4.3, Appendix A): a table test in the wireguard-go style."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason
from mipsec.errors import ConfigError
from mipsec.ipsec.constants import REPLAY_WINDOW_BITS
from mipsec.ipsec.replay import ReplayWindow

OK = None
OLD = DropReason.TOO_OLD
DUP = DropReason.REPLAYED
W = 64  # window of the table (a small one keeps the table readable)

# (sequence number, expected pre-check result); an accepted number is then recorded
TABLE = [
    (0, OLD),             # §3.3.3: numbering starts at 1
    (1, OK), (1, DUP),
    (2, OK), (2, DUP),
    (4, OK), (3, OK), (3, DUP), (4, DUP),
    (W, OK), (W, DUP),
    (W + 1, OK),          # window now W+1-63 .. W+1 = 2 .. 65
    (1, OLD), (2, DUP), (5, OK), (5, DUP),
    (W + 2, OK),          # window 3 .. 66: 2 has fallen out
    (2, OLD), (3, DUP), (6, OK),
    (10 * W, OK),         # a big jump clears the bitmap
    (10 * W - W + 1, OK), (10 * W - W, OLD), (10 * W - 1, OK), (10 * W, DUP),
    (2**32 - 1, OK), (2**32 - 1, DUP), (2**32 - 2, OK), (2**32 - W, OK), (2**32 - W - 1, OLD),
]


def test_table():
    window = ReplayWindow(W)
    for i, (seq, expected) in enumerate(TABLE):
        before = window.snapshot()
        assert window.check(seq) is expected, f"row {i}: seq {seq}"
        assert window.snapshot() == before, f"row {i}: check() changed the window"
        if expected is OK:
            window.update(seq)


def test_default_size_is_at_least_1024_bits():
    assert REPLAY_WINDOW_BITS >= 1024
    window = ReplayWindow()
    assert window.size == REPLAY_WINDOW_BITS
    window.update(5000)
    assert window.check(5000 - REPLAY_WINDOW_BITS + 1) is OK
    assert window.check(5000 - REPLAY_WINDOW_BITS) is OLD


@pytest.mark.parametrize("size", [0, 31, -1, 1.5, "64"])
def test_window_size_is_validated(size):
    with pytest.raises(ConfigError):
        ReplayWindow(size)


# --- ESN (RFC 4303 Appendix A2.2): (top, received low half, inferred 64-bit number) -----------
HI = 2**32
ESN_TABLE = [
    # Case A: window within one subspace (Tl >= W - 1)
    (1000, 1001, 1001),
    (1000, 1000 - W + 1, 1000 - W + 1),             # bottom of the window, same subspace
    (1000, 1000 - W, HI + 1000 - W),                # below the window: assumed next subspace
    (5 * HI + 1000, 7, 6 * HI + 7),
    (5 * HI + 1000, 2000, 5 * HI + 2000),
    # Case B: window spans the low-half wrap (Tl < W - 1)
    (HI + 10, 5, HI + 5),                           # same subspace, below top
    (HI + 10, 11, HI + 11),                         # ahead in the same subspace
    (HI + 10, HI - 3, HI - 3),                      # the previous subspace's tail
    (HI + 10, HI - W + 11, HI - W + 11),            # lowest number in the window
    (HI + 10, HI - W + 10, 2 * HI - W + 10),        # not in the window: read as far ahead
    (3 * HI + 2, HI - 1, 3 * HI - 1),
    (2**64 - 1, 5, 2**64 - HI + 5),                 # no subspace after the last one
]


@pytest.mark.parametrize("top, low, full", ESN_TABLE)
def test_esn_high_half_inference(top, low, full):
    window = ReplayWindow(W)
    window.update(top)
    assert window.infer(low) == full


def test_esn_low_half_wrap_sequence():
    """Packets across the 2**32 boundary, in and out of order, all land in the right place."""
    window = ReplayWindow(W)
    sent = [HI - 3, HI - 2, HI - 1, HI, HI + 1, HI + 2]
    order = [0, 2, 1, 3, 5, 4]
    for i in order:
        full = sent[i]
        guessed = window.infer(full & 0xFFFFFFFF)
        assert guessed == full
        assert window.check(guessed) is OK
        window.update(guessed)
    assert window.top == HI + 2
    for full in sent:  # every one of them is now a replay
        assert window.check(window.infer(full & 0xFFFFFFFF)) is DUP


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=200))
def test_against_a_set_model(seqs):
    """The bitmap agrees with the obvious model: a set of seen numbers and a top."""
    window = ReplayWindow(W)
    seen: set[int] = set()
    top = 0
    for seq in seqs:
        if seq <= top - W:
            expected = OLD
        elif seq in seen:
            expected = DUP
        else:
            expected = OK
        assert window.check(seq) is expected
        if expected is OK:
            window.update(seq)
            seen.add(seq)
            top = max(top, seq)
    assert window.top == top
