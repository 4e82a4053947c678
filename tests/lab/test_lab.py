"""The lab: real daemons on TUN devices in network namespaces.

One lab (unique namespace prefix) serves the module, in order:
1. traffic CN <-> MN home address through two handovers (a -> b break-before-make, b -> a
   make-before-break) and a return home; after
   each move packets flow, and `mipsec status --json` shows the GW's outbound SA and the HA's
   binding at the MN's location;
2. tshark with the key file the GW wrote decodes every captured ESP packet with a good ICV and
   shows the Registration Request and Reply inside (mip.type 1 and 3); with the IKE key file
   beside it, the IKE_AUTH exchange decrypts (identities, AUTH, SA, TSi/TSr), and does not with
   one key bit wrong;
3. SIGTERM makes a daemon remove what it created; a daemon killed with SIGKILL mid-run leaves
   nothing behind after `mipsec lab down`.

Needs root and network namespaces: in CI (CI=true) a missing requirement FAILS, elsewhere skips.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import labs
import needs
from mipsec.io.pcap import ike_keyfile_path
from mipsec.lab.demo import Streams, phase_figures
from mipsec.lab.lab import Lab, pid_alive
from mipsec.lab.topology import MN_COA, existing_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = labs.prefix("mt")
RATE = 200.0
DWELL_S = 1.2


@pytest.fixture(scope="module")
def lab():
    with labs.started(PREFIX, delay_ms=5.0, place="a") as lab:
        yield lab


def mipsec_status(lab: Lab, role: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mipsec", "status", "--socket", lab.socket(role),
                           "--json"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def check_location(lab: Lab, where: str, timeout: float = 3.0) -> None:
    """The three daemons agree with the MN's location (the GW may get the SIU a moment after
    the MN got its reply, so retry briefly before failing)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _check_location(lab, where)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _check_location(lab: Lab, where: str) -> None:
    gw = mipsec_status(lab, "gw")["node"]["mobiles"]["10.1.0.100"]
    ha = mipsec_status(lab, "ha")["node"]["bindings"]
    mn = mipsec_status(lab, "mn")["node"]
    if where == "home":
        assert gw["care_of"] is None and gw["binding"] != "bound", gw
        assert "10.1.0.100" not in ha, ha
        assert mn["state"] != "registered" or mn["care_of"] in (None, "10.1.0.100"), mn
    else:
        coa = MN_COA[where]
        assert gw["care_of"] == coa and gw["sas"]["outbound"]["remote"] == coa, gw
        assert gw["sas"]["inbound"]["remote"] == "*"
        assert gw["sas"]["inbound"]["counters"]["last_authenticated_source"] == coa
        assert ha["10.1.0.100"]["care_of"] == coa, ha
        assert mn["care_of"] == coa and mn["sas"]["outbound"]["local"] == coa, mn


def ping_cn_to_mn(lab: Lab) -> int:
    proc = lab.exec("cn", "ping", "-c", "3", "-i", "0.2", "-W", "1", "10.1.0.100")
    for line in proc.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    return 0


