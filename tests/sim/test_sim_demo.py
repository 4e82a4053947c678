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


def test_demo_negotiates_by_ikev2_by_default_and_shows_the_set_up():
    out = io.StringIO()
    assert run_demo(out) == 0
    text = out.getvalue()
    assert "SAs negotiated by IKEv2, SIU handovers" in text
    ike = float(re.search(r"IKE SA established after +([\d.]+) ms", text).group(1))
    child = re.search(r"first child SA after +([\d.]+) ms: MN inbound SPI ([0-9a-f]{8}), "
                      r"outbound SPI ([0-9a-f]{8}), ESP (\S+)", text)
    assert child is not None, text[:2000]
    # IKE_SA_INIT + IKE_AUTH: two MN-GW round trips of 2 x (20 ms + 0.1 ms LAN)
    assert abs(ike - 80.4) < 0.5 and abs(float(child.group(1)) - 80.4) < 0.5
    # the SPIs printed are the ones the handovers then use (re-pointed at the GW)
    assert f"spi=0x{child.group(2)}" in text.split("== handover 1")[1]
    for kind in ("ike-initiated", "gw-sas-installed", "ike-established", "sas-installed"):
        assert kind in text.split("== handover 1")[0]
    assert "final state: MN at-home, HA bindings 0, GW binding None" in text


def test_demo_with_manual_keys_and_with_mobike():
    out = io.StringIO()
    assert run_demo(out, manual_keys=True) == 0
    text = out.getvalue()
    assert "manual keys, SIU handovers" in text and "IKE" not in text
    assert "gw-sa-repointed" in text
    out = io.StringIO()
    assert run_demo(out, handover_mode="mobike") == 0
    text = out.getvalue()
    assert "MOBIKE handovers" in text and "gw-sa-moved-by-mobike" in text
    assert "final state: MN at-home, HA bindings 0, GW binding None" in text
