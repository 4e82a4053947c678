"""The handover pictures: `mipsec demo --sim --plot DIR` and `mipsec lab demo --plot DIR` write
a sequence chart per move and the packet arrivals, as well-formed PNG files (signature, chunk
CRCs, a non-empty image header, IEND last); the sequence chart's messages pair a sender's event
with the receiver's.  Their look is not tested.

The lab part needs root and network namespaces: in CI (CI=true) a missing requirement FAILS,
elsewhere it skips.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import zlib

import pytest

import labs
from mipsec import cli
from mipsec.node.actions import TimelineEvent
from mipsec.plot import messages, sequence_chart

EXPECTED = ["arrivals.png", "handover-1-sequence.png", "handover-2-sequence.png",
            "handover-3-sequence.png"]


def check_png(path: str) -> tuple[int, int]:
    """(width, height) of a well-formed PNG; fails on any defect."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, chunks, size = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8:pos + 8 + length]
        crc, = struct.unpack_from(">I", data, pos + 8 + length)
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, (path, kind)
        if kind == b"IHDR":
            size = struct.unpack_from(">II", body)
        chunks.append(kind)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks, chunks
    assert size is not None and size[0] > 100 and size[1] > 100, size
    return size


def test_sim_demo_writes_the_plots(tmp_path, capsys):
    assert cli.main(["demo", "--sim", "--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == EXPECTED
    for name in EXPECTED:
        check_png(str(tmp_path / name))
        assert f"plot: {tmp_path / name}" in out


def test_messages_pair_sender_and_receiver(tmp_path):
    events = [TimelineEvent(0.000, "mn", "coa-changed"), TimelineEvent(0.001, "mn", "rrq-sent"),
              TimelineEvent(0.011, "gw", "rrq-forwarded"), TimelineEvent(0.012, "ha", "rrq-accepted"),
              TimelineEvent(0.012, "ha", "siu-sent"), TimelineEvent(0.013, "gw", "gw-sa-repointed"),
              TimelineEvent(0.013, "gw", "rrp-forwarded"), TimelineEvent(0.023, "mn", "rrp-received")]
    plain = [(e.time, e.node, e.kind, e.detail) for e in events]
    pairs = {(label, plain[i][2], plain[j][2]) for label, i, j in messages(plain)}
    assert pairs == {("RRQ", "rrq-sent", "rrq-forwarded"), ("RRQ", "rrq-forwarded", "rrq-accepted"),
                     ("SIU + RRP", "siu-sent", "gw-sa-repointed"),
                     ("RRP", "rrp-forwarded", "rrp-received")}
    # the JSON form (the daemons' `timeline` command) draws the same chart
    as_json = [{"time": e.time, "node": e.node, "kind": e.kind, "detail": {}} for e in events]
    check_png(sequence_chart(as_json, str(tmp_path / "json.png"), t0=0.0))
    check_png(sequence_chart([], str(tmp_path / "empty.png")))


@pytest.mark.netns
@pytest.mark.slow
def test_lab_demo_writes_the_plots(tmp_path):
    from mipsec.lab.demo import run_lab_demo
    from mipsec.lab.topology import existing_namespaces
    labs.require()
    prefix = labs.prefix("pl")
    out = io.StringIO()
    run_lab_demo(prefix=prefix, delay_ms=5.0, rate=200.0, dwell_s=1.0, out=out,
                 plot_dir=str(tmp_path / "plots"))
    assert existing_namespaces(prefix) == []
    kept = re.search(r"capture of the GW's outside: (\S+)/gw\.pcap", out.getvalue())
    if kept:
        shutil.rmtree(kept.group(1), ignore_errors=True)
    assert sorted(os.listdir(tmp_path / "plots")) == EXPECTED, out.getvalue()
    for name in EXPECTED:
        check_png(str(tmp_path / "plots" / name))
