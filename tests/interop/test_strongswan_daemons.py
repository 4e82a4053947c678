"""strongSwan's charon against the mipsec daemons themselves (not a test peer): the path a
deployment runs, `python -m mipsec gw` with its TUN, policy routing and UDP 500/4500 sockets.

Road warrior (``test_gw_accepts_a_strongswan_road_warrior``), three namespaces whose names carry
the pid::

    [rw<tag>: charon, 10.96.0.2, inner 10.96.9.7/32 on lo] --veth-- [gw<tag>: mipsec gw,
    outside 10.96.0.1, inside 10.96.1.1] --veth-- [hs<tag>: home-side host 10.96.1.20]

charon (Debian strongSwan 5.9 with kernel-libipsec: userspace ESP over its TUN, always ESP in
UDP 4500) initiates with leftsubnet 10.96.9.7/32, rightsubnet 10.96.1.0/24; the GW knows it as a
``road_warrior`` mobile (no Mobile IPv4: no HA, the home side's plain packets for 10.96.9.7 go
through its SA).  Checked: the tunnel comes up, pings pass both ways (each end starts one),
charon re-keys the child (``ipsec stroke rekey``), the GW then holds the new SPIs (equal to
charon's) and pings pass again, counted on the new SAs.

MOBIKE MN (``test_mn_mobike_against_a_strongswan_gateway``)::

    [mn<tag>: mipsec mn, CoA 10.94.0.2 on link a, later 10.94.2.2 on link b] --two veths--
    [cg<tag>: charon, 10.94.0.1 (a), 10.94.2.1 (b), 10.95.1.1 home link] --veth--
    [ha<tag>: mipsec ha, 10.95.1.2 on the home link 10.95.1.0/24]

The MN (handover_mode "mobike") initiates from its CoA (TSi 0.0.0.0/0 narrowed by charon to
10.94.0.0/16, TSr the home prefix).  Its reverse tunnel (IP-in-IP CoA -> HA) and the HA's
downlink (IP-in-IP HA -> CoA) go through the child SA and charon's routing to the real HA
daemon.  charon has no Mobile IPv4 side: the HA's registration reply travels only in the HA-GW
protocol's SIU (docs/protocol.md), which charon does not speak, so the MN's registrations stay
unanswered (the HA binds it all the same, and the data path does not wait for the reply).
Because the tunnel's inner source is the CoA, which is also the IKE peer, charon runs with
``kernel-libipsec.allow_peer_ts`` and fwmarks keeping its own IKE/ESP datagrams out of the
routes to its TUN.  Checked: tunnel up, pings both ways between the home address and charon's
home-link address, the MN's address moves to link b, its UPDATE_SA_ADDRESSES makes charon's SA
show the new address (``ipsec statusall``) and pings pass again.

Needs root, iproute2 and Debian's strongswan + libcharon-extra-plugins: in CI (CI=true) a
missing requirement FAILS the test; elsewhere it skips with the reason (tests/needs.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mipsec.config import config_from_dict, write_config
from mipsec.io import control
from test_strongswan import HERE, ROOT, _require, _run

pytestmark = [pytest.mark.strongswan, pytest.mark.timeout(180)]

PSK = "road warrior pre-shared key"
RW_OUTER, GW_OUTSIDE, GW_INSIDE, HOST = "10.96.0.2", "10.96.0.1", "10.96.1.1", "10.96.1.20"
RW_INNER, HOME_NET = "10.96.9.7", "10.96.1.0/24"

RW_IPSEC_CONF = f"""# charon as a road warrior towards a mipsec GW daemon
config setup
  charondebug="chd 4"

conn rw
  keyexchange=ikev2
  left={RW_OUTER}
  leftid=rw@example
  leftsubnet={RW_INNER}/32
  right={GW_OUTSIDE}
  rightid=@gw.example
  rightsubnet={HOME_NET}
  authby=secret
  ike=aes256-sha256-ecp256!
  esp=aes128-sha256!
  forceencaps=yes
  mobike=no
  auto=add
