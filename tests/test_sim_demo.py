"""``mipsec demo --sim`` (mipsec.sim.demo.run_demo) runs and shows each move's timeline and figures."""

import io
import re

from mipsec.sim.demo import run_demo


def test_demo_runs_and_reports_each_handover():
    out = io.StringIO()
    assert run_demo(out) == 0
    text = out.getvalue()
    for title in ("handover 1: A -> B (break-before-make)", "handover 2: B -> A (make-before-break)",
                  "return home (deregistration)"):
        assert title in text
    for kind in ("gw-sa-repointed", "rrp-forwarded", "first-downlink-at-new-coa", "deregistered"):
        assert kind in text
    gaps = [float(x) for x in re.findall(r"downlink CN->MN: longest interruption +([\d.]+) ms", text)]
    assert len(gaps) == 3
    assert 40.4 <= gaps[0] <= 42.5          # break-before-make: about one round trip (40.4 ms)
    assert gaps[1] <= 1.5                   # make-before-break: no gap beyond the stream interval
    assert re.search(r"lost 0 of \d+\n   uplink   MN->CN: longest interruption +[\d.]+ ms, lost 0",
                     text.split("handover 2")[1])
    assert "final state: MN at-home, HA bindings 0, GW binding None" in text
