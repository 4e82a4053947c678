"""mipsec's IKEv2 and ESP against strongSwan's charon, both directions, in network namespaces.

Topology (names carry the pid):  [ns s<pid>: charon, 10.99.0.1, inner 10.98.1.1 on lo]
  --veth--  [ns m<pid>: tests/interop/strongswan/peer.py = IkeEndpoint + mipsec ESP, 10.99.0.2].
charon runs with kernel-libipsec (userspace ESP over its TUN ipsec0, always ESP in UDP 4500), so
the child SA routes 10.98.2.0/24 into ipsec0; mipsec's peer answers ICMP echo for 10.98.2.0/24
that arrives through its ESP and pings 10.98.1.1 through its ESP.  Each test checks: the IKE and
child SA come up, the child keys equal the ones charon logs, traffic passes both ways, child
re-key (with PFS for GCM) and IKE re-key keep traffic flowing, a DELETE is honoured, and (mipsec
initiating) a MOBIKE address change is followed by charon.

Needs root, iproute2 and Debian's strongswan + libcharon-extra-plugins: in CI (CI=true) a
missing requirement FAILS the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

import needs

pytestmark = [pytest.mark.strongswan, pytest.mark.timeout(180)]

HERE = Path(__file__).parent / "strongswan"
ROOT = Path(__file__).resolve().parents[2]
PSK = "correct horse battery staple"
CHARON_ADDR, MIPSEC_ADDR, MIPSEC_MOVED = "10.99.0.1", "10.99.0.2", "10.99.0.3"
CHARON_INNER, MIPSEC_INNER = "10.98.1.1", "10.98.2.1"
CHARON_NET, MIPSEC_NET = "10.98.1.0/24", "10.98.2.0/24"
LIBIPSEC = "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so"


def _require() -> None:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("ip", "ipsec", "unshare", "ping"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not os.path.exists(LIBIPSEC):
        missing.append("libcharon-extra-plugins (kernel-libipsec)")
    needs.need("strongSwan interop needs " + ", ".join(missing) if missing else None)


def _run(*cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


class Lab:
    """Two namespaces, one charon, one mipsec peer; everything removed in ``close``."""

    _n = 0

    def __init__(self, tmp: Path, *, ike: str, esp: str, mipsec_ike: list[str],
                 mipsec_esp: list[str], pfs: str | None = None, cookies: bool = False):
        Lab._n += 1
        tag = f"{os.getpid() % 100000}{Lab._n}"
        self.ns_s, self.ns_m = f"mipsec-ss{tag}", f"mipsec-mp{tag}"
        self.veth_s, self.veth_m = f"vss{tag}"[:15], f"vsm{tag}"[:15]
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.run_dir.mkdir()
        self.log = tmp / "charon.log"
        self.charon: subprocess.Popen | None = None
        self.peer: subprocess.Popen | None = None
        self._netns_made: list[str] = []
        self.ike, self.esp = ike, esp
        self.cookies = cookies         # mipsec demands a cookie (§2.6) before keeping state
        self.peer_cfg = {
            "address": MIPSEC_ADDR, "peer": CHARON_ADDR, "inner": MIPSEC_NET,
            "ike": {"local_id": "mn@example", "remote_id": "gw.example",
                    "psks": {"gw.example": PSK}, "ike_proposals": mipsec_ike,
                    "esp_proposals": mipsec_esp, "local_ts": [MIPSEC_NET],
                    "remote_ts": [CHARON_NET], "force_encap": True, "pfs_group": pfs or 0,
                    "dpd_interval_s": None, "ike_lifetime_s": None, "child_lifetime_s": None,
                    "cookie_threshold": 0 if cookies else None}}

    # --- set-up -----------------------------------------------------------------------------
    def start(self) -> Lab:
        for ns in (self.ns_s, self.ns_m):
            _run("ip", "netns", "add", ns)
            self._netns_made.append(ns)
        _run("ip", "link", "add", self.veth_s, "netns", self.ns_s, "type", "veth",
             "peer", "name", self.veth_m, "netns", self.ns_m)
        for ns, dev, addr in ((self.ns_s, self.veth_s, CHARON_ADDR),
                              (self.ns_m, self.veth_m, MIPSEC_ADDR)):
            _run("ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", self.ns_s, "addr", "add", CHARON_INNER + "/32", "dev", "lo")
        values = dict(log=self.log, left=CHARON_ADDR, right=MIPSEC_ADDR, left_subnet=CHARON_NET,
                      right_subnet=MIPSEC_NET, ike=self.ike, esp=self.esp, psk=PSK)
        for name in ("strongswan.conf", "ipsec.conf", "ipsec.secrets"):
            text = string.Template((HERE / f"{name}.in").read_text()).substitute(values)
            (self.tmp / name).write_text(text)
        # a private /run (charon's pid file and stroke socket have fixed paths) and private
        # /etc/ipsec.* in a mount namespace of its own; exec all the way down so that our child
        # is the starter itself
        self.charon = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_s, "unshare", "-m", "--propagation", "private",
             "sh", "-c", self._mounts() + " && exec ipsec start --nofork"],
            env=dict(os.environ, STRONGSWAN_CONF=str(self.tmp / "strongswan.conf")),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait(lambda: "added configuration 'mip'" in self.charon_log(), 15, "charon start")
        self.peer = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_m, sys.executable, str(HERE / "peer.py"),
             json.dumps(self.peer_cfg)],
            env=dict(os.environ, MIPSEC_ROOT=str(ROOT)), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=open(self.tmp / "peer.err", "w"), text=True,
            start_new_session=True)
        assert self._read(10).get("ready"), "mipsec peer did not start"
        return self

    def _mounts(self) -> str:
        return (f"mount --bind {self.run_dir} /run"
                f" && mount --bind {self.tmp / 'ipsec.conf'} /etc/ipsec.conf"
                f" && mount --bind {self.tmp / 'ipsec.secrets'} /etc/ipsec.secrets")

    def _wait(self, pred, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            if self.charon is not None and self.charon.poll() is not None:
                raise AssertionError(f"charon exited during {what}:\n{self.charon_log()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"timed out: {what}\n{self.charon_log()[-3000:]}")

    # --- talking to both sides ------------------------------------------------------------------
    def charon_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ipsec(self, *args: str, timeout: float = 20) -> str:
        r = _run("ip", "netns", "exec", self.ns_s, "unshare", "-m", "sh", "-c",
                 self._mounts() + " && ipsec " + " ".join(args), check=False, timeout=timeout)
        return r.stdout + r.stderr

    def _read(self, timeout: float) -> dict:
        r, _, _ = select.select([self.peer.stdout], [], [], timeout)
        if not r:
            raise AssertionError("mipsec peer did not answer\n"
                                 + (self.tmp / "peer.err").read_text()[-3000:])
        line = self.peer.stdout.readline()
        if not line:
            raise AssertionError("mipsec peer exited\n" + (self.tmp / "peer.err").read_text()[-3000:])
        return json.loads(line)

    def cmd(self, op: str, timeout: float = 30, **kw) -> dict:
        self.peer.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.peer.stdin.flush()
        return self._read(timeout)

    def expect(self, op: str, **kw) -> dict:
        resp = self.cmd(op, **kw)
        assert resp.get("ok"), (op, kw, resp, self.charon_log()[-4000:])
        return resp

    def ping_from_charon(self, count: int = 3) -> str:
        """charon's side pings an address behind mipsec: out through strongSwan's ESP, answered
        through mipsec's."""
        before = self.cmd("status")["echo_answered"]
        ping = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_s, "ping", "-c", str(count), "-i", "0.2", "-W", "3",
             "-I", CHARON_INNER, MIPSEC_INNER], stdout=subprocess.PIPE, text=True)
        served = self.cmd("serve", answered=before + count, timeout=20)
        out = ping.communicate(timeout=20)[0]
        assert ping.returncode == 0 and served["ok"], (out, served, self.charon_log()[-3000:])
        return out

    def ping_from_mipsec(self, count: int = 3) -> None:
        self.expect("ping", src=MIPSEC_INNER, dst=CHARON_INNER, count=count)

    def traffic_both_ways(self) -> None:
        self.ping_from_charon()
        self.ping_from_mipsec()

    def capture_start(self) -> None:
        """tshark on mipsec's veth (in its namespace) until ``capture_check``."""
        self.pcap = self.tmp / "esp.pcap"
        self.tshark = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_m, "tshark", "-q", "-i", self.veth_m, "-f", "udp",
             "-w", str(self.pcap)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        line = ""
        end = time.monotonic() + 15
        while "Capturing on" not in line and time.monotonic() < end:
            r, _, _ = select.select([self.tshark.stderr], [], [], 1)
            line = self.tshark.stderr.readline() if r else line

    def capture_check(self) -> list[tuple[str, str, str]]:
        """Stop the capture and decrypt it with the keys of mipsec's SAs (which must equal
        charon's): the ICMP packets Wireshark finds inside the ESP-in-UDP datagrams."""
        time.sleep(0.3)
        os.killpg(self.tshark.pid, signal.SIGINT)
        self.tshark.communicate(timeout=10)
        cmd = ["tshark", "-r", str(self.pcap), "-o", "esp.enable_encryption_decode:TRUE",
               "-o", "esp.enable_authentication_check:TRUE"]
        for rec in self.expect("status")["uat"]:
            cmd += ["-o", f"uat:esp_sa:{rec}"]
        cmd += ["-Y", "icmp", "-T", "fields", "-E", "separator=|", "-e", "ip.src", "-e", "ip.dst",
                "-e", "icmp.type"]
        out = _run(*cmd, timeout=30).stdout
        return [tuple(line.split("|")) for line in out.splitlines() if line]

    def charon_child_keys(self) -> set[str]:
        """Every ESP key charon logged (chd 4 hex dumps), as lower-case hex."""
        keys, current = set(), None
        for line in self.charon_log().splitlines():
            m = re.search(r"\[CHD\] (encryption|integrity) (initiator|responder) key =>", line)
            if m:
                if current:
                    keys.add(current)
                current = ""
                continue
            m = re.search(r"\[CHD\]\s+\d+: ((?:[0-9A-F]{2} ?)+)", line)
            if m and current is not None:
                current += m.group(1).replace(" ", "").lower()
                continue
            if current:
                keys.add(current)
            current = None
        if current:
            keys.add(current)
        return keys

    def assert_keys_match_charon(self) -> None:
        st = self.expect("status")
        logged = self.charon_child_keys()
        assert st["keys"], st
        for k in st["keys"]:
            for name in ("encr_in", "encr_out", "integ_in", "integ_out"):
                if k[name]:
                    assert k[name] in logged, (name, k, sorted(logged))

    def ike_spis(self) -> list[str]:
        """Established IKE SAs of the mipsec side as strongSwan prints SPIs (``spi_i_i*``)."""
        return [f"{s['spi_i']}_i" for s in self.expect("status")["ike"]["ike_sas"]
                if s["state"] == "established"]

    def charon_sas(self) -> str:
        return self.ipsec("statusall")

    # --- tear-down -----------------------------------------------------------------------------
    def close(self) -> None:
        if self.peer is not None:
            try:
                if self.peer.poll() is None:
                    self.peer.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    self.peer.stdin.flush()
                    self.peer.wait(3)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
            if self.peer.poll() is None:
                os.killpg(self.peer.pid, signal.SIGKILL)
                self.peer.wait(5)
        if self.charon is not None:
            if self.charon.poll() is None:
                self.charon.terminate()              # the starter stops its charon
                try:
                    self.charon.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.charon.pid, signal.SIGKILL)
                    self.charon.wait(5)
            pid_file = self.run_dir / "charon.pid"
            if pid_file.exists():                    # a charon that outlived its starter
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
                except (ValueError, ProcessLookupError):
                    pass
        for ns in self._netns_made:
            _run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def lab_factory(tmp_path):
    _require()
    labs: list[Lab] = []

    def make(**kw) -> Lab:
        sub = tmp_path / f"lab{len(labs)}"
        sub.mkdir()
        lab = Lab(sub, **kw)
        labs.append(lab)
        return lab.start()
    yield make
    for lab in labs:
        lab.close()