"""


class Namespaces:
    """Named namespaces, veths and processes; ``close`` removes every one of them."""

    _n = 0

    def __init__(self, tmp: Path):
        Namespaces._n += 1
        self.tag = f"{os.getpid() % 100000}{Namespaces._n}"
        self.tmp = tmp
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.charon_run: list[Path] = []

    def ns(self, short: str) -> str:
        name = f"mipsec-{short}{self.tag}"
        _run("ip", "netns", "add", name)
        self.made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def link(self, a_ns: str, a: str, a_addr: str, b_ns: str, b: str, b_addr: str) -> None:
        a, b = f"{a}{self.tag}"[:15], f"{b}{self.tag}"[:15]
        _run("ip", "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b,
             "netns", b_ns)
        for ns, dev, addr in ((a_ns, a, a_addr), (b_ns, b, b_addr)):
            _run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        return None

    def dev(self, short: str) -> str:
        return f"{short}{self.tag}"[:15]

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait(5)
        for run_dir in self.charon_run:          # a charon that outlived its starter
            pid_file = run_dir / "charon.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
                except (ValueError, ProcessLookupError):
                    pass
        for ns in self.made:
            _run("ip", "netns", "del", ns, check=False)


class Charon:
    """One charon through the ``ipsec`` starter, private /run and /etc/ipsec.* (as in
    tests/interop/test_strongswan.py), with the given ipsec.conf and one PSK line."""

    def __init__(self, nss: Namespaces, ns: str, tmp: Path, ipsec_conf: str, secrets: str):
        self.ns, self.tmp = ns, tmp
        tmp.mkdir()
        self.run_dir = tmp / "run"
        self.run_dir.mkdir()
        self.log = tmp / "charon.log"
        conf = (HERE / "strongswan.conf.in").read_text().replace("$log", str(self.log))
        (tmp / "strongswan.conf").write_text(conf)
        (tmp / "ipsec.conf").write_text(ipsec_conf)
        (tmp / "ipsec.secrets").write_text(secrets)
        (tmp / "ipsec.secrets").chmod(0o600)
        nss.charon_run.append(self.run_dir)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private", "sh", "-c",
             self._mounts() + " && exec ipsec start --nofork"],
            env=dict(os.environ, STRONGSWAN_CONF=str(tmp / "strongswan.conf")),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        nss.procs.append(self.proc)

    def _mounts(self) -> str:
        return (f"mount --bind {self.run_dir} /run"
                f" && mount --bind {self.tmp / 'ipsec.conf'} /etc/ipsec.conf"
                f" && mount --bind {self.tmp / 'ipsec.secrets'} /etc/ipsec.secrets")

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, pred, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            assert self.proc.poll() is None, f"charon exited during {what}:\n{self.text()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"timed out: {what}\n{self.text()[-3000:]}")

    def ipsec(self, *args: str, timeout: float = 30) -> str:
        r = _run("ip", "netns", "exec", self.ns, "unshare", "-m", "sh", "-c",
                 self._mounts() + " && ipsec " + " ".join(args), check=False, timeout=timeout)
        return r.stdout + r.stderr

    def child_spis(self) -> set[int]:
        """The SPIs of charon's installed child SAs (``statusall``: ``SPIs: c1234567_i 89abcdef_o``)."""
        out = self.ipsec("statusall")
        return {int(s, 16) for pair in re.findall(r"SPIs: ([0-9a-f]{8})_i ([0-9a-f]{8})_o", out)
                for s in pair}


