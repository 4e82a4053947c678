"""Reload: SIGHUP and `mipsec reload` re-read the file and apply only what changed.

Real ``Daemon`` objects on in-memory TUN and net fakes (as in test_io_daemon): an MN is added to
the GW's and the HA's files while another MN streams both ways through them; not one packet of
the stream is lost, the first MN's SAs, binding and counters are untouched, and the new MN
registers.  A file that does not load, or a change that needs a restart, is refused and the
running configuration stays.  A real daemon in a namespace survives SIGHUP (it used to exit
with 129) and reloads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from mipsec import cli
from mipsec.config import KeySetLayout, load_config, make_key_set, write_config
from mipsec.io import control
from mipsec.io.daemon import Daemon
from mipsec.io.transports import FakeNet
from mipsec.io.tun import FakeTun
from mipsec.node.packet import a2b, build_udp_packet

CN = "10.1.0.50"
COA = {"mn1": "172.16.2.10", "mn2": "172.16.3.10"}
HOME = {"mn1": "10.1.0.100", "mn2": "10.1.0.101"}


def only(cfg, homes):
    return dataclasses.replace(cfg, node=dataclasses.replace(
        cfg.node, mobiles=tuple(m for m in cfg.node.mobiles if m.home_address in homes)))


class Net:
    """GW, HA and MNs wired by address: the HA's IP-in-IP and the GW's inner packets for the
    home network cross the GW's TUN; what the GW writes for the CN is counted."""

    def __init__(self, tmp_path):
        self.full = make_key_set(2, KeySetLayout(run_dir=str(tmp_path)),
                                 keys_from=random.Random(12))
        self.paths = {}
        for name, cfg in self.full.items():
            if name in ("gw", "ha"):
                cfg = only(cfg, {HOME["mn1"]})
            self.paths[name] = str(tmp_path / f"{name}.toml")
            write_config(cfg, self.paths[name])
        self.daemons = {}
        for name in ("ha", "gw", "mn1"):
            self.start(name)
        self.cn_received: list[bytes] = []     # the MNs' reverse-tunnelled uplink, at the HA
        self.mn_received: dict[str, list[bytes]] = {}

    def start(self, name):
        cfg = load_config(self.paths[name])
        net = FakeNet(name)
        # the GW's SIU socket on its inside interface: its datagrams go to receive_siu
        inside = [FakeNet("gw-inside", role_entry="receive_siu")] if name == "gw" else []
        d = Daemon(cfg, tun=FakeTun(cfg.daemon.tun), sender=net, receivers=[net, *inside],
                   manage_kernel=False)
        d.start()
        self.daemons[name] = d

    def write(self, name, cfg):
        write_config(cfg, self.paths[name])

    def pump(self, rounds=40):
        gw = self.daemons["gw"].cfg.node
        ha = self.daemons["ha"].cfg.node
        by_coa = {COA[n]: n for n in self.daemons if n.startswith("mn")}
        for _ in range(rounds):
            moved = False
            for name, d in list(self.daemons.items()):
                d.loop.run_once(max_wait=0.0)
                sent = [p for p, _ in d.sender.sent]
                d.sender.sent.clear()
                written = list(d.tun.written)
                d.tun.written.clear()
                for packet in sent:
                    dst = socket.inet_ntoa(packet[16:20])
                    moved = True
                    if dst == gw.inside_address:       # from the home side: the SIU socket
                        self.daemons["gw"].receivers[1].inject(packet)
                    elif dst == gw.outside_address:
                        self.daemons["gw"].sender.inject(packet)
                    elif dst == ha.address:
                        self.daemons["ha"].sender.inject(packet)
                    elif name == "ha":             # IP-in-IP / replies to a CoA: via the GW
                        self.daemons["gw"].tun.inject(packet)
                    elif dst in by_coa:
                        self.daemons[by_coa[dst]].sender.inject(packet)
                for packet in written:
                    dst = socket.inet_ntoa(packet[16:20])
                    moved = True
                    if name.startswith("mn"):
                        self.mn_received.setdefault(name, []).append(packet)
                    elif name == "ha" and dst == CN:
                        self.cn_received.append(packet)
                    elif name == "gw" and dst == ha.address:
                        self.daemons["ha"].sender.inject(packet)
            if not moved:
                break

    def close(self):
        for d in self.daemons.values():
            d.close()
            d.sender.close()


