"""Live lab with manual AES-CBC keys: real restarts of the MN and GW daemons (docs/security.md
§3.6).  Before, a restarted daemon sent sequence numbers 1, 2, 3 ... again and the peer's replay
window dropped them all (the MN's Registration Requests too); a restarted GW also accepted again
an ESP packet recorded before.  Now each continues after the numbers it used, from its state file
(``<state_dir>/<name>.seq.json``, mode 0600), and a recorded packet stays refused.

Needs root and network namespaces: in CI (CI=true) a missing requirement FAILS, elsewhere skips.
"""

from __future__ import annotations

import os
import stat
import time

import pytest

import lablib
import labs
from mipsec.io.pcap import read_pcap
from mipsec.lab.topology import GW_OUTSIDE, MN_COA

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = labs.prefix("sk")
BEFORE = 150          # packets each way before a restart: more than a fresh sender would lose


def _esp_from_mn(lab) -> bytes:
    """The last ESP packet the MN sent from visited network a, as the GW captured it."""
    coa, gw = bytes(map(int, MN_COA["a"].split("."))), bytes(map(int, GW_OUTSIDE.split(".")))
    esp = [p for _, p in read_pcap(lab.pcap) if p[9] == 50 and p[12:16] == coa and p[16:20] == gw]
    assert esp, "no ESP from the MN in the GW's capture"
    return esp[-1]


def _restart(lab, role: str) -> float:
    t0 = time.monotonic()
    lab.restart_daemon(role)
    return t0


def test_manual_cbc_keys_survive_restarts_of_the_mn_and_the_gw():
    with labs.started(PREFIX, place="a", sa_source="manual",
                            retransmit_initial_s=0.2) as lab:
        assert lablib.status(lab, "gw")["node"]["mobiles"]  # (sanity: the GW knows the MN)
        assert lablib.downlink(lab, 1, BEFORE) >= BEFORE * 0.9
        assert lablib.uplink(lab, 1, BEFORE) >= BEFORE * 0.9
        for name in ("gw", "mn"):
            path = lab.path(f"{name}.seq.json")
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path

        # 1. The MN restarts: its first packets are its Registration Requests, which the GW's
        #    window would have dropped as replays.
        t0 = _restart(lab, "mn")
        lab.wait_mn_event(t0, ("rrp-received",), timeout=15)
        assert labs.wait_until(lambda: lablib.registered(lab, 1, "a"))
        assert lablib.uplink(lab, 1) >= 18
        assert lablib.downlink(lab, 1) >= 18
        sas = lablib.status(lab, "mn")["node"]["sas"]
        assert sas["outbound"]["sequence"] > BEFORE       # continued, not 1, 2, 3 ...

        # 2. The GW restarts; a packet the MN sent before is recorded.
        recorded = _esp_from_mn(lab)
        _restart(lab, "gw")
        move = lab.move("b")                               # the HA's SIU binds the GW's SA again
        assert move["registered"]
        assert labs.wait_until(lambda: lablib.registered(lab, 1, "b"))
        assert lablib.downlink(lab, 1) >= 18               # the MN's window took the GW's numbers
        assert lablib.uplink(lab, 1) >= 18
        gw = lablib.status(lab, "gw")["node"]["mobiles"][lab.home_address(1)]["sas"]
        assert gw["outbound"]["sequence"] > BEFORE

        # 3. The recorded packet, replayed to the restarted GW from the MN's old address, is
        #    refused by the window the GW restored.
        def refused() -> int:
            sa = lablib.status(lab, "gw")["node"]["mobiles"][lab.home_address(1)]["sas"]
            d = sa["inbound"]["counters"]["drops"]
            return d.get("replayed", 0) + d.get("too-old", 0)

        before = refused()
        lablib.tool(lab, "rt", "raw", GW_OUTSIDE, "3", recorded.hex())
        assert labs.wait_until(lambda: refused() == before + 3)
