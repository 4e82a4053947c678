"""`mipsec status` as text shows a GW's worker processes: totals, drops, and per worker its
pid, liveness, report age, MNs, packets, hand-offs and SPIs."""

from __future__ import annotations

from mipsec.cli.status_text import render_status


def test_the_workers_block_of_a_gw_status():
    reply = {"ok": True, "role": "gw", "name": "gw", "pid": 10, "io": {}, "node": {},
             "workers": {"count": 2, "totals": {"packets_up": 5, "handoffs_out": 1},
                         "drops": {"replayed": 2}, "off_shard": 0, "workers": [
                             {"index": 0, "pid": 11, "alive": True, "report_age_s": 0.25,
                              "mobiles": 1, "packets_up": 5, "packets_down": 4,
                              "handoffs_out": 1, "handoffs_in": 0,
                              "inbound_spis": ["0x00000102"], "outbound_spis": ["0x00000201"]},
                             {"index": 1, "pid": 12, "alive": False, "report_age_s": None}]}}
    text = render_status(reply)
    assert "workers: 2, packets_up 5, handoffs_out 1" in text
    assert "drops: replayed 2" in text
    assert ("worker 0: pid 11 alive, report 0.2 s ago, 1 MNs, up 5, down 4, hand-offs 1 out / "
            "0 in; inbound SPIs 0x00000102; outbound SPIs 0x00000201") in text
    assert "worker 1: pid 12 DEAD, report never" in text