@pytest.fixture
def net(tmp_path):
    n = Net(tmp_path)
    yield n
    n.close()


def datagram(src, dst, seq):
    return build_udp_packet(a2b(src), a2b(dst), 5000, 5001, seq.to_bytes(4, "big") + bytes(60))


def stream(net, first, count, mn="mn1"):
    """``count`` datagrams each way between the CN and ``mn``'s home address."""
    for seq in range(first, first + count):
        net.daemons[mn].tun.inject(datagram(HOME[mn], CN, seq))
        net.daemons["ha"].tun.inject(datagram(CN, HOME[mn], seq))
        net.pump(4)


def register(net, mn):
    net.daemons[mn].handle_command("handover", [COA[mn], "va0"])
    net.pump()
    assert net.daemons[mn].status()["node"]["state"] == "registered"


def test_adding_an_mn_while_another_streams_loses_nothing(net, caplog):
    caplog.set_level(logging.INFO, logger="mipsec")
    register(net, "mn1")
    gw, ha = net.daemons["gw"], net.daemons["ha"]
    mn1_sas = gw.role.mobiles[HOME["mn1"]]
    stream(net, 0, 50)
    # the operator adds mn2 to both files and reloads (SIGHUP does the same in a daemon)
    net.write("gw", net.full["gw"])
    net.write("ha", net.full["ha"])
    assert gw.handle_command("reload", []) == {"ok": True, "changes": [f"mobile {HOME['mn2']} added"]}
    stream(net, 50, 25)
    assert ha.handle_command("reload", [])["changes"] == [f"mobile {HOME['mn2']} added"]
    stream(net, 75, 25)
    # not one datagram of mn1's stream lost, either way
    up = sorted(int.from_bytes(p[28:32], "big") for p in net.cn_received)
    down = sorted(int.from_bytes(p[28:32], "big") for p in net.mn_received["mn1"])
    assert up == list(range(100))
    assert down == list(range(100)), (len(down), down[:5])
    # mn1 untouched: the same SA objects, still bound to its CoA
    assert gw.role.mobiles[HOME["mn1"]] is mn1_sas
    assert mn1_sas.care_of == COA["mn1"]
    assert HOME["mn1"] in ha.status()["node"]["bindings"]
    # the new MN registers through the reloaded GW and HA
    net.start("mn2")
    register(net, "mn2")
    assert gw.role.mobiles[HOME["mn2"]].care_of == COA["mn2"]
    assert any("reloaded" in r.getMessage() and "added" in r.getMessage() for r in caplog.records)
    # removing it again ends its binding at the HA and its SAs at the GW, and only those
    net.write("gw", only(net.full["gw"], {HOME["mn1"]}))
    net.write("ha", only(net.full["ha"], {HOME["mn1"]}))
    assert gw.handle_command("reload", [])["ok"] and ha.handle_command("reload", [])["ok"]
    net.pump()
    assert HOME["mn2"] not in gw.role.mobiles and HOME["mn2"] not in ha.role.bindings
    assert gw.role.mobiles[HOME["mn1"]] is mn1_sas and HOME["mn1"] in ha.role.bindings