SUITES = {
    # charon ike, charon esp, mipsec ike proposals, mipsec esp proposals, mipsec PFS group
    "cbc": ("aes256-sha256-ecp256", "aes128-sha256",
            ["aes256-sha256-prfsha256-ecp256"], ["aes128-sha256"], None),
    "gcm-pfs": ("aes128gcm16-prfsha256-curve25519", "aes256gcm16-ecp256",
                ["aes128gcm16-prfsha256-x25519"], ["aes256gcm16"], "ecp256"),
    # MODP-2048; mipsec's first KE (X25519) is refused with INVALID_KE_PAYLOAD and retried
    "modp-pfs": ("aes256-sha256-modp2048", "aes256-sha256-modp2048",
                 ["aes256-sha256-prfsha256-x25519", "aes256-sha256-prfsha256-modp2048"],
                 ["aes256-sha256"], "modp2048"),
}


@pytest.mark.parametrize("suite", SUITES)
def test_mipsec_initiates(lab_factory, suite):
    ike, esp, m_ike, m_esp, pfs = SUITES[suite]
    lab = lab_factory(ike=ike, esp=esp, mipsec_ike=m_ike, mipsec_esp=m_esp, pfs=pfs)
    lab.expect("initiate")
    lab.expect("wait", event="ChildSaEstablished", timeout=10)
    assert "ESTABLISHED" in lab.charon_sas()
    if suite == "modp-pfs":
        assert "N(INVAL_KE)" in lab.charon_log()              # charon asked for MODP-2048
    lab.assert_keys_match_charon()
    lab.capture_start()
    lab.traffic_both_ways()
    # Wireshark decrypts what went over the wire: echo requests and replies, both ways, inner
    # addresses (outer 10.99.0.x, ESP in UDP 4500), so both ESP implementations agree with it
    icmp = lab.capture_check()
    for want in ((CHARON_INNER, MIPSEC_INNER, "8"), (MIPSEC_INNER, CHARON_INNER, "0"),
                 (MIPSEC_INNER, CHARON_INNER, "8"), (CHARON_INNER, MIPSEC_INNER, "0")):
        assert any(p[0].split(",")[-1] == want[0] and p[1].split(",")[-1] == want[1]
                   and p[2].split(",")[-1] == want[2] for p in icmp), (want, icmp)

    lab.expect("rekey_child")                                  # CREATE_CHILD_SA (PFS for gcm)
    lab.expect("wait", event="ChildSaDeleted", timeout=10)
    ke = " KE" if pfs else ""
    assert re.search(rf"parsed CREATE_CHILD_SA request \d+ \[ N\(REKEY_SA\) SA No{ke} TSi TSr \]",
                     lab.charon_log()), lab.charon_log()[-3000:]
    lab.assert_keys_match_charon()
    lab.traffic_both_ways()

    before = lab.ike_spis()
    lab.expect("rekey_ike")                                    # §2.18, then DELETE of the old
    lab.expect("wait", event="IkeSaDeleted", timeout=10)
    after = lab.ike_spis()
    assert after and after != before and after[0] in lab.charon_sas(), (before, after)
    assert re.search(r"parsed CREATE_CHILD_SA request \d+ \[ SA No KE \]", lab.charon_log())
    lab.traffic_both_ways()

    lab.expect("dpd")                                          # liveness check answered
    if suite == "cbc":
        # MOBIKE: mipsec moves to another address, charon follows the UPDATE_SA_ADDRESSES
        deleted = lab.expect("status")["counts"].get("ChildSaDeleted", 0)
        lab.expect("move", address=MIPSEC_MOVED, dev=lab.veth_m)
        lab.expect("wait", event="PeerAddressChanged", timeout=10)
        # kernel-libipsec cannot move an SA, so charon re-keys the child onto the new path
        # (ike_mobike.c); traffic is only expected once that is done
        lab.cmd("wait", event="ChildSaDeleted", count=deleted + 1, timeout=10)
        assert MIPSEC_MOVED in lab.charon_sas()
        lab.traffic_both_ways()

    lab.expect("delete")
    lab.expect("wait", event="IkeSaDeleted", count=2, timeout=10)
    assert "0 up" in lab.charon_sas()
    st = lab.expect("status")
    assert not st["esp_drops"] and not st["ike"]["drops"], st


