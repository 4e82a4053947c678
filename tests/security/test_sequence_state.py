"""Manual CBC keys across restarts (mipsec.io.seqstate, docs/security.md §3.6), with real SA
objects built from a generated manual key set: a restarted sender continues after the numbers it
used, so the peer's replay window does not drop it; a restarted receiver does not accept again
what it accepted before; the numbers on disk are reserved ahead of every packet sent.
"""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from mipsec.config import make_key_set
from mipsec.drops import DropReason
from mipsec.errors import Dropped
from mipsec.io.seqstate import SequenceStore
from mipsec.ipsec.sa import Direction
from mipsec.node.mobile_node import make_sa
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4

MN_COA, GW = "172.16.1.10", "172.16.0.1"


@pytest.fixture(scope="module")
def keys():
    sets = make_key_set(1)                          # manual keys: AES-CBC + HMAC-SHA-256
    return sets["mn"].node.esp_out                  # the MN -> GW SA (the GW's esp_in)


def sender(esp):
    return make_sa(esp, Direction.OUTBOUND, local=MN_COA, remote=GW)


def receiver(esp):
    return make_sa(esp, Direction.INBOUND, local=GW, remote=None)


def packet(i: int) -> bytes:
    return build_ipv4(Ipv4Header("10.1.0.100", "10.1.0.10", 17), b"\x00\x01\x00\x02\x00\x0c" +
                      i.to_bytes(6, "big"))


def refused(rx, outer) -> DropReason | None:
    try:
        rx.decapsulate(outer)
    except Dropped as exc:
        return exc.reason
    return None


def test_without_state_a_restarted_sender_is_dropped_as_a_replay(keys):
    """The control: what a restart did before (and does with no state file)."""
    tx, rx = sender(keys), receiver(keys)
    for i in range(10):
        rx.decapsulate(tx.encapsulate(packet(i)))
    tx = sender(keys)                               # restarted from the configuration
    assert refused(rx, tx.encapsulate(packet(99))) is DropReason.REPLAYED


def test_a_restarted_sender_continues_after_its_numbers(keys, tmp_path):
    path = str(tmp_path / "mn.seq.json")
    tx, rx = sender(keys), receiver(keys)
    store = SequenceStore(path, block=8)
    store.attach([(tx, keys)])
    for i in range(10):
        rx.decapsulate(tx.encapsulate(packet(i)))
    store.close()                                   # a clean stop: the exact number
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    tx2 = sender(keys)
    SequenceStore(path, block=8).attach([(tx2, keys)])
    assert tx2.sequence == 10
    assert refused(rx, tx2.encapsulate(packet(11))) is None
    assert rx.replay.top == 11


def test_after_a_crash_the_jump_is_at_most_one_block_and_never_back(keys, tmp_path):
    path = str(tmp_path / "mn.seq.json")
    tx, rx = sender(keys), receiver(keys)
    store = SequenceStore(path, block=8)
    store.attach([(tx, keys)])
    for i in range(21):
        rx.decapsulate(tx.encapsulate(packet(i)))
        # on disk, before and after every packet: at least every number sent
        with open(path) as f:
            (entry,) = json.load(f)["sas"].values()
        assert entry["reserved"] >= tx.sequence
    # killed: no close(); the next start begins after the reservation
    tx2 = sender(keys)
    SequenceStore(path, block=8).attach([(tx2, keys)])
    assert 21 <= tx2.sequence <= 21 + 8
    assert refused(rx, tx2.encapsulate(packet(22))) is None


def test_a_restarted_receiver_refuses_what_it_accepted_before(keys, tmp_path):
    path = str(tmp_path / "gw.seq.json")
    tx, rx = sender(keys), receiver(keys)
    store = SequenceStore(path)
    store.attach([(rx, keys)])
    recorded = [tx.encapsulate(packet(i)) for i in range(6)]
    for outer in recorded:
        rx.decapsulate(outer)
    store.close()
    # the control: a receiver restarted without state accepts the recording again
    assert refused(receiver(keys), recorded[2]) is None
    rx2 = receiver(keys)
    SequenceStore(path).attach([(rx2, keys)])
    assert [refused(rx2, outer) for outer in recorded] == [DropReason.REPLAYED] * 6
    assert refused(rx2, tx.encapsulate(packet(7))) is None


def test_the_receivers_top_is_written_each_block(keys, tmp_path):
    path = str(tmp_path / "gw.seq.json")
    tx, rx = sender(keys), receiver(keys)
    SequenceStore(path, block=4).attach([(rx, keys)])
    for i in range(9):
        rx.decapsulate(tx.encapsulate(packet(i)))
    with open(path) as f:
        (entry,) = json.load(f)["sas"].values()
    assert entry["top"] == 8                        # written at 4 and 8, not after every packet


def test_state_for_other_keys_or_a_broken_file_is_not_used(keys, tmp_path, caplog):
    path = str(tmp_path / "mn.seq.json")
    tx = sender(keys)
    store = SequenceStore(path)
    store.attach([(tx, keys)])
    for i in range(5):
        tx.encapsulate(packet(i))
    store.close()
    other = make_key_set(1)["mn"].node.esp_out
    other = type(other)(**{**other.__dict__, "spi": keys.spi})   # same SPI, new keys
    tx_new = sender(other)
    SequenceStore(path).attach([(tx_new, other)])
    assert tx_new.sequence == 0
    with open(path, "w") as f:
        f.write("{not json")
    caplog.set_level(logging.WARNING, logger="mipsec")
    tx3 = sender(keys)
    SequenceStore(path).attach([(tx3, keys)])
    assert tx3.sequence == 0 and "ignored" in caplog.text


def test_a_gw_worker_state_file_wins_over_the_control_process_copy(keys, tmp_path):
    """A GW with worker processes: the worker that held the SA kept its numbers in its own file;
    the control process (whose copy of the SA never sent a packet) merges the workers' files
    at its next start, and the SA it hands out continues after the worker's numbers."""
    rx = receiver(keys)
    worker_file, control_file = str(tmp_path / "gw.w1.seq.json"), str(tmp_path / "gw.seq.json")
    control = SequenceStore(control_file, block=8)
    control.attach([(sender(keys), keys)])          # the control's copy: never used
    worker = SequenceStore(worker_file, block=8)
    tx = sender(keys)
    worker.attach([(tx, keys)])
    for i in range(20):
        rx.decapsulate(tx.encapsulate(packet(i)))
    worker.close()                                  # a clean stop: exactly 20
    control.close()                                 # the copy: 0
    again = SequenceStore(control_file, block=8)
    again.merge([worker_file])
    tx2 = sender(keys)
    again.attach([(tx2, keys)])
    assert tx2.sequence == 20
    assert refused(rx, tx2.encapsulate(packet(99))) is None