def test_lab_negotiates_with_ikev2_and_status_shows_the_ike_sas(lab):
    """`mipsec lab up` negotiates the MN-GW SAs with IKEv2 by default; `mipsec status` shows
    the IKE SA (SPIs, state, peer, children) and the GW's ESP SAs are that child's."""
    check_location(lab, "a")
    gw = mipsec_status(lab, "gw")["node"]
    mn = mipsec_status(lab, "mn")["node"]
    (gw_ike,) = [sa for sa in gw["ike"]["ike_sas"] if sa["state"] == "established"]
    (mn_ike,) = [sa for sa in mn["ike"]["ike_sas"] if sa["state"] == "established"]
    assert gw_ike["peer_id"] == "mn@mipsec.lab" and mn_ike["peer_id"] == "gw.mipsec.lab"
    assert (gw_ike["spi_i"], gw_ike["spi_r"]) == (mn_ike["spi_i"], mn_ike["spi_r"])
    (child,) = gw_ike["children"]
    sas = gw["mobiles"]["10.1.0.100"]["sas"]
    assert int(sas["inbound"]["spi"], 16) == int(child["spi_in"], 16)
    assert int(sas["outbound"]["spi"], 16) == int(child["spi_out"], 16)
    assert mn["sas"]["outbound"]["spi"] == sas["inbound"]["spi"]
    # the MN started IKE from its CoA before registering
    kinds = [e["kind"] for e in mipsec_status(lab, "mn")["timeline"]]
    assert kinds.index("ike-established") < kinds.index("sas-installed") < kinds.index("rrq-sent")
    proc = subprocess.run([sys.executable, "-m", "mipsec", "status", "--socket",
                           lab.socket("gw")], capture_output=True, text=True, cwd=ROOT,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"IKE {gw_ike['spi_i']}_i {gw_ike['spi_r']}_r  established  responder  peer " \
           f"mn@mipsec.lab" in proc.stdout, proc.stdout
    assert f"child in {child['spi_in']} out {child['spi_out']}" in proc.stdout


def test_stream_through_two_handovers_and_home(lab):
    check_location(lab, "a")
    assert ping_cn_to_mn(lab) >= 1
    # The streams run until stopped after the last dwell: on a loaded machine the moves and
    # their checks can take longer than the dwells, and a fixed-length stream would end early.
    streams = Streams(lab, RATE, DWELL_S * 4 + 120)
    try:
        time.sleep(DWELL_S)
        moves = []
        for where, mbb in (("b", False), ("a", True), ("home", False)):
            move = lab.move(where, wait=True, make_before_break=mbb)
            moves.append(move)
            check_location(lab, where)
            time.sleep(max(0.0, DWELL_S - (time.monotonic() - move["time"])))
        stopped = time.monotonic()
        reports = streams.stop()
    finally:
        streams.kill()
    ends = [m["time"] for m in moves[1:]] + [stopped]
    for move, end in zip(moves, ends, strict=True):
        for snd, rcv in (("cn", "mn"), ("mn", "cn")):
            # Packets flow after the move: the last half second of the phase arrived.
            tail = phase_figures(reports[snd], reports[rcv], end - 0.5, end, RATE)
            assert tail["received"] >= 0.8 * tail["sent"] > 0, (move, snd, tail)
            whole = phase_figures(reports[snd], reports[rcv], move["time"], end, RATE)
            assert whole["lost"] <= 0.25 * whole["sent"], (move, snd, whole)
    # The second handover was make-before-break: the MN's watcher saw the old address still up.
    events = lab.timelines(moves[1]["time"], moves[2]["time"])
    coa = [e for e in events if e["kind"] == "coa-changed"]
    assert coa and coa[0]["detail"]["make_before_break"] is True, coa
    # and after the return home the CN reaches the MN directly on the home link
    assert ping_cn_to_mn(lab) >= 1
    neigh = lab.exec("ha", "ip", "neigh", "show", "proxy").stdout
    assert "10.1.0.100" not in neigh


def test_tshark_decodes_the_gw_capture_with_every_icv_good(lab):
    tshark = needs.tshark()
    assert os.path.exists(lab.keyfile)
    esp = _tshark_esp(tshark, lab)
    assert len(esp) > 100, len(esp)
    bad = [r for r in esp if r[2] != "1"]
    assert not bad, bad[:5]
    mip_types = {t for r in esp for t in r[3].split(",") if t}
    assert {"1", "3"} <= mip_types, mip_types


# RFC 7296 §3.2 payload types and §3.1 exchange types, as tshark shows them
IDI, IDR, AUTH, SA, TSI, TSR, SK = "35", "36", "39", "33", "44", "45", "46"
IKE_AUTH, CREATE_CHILD_SA = "35", "36"
IKE_FIELDS = ["isakmp.exchangetype", "isakmp.typepayload", "isakmp.enc.pad_length",
              "_ws.expert.message", "isakmp.id.data.fqdn", "isakmp.id.data.user_fqdn"]


def _ike_rows(tshark: str, lab: Lab, ike_keys: str | None = None) -> list[list[str]]:
    """tshark's reading of the encrypted IKEv2 messages of the GW's capture, with both key
    files: exchange, payload types, pad length (only once decrypted), expert info, identities."""
    keys = [lab.keyfile, ike_keys or ike_keyfile_path(lab.keyfile)]
    rows = needs.tshark_fields(tshark, lab.pcap, keys, IKE_FIELDS)
    return [r for r in rows if r[1].split(",")[0] == SK]


def _ike_auth_problems(rows: list[list[str]]) -> list:
    """Why the IKE_AUTH messages are not readable (empty: request and response decrypted, with
    the identities, AUTH, SA and both traffic selectors, and no expert complaint)."""
    auth = [r for r in rows if r[0] == IKE_AUTH]
    problems: list = [] if len(auth) >= 2 else [("IKE_AUTH messages", len(auth))]
    for _exch, types, pad, expert, fqdn, user_fqdn in auth:
        inner = set(types.split(",")[1:])
        if not pad or expert or not {IDR, AUTH, SA, TSI, TSR} <= inner:
            problems.append((types, pad, expert))
        elif IDI in inner and {fqdn, user_fqdn} != {"gw.mipsec.lab", "mn@mipsec.lab"}:
            problems.append(("identities", fqdn, user_fqdn))
    return problems


def test_tshark_decrypts_ike_auth_with_the_ike_key_file(lab, tmp_path):
    """The GW writes its IKE SA's keys (ikev2_decryption_table, 0600) beside the esp_sa file;
    with both, tshark opens IKE_AUTH.  One flipped bit of SK_ei or SK_er and it cannot."""
    tshark = needs.tshark()
    ike_keys = ike_keyfile_path(lab.keyfile)
    assert oct(os.stat(ike_keys).st_mode & 0o777) == "0o600"
    assert _ike_auth_problems(_ike_rows(tshark, lab)) == []
    header, line, *rest = open(ike_keys).read().splitlines()
    for field in (2, 3):                                   # SK_ei, SK_er
        bad = line.split(",")
        bad[field] = f"{int(bad[field][:2], 16) ^ 1:02x}" + bad[field][2:]
        wrong = tmp_path / f"wrong{field}"
        wrong.write_text("\n".join([header, ",".join(bad), *rest]) + "\n")
        assert _ike_auth_problems(_ike_rows(tshark, lab, str(wrong))), field


def test_sigterm_cleans_up_and_sigkill_leaves_nothing_after_down(lab):
    # SIGTERM: the HA removes its TUN device and its control socket, and exits 0.
    ha_pid = lab.pid("ha")
    os.kill(ha_pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while pid_alive(ha_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(ha_pid)
    assert "htun0" not in lab.exec("ha", "ip", "link").stdout
    assert not os.path.exists(lab.socket("ha"))
    # SIGKILL the GW in the middle of the run (its MN away again): nothing survives `lab down`.
    lab.move("b", wait=False)
    time.sleep(0.3)
    pids = [lab.pid(n) for n in ("gw", "mn")]
    os.kill(lab.pid("gw"), signal.SIGKILL)
    proc = labs.cli("lab", "down", "--prefix", PREFIX)
    assert proc.returncode == 0, proc.stderr
    assert existing_namespaces(PREFIX) == []
    for pid in pids:
        assert not pid_alive(pid), pid
    assert not os.path.exists(lab.state_dir)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not any(name in links for name in ("mtun0", "gtun0", "htun0"))


def test_lab_demo_prints_each_move_and_cleans_up(tmp_path):
    """`mipsec lab demo` (the README's first command as root): three moves with timelines,
    interruption and loss per direction, a kept capture, no namespace left."""
    labs.require()
    prefix = labs.prefix("md")
    proc = labs.cli("lab", "demo", "--prefix", prefix, "--delay-ms", "5", "--dwell", "0.8",
                    "--rate", "200", timeout=120)
    try:
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = proc.stdout
        for needle in ("Move 1: to visited network b", "Move 2: to visited network a",
                       "Move 3: back home", "gw-sa-repointed", "rrp-received", "deregistered",
                       "downlink CN->MN: interruption", "uplink   MN->CN: interruption",
                       "whole run CN->MN"):
            assert needle in out, (needle, out)
        kept = [w for line in out.splitlines() for w in line.split()
                if w.endswith("/gw.pcap")]
        assert kept and os.path.exists(kept[0])
        assert existing_namespaces(prefix) == []
    finally:
        Lab(prefix=prefix).down()
        for word in proc.stdout.split():
            if word.startswith("/tmp/mipsec-demo-capture-") and word.endswith("/gw.pcap"):
                shutil.rmtree(os.path.dirname(word), ignore_errors=True)


def test_udp_encapsulated_cbc_lab_decodes_in_tshark(new_lab):
    """The same path with ESP in UDP 4500 (RFC 3948) and AES-CBC + HMAC-SHA2-256; the IKE SA
    is re-keyed and tshark decrypts its CREATE_CHILD_SA exchanges too."""
    tshark = needs.tshark()
    # the IKE SA is re-keyed every 3 s: CREATE_CHILD_SA, then IKE_AUTH-less new keys
    lab = new_lab("mu", place="a", encryption="ENCR_AES_CBC", udp_encap=True,
                  ike={"ike_lifetime_s": 3.0})
    lab.move("b")
    check_location(lab, "b")
    deadline = time.monotonic() + 15
    while not mipsec_status(lab, "gw")["node"]["ike"]["last_rekey_time"]:
        assert time.monotonic() < deadline, "no IKE SA re-key"
        time.sleep(0.2)
    assert ping_cn_to_mn(lab) >= 1
    # IKE_AUTH and the IKE SA's re-key (CREATE_CHILD_SA with KE) decrypt with the IKE key
    # file (AES-CBC + HMAC-SHA2-256: tshark checks every Integrity Checksum Data)
    ike = _ike_rows(tshark, lab)
    assert _ike_auth_problems(ike) == []
    rekeys = [r for r in ike if r[0] == CREATE_CHILD_SA]
    assert len(rekeys) >= 2 and all(r[2] and not r[3] and {SA, "40", "34"} <= set(
        r[1].split(",")) for r in rekeys), rekeys        # SA, Nonce, KE
    assert len(open(ike_keyfile_path(lab.keyfile)).read().splitlines()) >= 3
    all_rows = needs.tshark_fields(tshark, lab.pcap, lab.keyfile,
                                   ["udp.port", "esp.icv_good", "mip.type", "isakmp.ispi"])
    # IKEv2 negotiated the SAs: its packets start on 500 and float to 4500 (NAT-T forced)
    ike = [r for r in all_rows if r[3]]
    assert ike and all(r[0] in ("500,500", "4500,4500") for r in ike), ike[:5]
    assert any(r[0] == "4500,4500" for r in ike), ike[:5]
    rows = [r for r in all_rows if not r[3]]
    assert rows and all(r[0].startswith("4500,4500") for r in rows), rows[:5]
    assert all(r[1] == "1" for r in rows), rows[:5]
    assert {"1", "3"} <= {t for r in rows for t in r[2].split(",") if t}


def _tshark_esp(tshark: str, lab: Lab) -> list[list[str]]:
    """The ESP rows (ip.proto, esp.spi, esp.icv_good, mip.type) of the GW's capture."""
    rows = needs.tshark_fields(tshark, lab.pcap, lab.keyfile,
                               ["ip.proto", "esp.spi", "esp.icv_good", "mip.type"])
    return [r for r in rows if r[0].split(",")[0] == "50"]


def test_gw_restart_mn_reestablishes_ikev2_from_its_new_coa(new_lab):
    """The GW daemon restarts (its SAs are gone).  The MN moves to b: its RRQs die at the GW as
    unknown SPI; after max_attempts it re-establishes IKE from b and registers; traffic
    resumes; the restarted GW's key file decrypts its whole capture (every ICV good)."""
    tshark = needs.tshark_in_ci()
    lab = new_lab("mr", place="a", retransmit_initial_s=0.2, max_attempts=3,
                  ike={"dpd_interval_s": 0})
    check_location(lab, "a")
    lab.restart_daemon("gw")
    t0 = time.monotonic()
    lab.move("b", wait=False)
    noticed, registered = lab.wait_mn_event(t0, ("rrp-received",), timeout=20)
    events = [e for e in mipsec_status(lab, "mn")["timeline"] if e["time"] >= t0]
    kinds = [e["kind"] for e in events]
    # the MN finds the restarted GW silent either by max_attempts unanswered requests or,
    # sooner, by the liveness check it sends beside the first one (its address went and
    # came back with the move): either way it re-establishes from b and registers
    for step in ("rrq-sent", "reestablish-requested", "ike-reestablish", "ike-established",
                 "sas-installed", "rrp-received"):
        assert step in kinds, (step, kinds)
    assert ("registration-failed" in kinds or "liveness-check" in kinds
            or any("liveness" in str(e["detail"].get("reason", "")) for e in events)), kinds
    assert kinds.count("rrq-sent") >= 2, kinds        # refused at the GW, then one that worked
    assert kinds.index("reestablish-requested") < kinds.index("rrp-received")
    reest = next(e for e in events if e["kind"] == "ike-reestablish")
    assert reest["detail"]["care_of"] == MN_COA["b"]
    gw = mipsec_status(lab, "gw")
    assert gw["node"]["drops"].get("unknown-spi", 0) >= 1, gw["node"]["drops"]
    check_location(lab, "b")
    assert ping_cn_to_mn(lab) >= 1
    (ike,) = [sa for sa in gw["node"]["ike"]["ike_sas"] if sa["state"] == "established"]
    assert ike["remote"].startswith(MN_COA["b"] + ":")
    t_req = next(e["time"] for e in events if e["kind"] == "reestablish-requested")
    t_done = next(e["time"] for e in events if e["kind"] == "rrp-received")
    print(f"\nre-establishment: {1000 * (t_done - t_req):.1f} ms from giving up to the "
          f"accepted registration ({1000 * (t_done - t0):.0f} ms after the move)")
    if tshark is not None:
        esp = _tshark_esp(tshark, lab)
        assert esp and all(r[2] == "1" for r in esp), esp[:5]
        assert {"1", "3"} <= {t for r in esp for t in r[3].split(",") if t}


def test_mobike_mode_lab_gw_follows_update_sa_addresses(new_lab):
    """handover_mode = "mobike": the MN's UPDATE_SA_ADDRESSES moves the GW's SA, the HA's SIU
    then finds it already there; a child re-key after the move keeps the new CoA; the key
    file covers every SA in the capture."""
    tshark = needs.tshark_in_ci()
    lab = new_lab("mk", place="a", handover_mode="mobike", ike={"child_lifetime_s": 3.0})
    check_location(lab, "a")
    move = lab.move("b")
    check_location(lab, "b")
    gw_events = [e for e in mipsec_status(lab, "gw")["timeline"] if e["time"] >= move["time"]]
    kinds = [e["kind"] for e in gw_events]
    assert "gw-sa-moved-by-mobike" in kinds and "gw-siu-confirms-mobike" in kinds, kinds
    assert kinds.index("gw-sa-moved-by-mobike") < kinds.index("gw-siu-confirms-mobike")
    assert "gw-sa-repointed" not in kinds
    assert ping_cn_to_mn(lab) >= 1
    # re-keys at the new CoA (child lifetime 3 s): still there, traffic still passes
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gw = mipsec_status(lab, "gw")
        rekeyed = [e for e in gw["timeline"] if e["kind"] == "gw-sas-rekeyed"
                   and e["time"] > move["time"]]
        if rekeyed:
            break
        time.sleep(0.2)
    assert rekeyed and rekeyed[-1]["detail"]["care_of"] == MN_COA["b"], gw["timeline"][-5:]
    assert ping_cn_to_mn(lab) >= 1                # (the replies use the new inbound SA)
    check_location(lab, "b")
    if tshark is not None:
        esp = _tshark_esp(tshark, lab)
        spis = {r[1] for r in esp}
        assert len(spis) >= 4, spis               # two children, both directions
        assert esp and all(r[2] == "1" for r in esp), [r for r in esp if r[2] != "1"][:5]