@pytest.mark.parametrize("suite", SUITES)
def test_strongswan_initiates(lab_factory, suite):
    ike, esp, m_ike, m_esp, pfs = SUITES[suite]
    cookies = suite == "gcm-pfs"
    lab = lab_factory(ike=ike, esp=esp, mipsec_ike=m_ike, mipsec_esp=m_esp, pfs=pfs,
                      cookies=cookies)
    up = subprocess.Popen(["ip", "netns", "exec", lab.ns_s, "unshare", "-m", "sh", "-c",
                           lab._mounts() + " && ipsec up mip"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lab.expect("wait", event="ChildSaEstablished", timeout=15)
    out = up.communicate(timeout=20)[0]
    assert "established successfully" in out, out
    if cookies:                          # charon got our cookie and sent its request again
        assert re.search(r"parsed IKE_SA_INIT response 0 \[ N\(COOKIE\) \]", lab.charon_log())
        assert re.search(r"generating IKE_SA_INIT request 0 \[ N\(COOKIE\) SA KE No",
                         lab.charon_log())
    lab.assert_keys_match_charon()
    lab.traffic_both_ways()

    lab.ipsec("stroke", "rekey", "'mip{*}'")                  # charon re-keys the child
    lab.expect("wait", event="ChildSaDeleted", timeout=10)
    ke = " KE" if pfs else ""
    assert re.search(rf"parsed CREATE_CHILD_SA response \d+ \[ SA No{ke} TSi TSr \]",
                     lab.charon_log()), lab.charon_log()[-3000:]
    lab.assert_keys_match_charon()
    lab.traffic_both_ways()

    before = lab.ike_spis()
    lab.ipsec("stroke", "rekey", "'mip[*]'")                  # charon re-keys the IKE SA
    lab.expect("wait", event="IkeSaDeleted", timeout=10)
    after = lab.ike_spis()
    assert after and after != before and after[0] in lab.charon_sas(), (before, after)
    lab.traffic_both_ways()

    deleted = lab.expect("status")["counts"].get("ChildSaDeleted", 0)
    answers = len(re.findall(r"parsed INFORMATIONAL response \d+ \[ D \]", lab.charon_log()))
    lab.ipsec("down", "'mip{*}'")                              # charon deletes the child only
    lab.expect("wait", event="ChildSaDeleted", count=deleted + 1, timeout=10)
    assert lab.expect("status")["children"] == []
    # we answered with the Delete of our inbound half (§1.4.1)
    assert len(re.findall(r"parsed INFORMATIONAL response \d+ \[ D \]",
                          lab.charon_log())) == answers + 1

    lab.ipsec("down", "mip")                                   # charon deletes: we honour it
    lab.expect("wait", event="IkeSaDeleted", count=2, timeout=10)
    st = lab.expect("status")
    assert st["children"] == [] and not [s for s in st["ike"]["ike_sas"]
                                         if s["state"] == "established"]
    assert not st["esp_drops"] and not st["ike"]["drops"], st