def _daemon(nss: Namespaces, ns: str, role: str, cfg: dict, tmp: Path) -> tuple[str, Path]:
    """Write ``cfg`` (checked by the daemons' own loader) and start ``mipsec <role>`` in ``ns``;
    returns its control socket once it answers."""
    path = tmp / f"{role}.toml"
    write_config(config_from_dict(cfg, str(path)), path)
    log = tmp / f"{role}.log"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "mipsec", role, "--config", str(path)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=open(log, "w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    nss.procs.append(proc)
    sock = cfg["daemon"]["control_socket"]
    end = time.monotonic() + 20
    while time.monotonic() < end:
        assert proc.poll() is None, f"{role} daemon exited:\n{log.read_text()[-3000:]}"
        try:
            if control.request(sock, "ping", timeout=1.0).get("ok"):
                return sock, log
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{role} daemon not ready:\n{log.read_text()[-3000:]}")


def _ping(ns: str, dst: str, *, src: str | None = None, count: int = 3) -> None:
    cmd = ["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2", "-W", "3"]
    r = _run(*cmd, *(["-I", src] if src else []), dst, check=False, timeout=30)
    assert r.returncode == 0, (ns, dst, r.stdout, r.stderr)


@pytest.fixture
def nss(tmp_path):
    _require()
    n = Namespaces(tmp_path)
    yield n
    n.close()


def _gw_status(sock: str) -> dict:
    st = control.request(sock, "status")
    return st.get("node", st)


def test_gw_accepts_a_strongswan_road_warrior(nss, tmp_path):
    rw, gw, hs = nss.ns("rw"), nss.ns("gw"), nss.ns("hs")
    nss.link(rw, "rwo", RW_OUTER + "/24", gw, "gwo", GW_OUTSIDE + "/24")
    nss.link(gw, "gwi", GW_INSIDE + "/24", hs, "hsi", HOST + "/24")
    _run("ip", "-n", rw, "addr", "add", RW_INNER + "/32", "dev", "lo")
    _run("ip", "-n", hs, "route", "add", "10.96.9.0/24", "via", GW_INSIDE)

    sock = str(tmp_path / "gw.sock")
    gw_cfg = {
        "role": "gw",
        "daemon": {"tun": nss.dev("gtun"), "inside_interface": nss.dev("gwi"),
                   "control_socket": sock, "sa_source": "ikev2", "state_dir": str(tmp_path),
                   "log_level": "debug"},
        "gateway": {
            "name": "gw", "outside_address": GW_OUTSIDE, "inside_address": GW_INSIDE,
            "ike": {"local_id": "gw.example", "ike_proposals": ["aes256-sha256-prfsha256-ecp256"],
                    "esp_proposals": ["aes128-sha256"], "force_encap": True},
            "mobiles": [{"home_address": RW_INNER, "home_agent": "", "road_warrior": True,
                         "allowed_destinations": [HOME_NET], "ike_id": "rw@example",
                         "psk": PSK.encode().hex()}]}}
    sock, gw_log = _daemon(nss, gw, "gw", gw_cfg, tmp_path)
    charon = Charon(nss, rw, tmp_path / "charon", RW_IPSEC_CONF,
                    f'rw@example @gw.example : PSK "{PSK}"\n')
    charon.wait(lambda: "added configuration 'rw'" in charon.text(), 15, "charon start")

    out = charon.ipsec("up", "rw")
    assert "established successfully" in out, (out, gw_log.read_text()[-3000:])
    st = _gw_status(sock)
    mobile = st["mobiles"][RW_INNER]
    assert mobile["binding"] == "ike-bound" and mobile["care_of"] == RW_OUTER, mobile
    assert mobile["road_warrior"] and mobile["home_agent"] == "", mobile
    spis = charon.child_spis()
    first = {int(mobile["sas"]["inbound"]["spi"], 0), int(mobile["sas"]["outbound"]["spi"], 0)}
    assert first == spis, (first, spis)

    _ping(rw, HOST, src=RW_INNER)            # the road warrior starts: out through charon's ESP
    _ping(hs, RW_INNER)                      # the home side starts: out through the GW's ESP
    mobile = _gw_status(sock)["mobiles"][RW_INNER]
    assert mobile["packets_up"] >= 6 and mobile["packets_down"] >= 6, mobile

    charon.ipsec("stroke", "rekey", "'rw{*}'")          # CREATE_CHILD_SA with N(REKEY_SA)
    charon.wait(lambda: re.search(r"closing CHILD_SA rw\{\d+\} with SPIs", charon.text()),
                15, "child re-key")
    end = time.monotonic() + 10
    while time.monotonic() < end:
        mobile = _gw_status(sock)["mobiles"][RW_INNER]
        now = {int(mobile["sas"]["inbound"]["spi"], 0), int(mobile["sas"]["outbound"]["spi"], 0)}
        if now.isdisjoint(first):
            break
        time.sleep(0.1)
    assert now.isdisjoint(first) and now == charon.child_spis(), (first, now,
                                                                 charon.child_spis())
    assert re.search(r"parsed CREATE_CHILD_SA response \d+ \[ SA No TSi TSr \]", charon.text())
    up, down = mobile["packets_up"], mobile["packets_down"]
    _ping(rw, HOST, src=RW_INNER)
    _ping(hs, RW_INNER)
    after = _gw_status(sock)["mobiles"][RW_INNER]
    assert after["sas"]["inbound"]["spi"] == mobile["sas"]["inbound"]["spi"]
    assert after["packets_up"] >= up + 6 and after["packets_down"] >= down + 6, (mobile, after)
    st = _gw_status(sock)
    assert not st["drops"] and not st["sad_drops"], st


CG_A, CG_B, COA_A, COA_B = "10.94.0.1", "10.94.2.1", "10.94.0.2", "10.94.2.2"
CN, HA_ADDR, MN_HOME, MN_HOME_NET = "10.95.1.1", "10.95.1.2", "10.95.1.100", "10.95.1.0/24"

GW_IPSEC_CONF = f"""# charon as the IKEv2 gateway of a mipsec MN in MOBIKE mode
config setup
  charondebug="chd 4"

conn mn
  keyexchange=ikev2
  left={CG_A}
  leftid=@gw.example
  leftsubnet={MN_HOME_NET}
  right=%any
  rightid=mn@example
  rightsubnet=10.94.0.0/16
  authby=secret
  ike=aes256-sha256-ecp256!
  esp=aes128-sha256!
  forceencaps=yes
  mobike=yes
  auto=add
"""
# the MN's tunnel source (its CoA) is also its IKE address: charon's own datagrams carry a
# fwmark that keeps them out of the routes to its TUN (strongSwan's kernel-libipsec docs)
PEER_TS_PLUGINS = """    kernel-libipsec {
      allow_peer_ts = yes
    }
    socket-default {
      fwmark = 0x42
    }
    kernel-netlink {
      fwmark = !0x42
"""


def _retry_ping(ns: str, dst: str, src: str, timeout: float = 20) -> None:
    """Pings until one is answered (the first packets may meet an SA being set up), then
    three that must all be."""
    end = time.monotonic() + timeout
    while True:
        r = _run("ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", "-I", src, dst,
                 check=False, timeout=10)
        if r.returncode == 0 or time.monotonic() > end:
            break
    _ping(ns, dst, src=src)


def test_mn_mobike_against_a_strongswan_gateway(nss, tmp_path):
    mn, cg, ha = nss.ns("mn"), nss.ns("cg"), nss.ns("ha")
    nss.link(mn, "mna", COA_A + "/24", cg, "cga", CG_A + "/24")
    nss.link(mn, "mnb", "10.94.3.2/32", cg, "cgb", CG_B + "/24")
    _run("ip", "-n", mn, "addr", "flush", "dev", nss.dev("mnb"))    # link b up, no address yet
    nss.link(cg, "cgh", CN + "/24", ha, "hah", HA_ADDR + "/24")
    _run("ip", "-n", ha, "route", "add", "default", "via", CN)
    _run("ip", "netns", "exec", cg, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    charon = Charon(nss, cg, tmp_path / "charon", GW_IPSEC_CONF,
                    f'@gw.example mn@example : PSK "{PSK}"\n')
    conf = (tmp_path / "charon" / "strongswan.conf")
    conf.write_text(conf.read_text().replace("    kernel-netlink {\n", PEER_TS_PLUGINS, 1))
    charon.wait(lambda: "added configuration 'mn'" in charon.text(), 15, "charon start")

    msa = {"spi": 300, "key": "11" * 16}
    ha_cfg = {
        "role": "ha",
        "daemon": {"tun": nss.dev("htun"), "home_interface": nss.dev("hah"),
                   "control_socket": str(tmp_path / "ha.sock"), "store": "memory",
                   "state_dir": str(tmp_path)},
        "home_agent": {
            "name": "ha", "address": HA_ADDR, "home_prefix": MN_HOME_NET,
            # the GW of the HA-GW protocol would be charon: it never answers an SIU
            "gateways": [{"address": CN, "key_id": 1, "key": "22" * 16}],
            "mobiles": [{"home_address": MN_HOME, "msa": msa, "gateway": CN}]}}
    _daemon(nss, ha, "ha", ha_cfg, tmp_path)
    mn_cfg = {
        "role": "mn",
        "daemon": {"tun": nss.dev("mtun"), "interfaces": [nss.dev("mna"), nss.dev("mnb")],
                   "control_socket": str(tmp_path / "mn.sock"), "sa_source": "ikev2",
                   "state_dir": str(tmp_path), "gratuitous_arp": False, "log_level": "debug"},
        "mobile_node": {
            "name": "mn", "home_address": MN_HOME, "home_agent": HA_ADDR, "gateway": CG_A,
            "home_prefix": MN_HOME_NET, "handover_mode": "mobike", "msa": msa,
            "ike": {"local_id": "mn@example", "remote_id": "gw.example",
                    "psk": PSK.encode().hex(),
                    "ike_proposals": ["aes256-sha256-prfsha256-ecp256"],
                    "esp_proposals": ["aes128-sha256"], "force_encap": True}}}
    sock, mn_log = _daemon(nss, mn, "mn", mn_cfg, tmp_path)
    charon.wait(lambda: re.search(r"CHILD_SA mn\{\d+\} established", charon.text()), 20,
                "child SA from the MN")
    sas = charon.ipsec("statusall")
    assert f"{CG_A}[gw.example]...{COA_A}[mn@example]" in sas, sas

    _retry_ping(mn, CN, MN_HOME)            # reverse tunnel through the MN's ESP
    _ping(cg, MN_HOME, src=CN)              # the HA's IP-in-IP through charon's ESP
    first = charon.child_spis()
    assert len(first) == 2, charon.ipsec("statusall")

    # move: the CoA on link b, link a's address gone; the MN's MOBIKE update follows
    _run("ip", "-n", mn, "addr", "add", COA_B + "/24", "dev", nss.dev("mnb"))
    _run("ip", "-n", mn, "route", "replace", CG_A + "/32", "via", CG_B)
    _run("ip", "-n", mn, "addr", "flush", "dev", nss.dev("mna"))
    charon.wait(lambda: f"{CG_A}[gw.example]...{COA_B}[mn@example]"
                in charon.ipsec("statusall"), 20, "charon following the MN")
    assert re.search(r"parsed INFORMATIONAL request \d+ \[ N\(UPD_SA_ADDR\)", charon.text()), \
        charon.text()[-3000:]
    _retry_ping(mn, CN, MN_HOME)
    _ping(cg, MN_HOME, src=CN)
    # the same IKE SA, moved: its local address is the new CoA; charon re-keyed the child onto
    # the new path (kernel-libipsec cannot move an SA) and both ends hold the same SPIs
    node = control.request(sock, "status")["node"]
    (ike,) = node["ike"]["ike_sas"]
    assert ike["state"] == "established" and ike["mobike"] and ike["local"] == COA_B + ":4500"
    assert f"{ike['spi_i']}_i" in charon.ipsec("statusall")
    spis = {int(node["sas"]["inbound"]["spi"], 0), int(node["sas"]["outbound"]["spi"], 0)}
    assert spis == charon.child_spis() and spis.isdisjoint(first), (spis, first)
    assert node["care_of"] == COA_B and not node["drops"], node
    # the registration from the new CoA went through the moved tunnel: the HA bound it there
    ha_node = control.request(str(tmp_path / "ha.sock"), "status")["node"]
    binding = ha_node["bindings"][MN_HOME]
    assert binding["care_of"] == COA_B and binding["previous_care_of"] == COA_A, binding
