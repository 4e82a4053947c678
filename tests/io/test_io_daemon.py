"""The daemon glue without root: three Daemon objects around the real roles, on in-memory TUN
and net fakes, wired by destination address.  A handover triggered over the MN's control command
goes MN -> GW -> HA -> SIU -> GW -> MN exactly as in the lab; the GW's capture holds only its
outside traffic; the key file lists the configured SAs; the netlink rules map addresses to
events."""

from __future__ import annotations

import json
import random
import socket
import threading

import pytest

from daemon_fakes import close_daemons, pump, start_daemons
from mipsec.config import KeySetLayout, make_key_set
from mipsec.io import control
from mipsec.io.netlink import RTM_DELADDR, RTM_NEWADDR, AddressWatcher
from mipsec.io.pcap import read_pcap
from mipsec.node.actions import CareOfAddressChanged, ReturnedHome
from mipsec.node.packet import build_udp_packet


@pytest.fixture
def daemons(tmp_path):
    import dataclasses
    sets = make_key_set(1, KeySetLayout(run_dir=str(tmp_path), pcap_dir=str(tmp_path)),
                        keys_from=random.Random(3))
    for name in ("ha", "mn"):                      # only the GW captures
        cfg = sets[name]
        sets[name] = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, pcap=""))
    out = start_daemons(sets)
    yield out
    close_daemons(out)


def test_handover_command_runs_the_whole_registration(daemons, tmp_path):
    reply = daemons["mn"].handle_command("handover", ["172.16.2.10", "vb0"])
    assert reply == {"ok": True, "handover": "172.16.2.10"}
    pump(daemons)
    mn = daemons["mn"].status()
    gw = daemons["gw"].status()
    ha = daemons["ha"].status()
    json.dumps([mn, gw, ha])                                  # JSON-able for `mipsec status`
    assert mn["node"]["state"] == "registered" and mn["node"]["care_of"] == "172.16.2.10"
    mobile = gw["node"]["mobiles"]["10.1.0.100"]
    assert mobile["care_of"] == "172.16.2.10"
    assert mobile["sas"]["outbound"]["remote"] == "172.16.2.10"
    assert ha["node"]["bindings"]["10.1.0.100"]["care_of"] == "172.16.2.10"
    kinds = [e["kind"] for e in sorted(mn["timeline"] + gw["timeline"] + ha["timeline"],
                                       key=lambda e: e["time"])]
    for step in ("coa-changed", "rrq-sent", "rrq-forwarded", "rrq-accepted", "siu-sent",
                 "gw-sa-repointed", "rrp-forwarded", "rrp-received"):
        assert step in kinds, (step, kinds)
    assert all(d.loop.stats["bugs"] == 0 for d in daemons.values())
    # The GW's capture: only packets from or to its outside address (no SIU from the inside).
    outside = socket.inet_aton("172.16.0.1")
    records = read_pcap(tmp_path / "gw.pcap")
    assert len(records) >= 2
    assert all(p[12:16] == outside or p[16:20] == outside for _, p in records)
    # ... and the key file names the two SAs of the MN.
    lines = [ln for ln in open(tmp_path / "gw.pcap.esp_sa") if not ln.startswith("#")]
    assert sorted(ln.split(",")[3] for ln in lines) == ['"0x10000000"', '"0x20000000"']
    # Home again: the MN deregisters directly with the HA.
    assert daemons["mn"].handle_command("home", [])["ok"]
    pump(daemons)
    assert "10.1.0.100" not in daemons["ha"].status()["node"]["bindings"]


def test_control_commands_and_errors(daemons):
    gw = daemons["gw"]
    assert gw.handle_command("handover", ["1.2.3.4"])["error"].startswith("handover: only")
    mn = daemons["mn"]
    assert "not an IPv4 address" in mn.handle_command("handover", ["nowhere"])["error"]
    assert "usage" in mn.handle_command("handover", [])["error"]
    assert "unknown command" in mn.handle_command("reboot", [])["error"]
    assert mn.handle_command("timeline", [])["timeline"] == []


def test_status_over_the_control_socket(daemons):
    gw = daemons["gw"]
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        control.request(gw.cfg.control_socket, "status", timeout=5)))
    thread.start()
    for _ in range(50):
        gw.loop.run_once(max_wait=0.05)
        if not thread.is_alive():
            break
    thread.join()
    assert result["ok"] and result["role"] == "gw" and result["node"]["outside"] == "172.16.0.1"


def test_closing_removes_the_control_socket(daemons):
    import os
    path = daemons["ha"].cfg.control_socket
    assert os.path.exists(path)
    daemons["ha"].close()
    assert not os.path.exists(path) and daemons["ha"].tun.closed