def test_a_changed_mn_ha_key_affects_only_that_mn(net):
    register(net, "mn1")
    net.write("ha", net.full["ha"])
    assert net.daemons["ha"].handle_command("reload", [])["ok"]
    ha = load_config(net.paths["ha"])
    mobiles = list(ha.node.mobiles)
    i = next(i for i, m in enumerate(mobiles) if m.home_address == HOME["mn2"])
    mobiles[i] = dataclasses.replace(mobiles[i], msa=dataclasses.replace(
        mobiles[i].msa, key=bytes(16)))
    net.write("ha", dataclasses.replace(ha, node=dataclasses.replace(ha.node,
                                                                     mobiles=tuple(mobiles))))
    before = net.daemons["ha"].role._msa_by_spi
    mn1_spi = next(m.msa.spi for m in ha.node.mobiles if m.home_address == HOME["mn1"])
    mn1_msa = before[mn1_spi][0]
    reply = net.daemons["ha"].handle_command("reload", [])
    assert reply == {"ok": True, "changes": [f"mobile {HOME['mn2']} changed"]}
    assert net.daemons["ha"].role._msa_by_spi[mn1_spi][0] is mn1_msa
    stream(net, 0, 10)
    assert len(net.mn_received["mn1"]) == 10


def test_an_invalid_file_or_a_restart_change_is_refused_and_the_running_one_stays(net, caplog):
    register(net, "mn1")
    gw = net.daemons["gw"]
    with open(net.paths["gw"], "a") as f:
        f.write("\nnonsense = [\n")
    reply = gw.handle_command("reload", [])
    assert not reply["ok"] and reply["error"].startswith(f"reload refused: {net.paths['gw']}: "
                                                         f"not valid TOML")
    assert any(r.levelname == "ERROR" and "the running configuration stays" in r.getMessage()
               for r in caplog.records)
    cfg = net.full["gw"]
    net.write("gw", dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, tun="other0")))
    reply = gw.handle_command("reload", [])
    assert reply["error"] == (f"reload refused: {net.paths['gw']}: [daemon] tun changed: that "
                              f"needs a restart")
    net.write("gw", dataclasses.replace(cfg, node=dataclasses.replace(
        cfg.node, outside_address="172.16.0.9")))
    reply = gw.handle_command("reload", [])
    assert "[gateway] outside_address changed: that needs a restart" in reply["error"]
    assert HOME["mn2"] not in gw.role.mobiles        # nothing of the refused files applied
    stream(net, 0, 10)
    assert len(net.cn_received) == 10


def test_reload_command_line(net, capsys):
    gw = net.daemons["gw"]
    import threading
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        code=cli.main(["reload", "--socket", gw.cfg.control_socket])))
    net.write("gw", net.full["gw"])
    thread.start()
    while thread.is_alive():
        gw.loop.run_once(max_wait=0.05)
    assert result["code"] == 0
    assert f"mobile {HOME['mn2']} added" in capsys.readouterr().out


def test_sighup_reloads_a_real_daemon(tmp_path):
    import needs
    from mipsec.lab.lab import requirements_problem
    problem = requirements_problem()
    needs.need(problem, f"reload test needs root and namespaces in CI: {problem}")
    ns = f"ops-hup{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "in0", "type", "veth", "peer", "name",
                        "in0p"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.1.0.2/24", "dev", "in0"], check=True)
        for dev in ("in0", "in0p", "lo"):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        sets = make_key_set(2, KeySetLayout(run_dir=str(tmp_path), ha_home_interface="in0"),
                            keys_from=random.Random(3))
        path = str(tmp_path / "ha.toml")
        write_config(only(sets["ha"], {HOME["mn1"]}), path)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "mipsec", "ha",
                                 "--config", path], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        sock = sets["ha"].control_socket
        for _ in range(200):
            try:
                if control.request(sock, "ping", timeout=1.0)["ok"]:
                    break
            except OSError:
                time.sleep(0.1)
        write_config(sets["ha"], path)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None                         # SIGHUP no longer ends it
        assert control.request(sock, "ping", timeout=5.0)["ok"]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
            assert f"reloaded {path}: mobile {HOME['mn2']} added" in err
        subprocess.run(["ip", "netns", "del", ns])