@pytest.fixture
def watcher():
    w = AddressWatcher(["va0", "vb0"], "10.1.0.0/24", ["home0"])
    yield w
    w.close()


@pytest.mark.parametrize("kind, ifname, address, expected", [
    (RTM_NEWADDR, "va0", "172.16.1.10", CareOfAddressChanged("172.16.1.10", "va0")),
    (RTM_NEWADDR, "vb0", "192.0.2.7", CareOfAddressChanged("192.0.2.7", "vb0")),
    (RTM_NEWADDR, "home0", "10.1.0.100", ReturnedHome("home0")),
    # a home-prefix address on a visited interface (a hostile DHCP server) is neither home nor a
    # care-of address: "at home" is decided on the home interface only
    (RTM_NEWADDR, "va0", "10.1.0.100", None),
    (RTM_NEWADDR, "vb0", "10.1.0.77", None),
    (RTM_NEWADDR, "home0", "192.0.2.9", None),                       # not a visited interface
    (RTM_NEWADDR, "mtun0", "10.1.0.100", None),                      # our own TUN: ignored
    (RTM_NEWADDR, "eth9", "172.16.1.10", None),
    (RTM_DELADDR, "va0", "172.16.1.10", None),                       # removal starts nothing
])
def test_address_events(watcher, kind, ifname, address, expected):
    assert watcher.classify(kind, ifname, address) == expected


def test_run_daemon_without_privileges_says_so_in_one_line(tmp_path, monkeypatch, caplog):
    """No root: one error line naming the file and what is missing, exit status 1, nothing left."""
    import dataclasses

    from mipsec.config import write_config
    from mipsec.io import daemon as daemon_module

    cfg = make_key_set(1, KeySetLayout(run_dir=str(tmp_path)), keys_from=random.Random(5))["gw"]
    cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, inside_interface="lo"))
    # addresses of this machine (loopback), so the start gets as far as creating the TUN device
    cfg = dataclasses.replace(cfg, node=dataclasses.replace(
        cfg.node, outside_address="127.0.0.1", inside_address="127.0.0.2"))
    path = tmp_path / "gw.toml"
    write_config(cfg, path)

    def no_tun(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(daemon_module.tunmod, "LinuxTun", no_tun)
    assert daemon_module.run_daemon(str(path), "gw") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(path) in errors[0] and "needs root" in errors[0]
    assert not (tmp_path / "gw.sock").exists()


def test_unreadable_config_is_a_config_error(tmp_path):
    from mipsec.config import load_config
    from mipsec.errors import ConfigError
    path = tmp_path / "dir.toml"
    path.mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)


def test_timeline_command_gives_what_is_new_or_the_newest(daemons):
    # pollers (the lab's move waits, the soak's sampler) ask for what is new: each whole copy
    # of a long timeline raised the daemon's memory high-water mark with the timeline
    mn = daemons["mn"]
    mn.handle_command("handover", ["172.16.2.10", "vb0"])
    pump(daemons)
    whole = mn.handle_command("timeline", [])["timeline"]
    assert len(whole) >= 4
    times = [e["time"] for e in whole]
    later = [e for e in whole if e["time"] >= times[-1]]
    assert 0 < len(later) < len(whole)
    assert mn.handle_command("timeline", ["since", repr(times[-1])])["timeline"] == later
    assert mn.handle_command("timeline", ["since", repr(times[-1] + 1.0)])["timeline"] == []
    assert mn.handle_command("timeline", ["last", "2"])["timeline"] == whole[-2:]
    assert mn.handle_command("timeline", ["last", "0"])["timeline"] == []
    assert mn.handle_command("timeline", ["since", repr(times[1]), "last", "1"]
                             )["timeline"] == whole[-1:]
    for bad in (["since"], ["since", "soon"], ["last", "x"], ["first", "3"]):
        reply = mn.handle_command("timeline", bad)
        assert not reply["ok"] and reply["error"].startswith("usage: timeline"), bad


def _esp_spis_in(path) -> set[int]:
    """SPIs of the ESP packets (raw ESP, protocol 50) in a capture file."""
    if not path.exists():
        return set()
    out = set()
    for _ts, p in read_pcap(path):
        ihl = (p[0] & 0x0F) * 4
        if p[9] == 50:
            out.add(int.from_bytes(p[ihl:ihl + 4], "big"))
    return out


def test_key_files_follow_the_kept_captures_not_every_rekey(tmp_path):
    # with IKEv2 every re-key adds an SA; a bounded capture keeps only its newest files, so the
    # key files keep the SAs those files can hold (each one still decrypts), not every SA ever
    import dataclasses

    sets = make_key_set(1, KeySetLayout(run_dir=str(tmp_path), pcap_dir=str(tmp_path)),
                        keys_from=random.Random(5), sa_source="ikev2",
                        ike={"child_lifetime_s": 3600, "ike_lifetime_s": 7200,
                             "dpd_interval_s": 0})
    for name in ("ha", "mn"):
        cfg = sets[name]
        sets[name] = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, pcap=""))
    cfg = sets["gw"]
    sets["gw"] = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, pcap_keep=1))
    daemons = start_daemons(sets)
    try:
        gw, mn = daemons["gw"], daemons["mn"]
        gw.role.book.grace_s = 0.0                # no waiting for retired inbound SAs here
        gw.pcap.max_bytes = 1500                  # rotate every exchange or two
        mn.handle_command("handover", ["172.16.2.10", "vb0"])
        pump(daemons)
        assert mn.status()["node"]["state"] == "registered"
        spis_used = set()
        for _ in range(30):
            (sa,) = [s for s in gw.role.ike.endpoint.ike_sas if s.is_established]
            newest = max(sa.children.values(), key=lambda c: c.created)
            spis_used |= {newest.spi_in, newest.spi_out}
            now = gw.loop.clock()
            gw.loop.dispatch(gw.role._ike_outputs(sa.rekey_child(newest.spi_in, now), now))
            pump(daemons)
            # traffic on the SAs of now, so that every capture file holds ESP
            for _ in range(3):
                mn.tun.inject(build_udp_packet(socket.inet_aton("10.1.0.100"),
                                               socket.inet_aton("10.1.0.10"), 5000, 5000,
                                               b"x" * 100))
            pump(daemons)
        assert gw.pcap.rotations >= 20, gw.pcap.rotations
        pcap = tmp_path / "gw.pcap"
        lines = [line for line in open(str(pcap) + ".esp_sa") if not line.startswith("#")]
        in_file = {int(line.split(",")[3].strip('"'), 16) for line in lines}
        captured = _esp_spis_in(pcap) | _esp_spis_in(tmp_path / "gw.pcap.1")
        assert captured and captured <= in_file            # every kept capture decrypts
        assert len(spis_used) >= 60 and len(in_file) < len(spis_used) / 2, (in_file, spis_used)
        assert len(gw._esp_keys) == len(in_file)
        ike_lines = [line for line in open(str(pcap) + ".ikev2_decryption_table")
                     if not line.startswith("#")]
        assert 1 <= len(ike_lines) <= 3
    finally:
        close_daemons(daemons)


def test_memory_command_names_the_lines_that_grew(daemons):
    import tracemalloc

    from mipsec.io.memory import MemoryProbe, frames_from_env
    mn = daemons["mn"]
    reply = mn.handle_command("memory", [])
    assert reply["ok"] and reply["rss_kb"] > 0 and "grown" not in reply
    if not tracemalloc.is_tracing():
        assert not reply["tracing"] and "MIPSEC_TRACEMALLOC" in reply["hint"]
    for bad in (["top"], ["top", "0"], ["top", "x"], ["bottom", "3"]):
        assert mn.handle_command("memory", bad)["error"].startswith("usage: memory"), bad
    assert frames_from_env({}) == 0 and frames_from_env({"MIPSEC_TRACEMALLOC": "3"}) == 3
    for bad_env in ("0", "many", "65"):
        with pytest.raises(ValueError, match="MIPSEC_TRACEMALLOC"):
            frames_from_env({"MIPSEC_TRACEMALLOC": bad_env})
    was_tracing = tracemalloc.is_tracing()
    probe = MemoryProbe()
    probe.start(1)
    try:
        kept = [bytearray(1000) for _ in range(200)]          # this line grows by ~200 kB
        first = probe.report(top=5)
        assert first["tracing"] and first["traced_kb"] > 150
        grown = first["grown"][0]
        assert grown["where"].endswith(f"test_io_daemon.py:{_line_of('bytearray(1000)')}")
        assert grown["kb_diff"] > 150 and grown["count_diff"] >= 200
        second = probe.report(top=5)                          # compared with the first now
        assert all(g["kb_diff"] < 150 for g in second["grown"])
        del kept
    finally:
        if not was_tracing:
            tracemalloc.stop()


def _line_of(text: str) -> int:
    import inspect
    lines, start = inspect.getsourcelines(test_memory_command_names_the_lines_that_grew)
    return start + next(i for i, line in enumerate(lines) if text in line)
