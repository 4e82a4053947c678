"""``mipsec lab``: the whole topology in network namespaces, with the three daemons running.

State lives in ``/run/mipsec-lab/<prefix>/``: generated TOML configs, pid files, control sockets,
daemon logs, the GW's capture ``gw.pcap`` and its key file ``gw.pcap.esp_sa``, ``lab.json``.
``down`` needs none of it to clean up: it kills what the pid files name, then every process still
inside a namespace whose name starts with the prefix, and deletes those namespaces (the TUN
devices and veth links go with them).

CN <-> MN: the CN is an ordinary host on the home link.  While the MN is away its HA proxies ARP
for the home address (RFC 5944 §4.6, ``ip neigh add proxy``) and announces it with a gratuitous
ARP, so the CN's packets reach the HA, which tunnels them; at home the MN announces itself.

Several MNs (``up(mobiles=N)``, ``mipsec lab up --mobiles N``): daemons, configs, sockets and
logs are named ``mn1`` ... ``mnN`` (one namespace each, see ``topology``); ``move``,
``wait_mn_event`` and ``mn`` take the MN's number ``k`` (1-based).  ``up(nat=True)`` adds the
visited network ``n`` behind the router's NAT.

A GW pool (``up(gateways=N)``, ``mipsec lab up --gateways N``, IKEv2): daemons ``gw``, ``gw2``
... each in its own namespace, all on the home link and the Internet side; MN ``k``'s ordered GW
list starts at GW ``(k - 1) mod N + 1`` (``make_lab_configs``), so the MNs are spread over the
GWs and each can fall back on the others.

HA group (``up(ha_standbys=K)``, ``mipsec lab up --ha-standbys K``): the lab starts a 3-member
etcd cluster in ``{p}db`` (data under ``<state dir>/etcd``, members ``etcd1`` ... with pid files
and logs like the daemons, removed by ``down``) and K more HA daemons ``ha2`` ... in their own
namespaces, all with ``store = "etcd"`` and ``ha_group = true``; one of them becomes active
(``wait_active``).  Without ``ha_standbys`` nothing changes and no etcd is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mipsec import config as mconfig
from mipsec.io import control
from mipsec.lab import topology as topo
from mipsec.lab.topology import LabError, Names

STATE_ROOT = "/run/mipsec-lab"
DEFAULT_PREFIX = "mipsec-"
ROLES = ("ha", "gw", "mn")
NS_OF = {"ha": "ha", "gw": "gw", "mn": "mn"}
WORKER_READY_S = 15.0          # more for a GW per worker process (python start-up, loaded host)
READY_TIMEOUT_S = 10.0
LAB_PCAP_MAX_MB = 32             # the GW capture rotates at this size; one old file kept
REGISTER_TIMEOUT_S = 10.0
MAX_HA_STANDBYS = 4
ACTIVE_TIMEOUT_S = 20.0          # an HA group: etcd up, one HA elected


def requirements_problem() -> str | None:
    """Why the lab cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, TUN devices, raw sockets)"
    if shutil.which(topo.IP) is None:
        return "the lab needs iproute2's `ip` command"
    if not os.path.exists("/dev/net/tun"):
        return "the lab needs /dev/net/tun"
    probe = f"mipsec-probe-{os.getpid()}"
    proc = subprocess.run([topo.IP, "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cannot create network namespaces: {proc.stderr.strip()}"
    subprocess.run([topo.IP, "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Lab:
    prefix: str = DEFAULT_PREFIX
    state_root: str = STATE_ROOT
    python: str = sys.executable
    names: Names = field(init=False)
    nat: bool = field(init=False, default=False)
    daemon_env: dict[str, str] = field(default_factory=dict)   # more environment for daemons

    def __post_init__(self) -> None:
        if not self.prefix or "/" in self.prefix or len(self.prefix) > 24:
            raise LabError(f"bad lab prefix {self.prefix!r} (1-24 characters, no '/')")
        state = self.load_state()      # a lab that is up already: its MNs, GWs and NAT
        self.names = Names(self.prefix, int(state.get("mobiles", 1)),
                           int(state.get("gateways", 1)))
        self.nat = bool(state.get("nat", False))
        self.ha_standbys = int(state.get("ha_standbys", 0))
        self.gw_workers = int(state.get("gw_workers", 0))

    # --- the MNs --------------------------------------------------------------------------------

    @property
    def mobiles(self) -> int:
        return self.names.mobiles

    def mn(self, k: int = 1) -> str:
        """MN ``k``'s node name: its namespace suffix, daemon, config and socket name."""
        return topo.mn_node(k, self.mobiles)

    @property
    def gateways(self) -> int:
        return self.names.gateways

    def gw(self, k: int = 1) -> str:
        """GW ``k``'s node name (namespace suffix, daemon, config and socket name)."""
        if not 1 <= k <= self.gateways:
            raise LabError(f"no GW {k}: the lab has {self.gateways} (1..{self.gateways})")
        return topo.gw_node(k)

    @property
    def daemons(self) -> tuple[str, ...]:
        return ("ha", *(self.gw(k) for k in range(1, self.gateways + 1)),
                *(self.mn(k) for k in range(1, self.mobiles + 1)), *self.has[1:])

    @property
    def has(self) -> tuple[str, ...]:
        """The HA daemons: ``ha``, and with an HA group its standbys ``ha2`` ..."""
        return tuple(topo.ha_node(i) for i in range(self.ha_standbys + 1))

    @property
    def etcd_members(self) -> tuple[str, ...]:
        return tuple(f"etcd{i + 1}" for i in range(len(topo.ETCD_CLIENT_PORTS))) \
            if self.ha_standbys else ()

    @property
    def places(self) -> tuple[str, ...]:
        """The visited networks of this lab (``a``, ``b``; ``n`` behind the NAT)."""
        return topo.places(self.nat)

    def care_of(self, where: str, k: int = 1) -> str:
        return topo.mn_care_of(where, k)

    def home_address(self, k: int = 1) -> str:
        return topo.mn_home_address(k)

    # --- paths -----------------------------------------------------------------------------

    @property
    def state_dir(self) -> str:
        return os.path.join(self.state_root, self.prefix.rstrip("-") or "lab")

    def path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def socket(self, role: str) -> str:
        return self.path(f"{role}.sock")

    @property
    def pcap(self) -> str:
        return self.path("gw.pcap")

    @property
    def keyfile(self) -> str:
        return self.pcap + ".esp_sa"

    def load_state(self) -> dict[str, Any]:
        try:
            with open(self.path("lab.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def save_state(self, **updates: Any) -> None:
        state = self.load_state()
        state.update(updates)
        with open(self.path("lab.json.tmp"), "w") as f:
            json.dump(state, f, indent=1)
        os.replace(self.path("lab.json.tmp"), self.path("lab.json"))

    # --- up / down ---------------------------------------------------------------------------

    def up(self, delay_ms: float = 0.0, place: str = "a", encryption: str | None = None,
           udp_encap: bool = False, wait: bool = True, sa_source: str = "ikev2",
           handover_mode: str = "siu", ike: dict[str, Any] | None = None,
           mobiles: int = 1, nat: bool = False, gateways: int = 1, ha_standbys: int = 0,
           gw_workers: int = 0, **config_kw: Any) -> None:
        """Build the lab and start the daemons.  The MN-GW SAs are negotiated by IKEv2
        (``sa_source="ikev2"``, the default) with the ESP transform ``encryption`` names, or
        written into the configs (``"manual"``, ``mipsec lab up --manual-keys``; CBC: manual
        keys with an AEAD transform are refused, docs/security.md §3.6).  ``encryption``
        defaults to AES-GCM with IKEv2 and AES-CBC with manual keys.
        ``ike`` overrides IKE settings; ``config_kw`` goes to ``make_lab_configs`` (e.g.
        ``retransmit_initial_s``, ``max_attempts``).  ``mobiles`` MNs, each attached to
        ``place``; ``nat`` adds the visited network ``n`` behind the router's NAT; ``gateways``
        GWs form a pool (IKEv2 only, no ``delay_ms``); ``ha_standbys`` more HAs and an etcd
        cluster make an HA group (module doc); ``gw_workers``: the GWs' ``[daemon] workers``
        (data-plane worker processes, docs/operations.md)."""
        left = topo.existing_namespaces(self.prefix)
        if left:   # refuse before touching anything: a second `up` must not break the first lab
            raise LabError(f"a lab with prefix {self.prefix!r} exists ({', '.join(left)}): "
                           f"run `mipsec lab down --prefix {self.prefix}` first")
        if not isinstance(mobiles, int) or not 1 <= mobiles <= topo.MAX_MOBILES:
            raise LabError(f"mobiles: 1..{topo.MAX_MOBILES}, got {mobiles!r}")
        if gateways > 1 and sa_source != "ikev2":
            raise LabError("a GW pool (gateways > 1) needs IKEv2: with manual keys an MN has "
                           "one SA pair, shared with one GW")
        if not isinstance(ha_standbys, int) or not 0 <= ha_standbys <= MAX_HA_STANDBYS:
            raise LabError(f"ha_standbys: 0..{MAX_HA_STANDBYS}, got {ha_standbys!r}")
        self.names, self.nat = Names(self.prefix, mobiles, gateways), nat
        self.ha_standbys = ha_standbys
        self.gw_workers = gw_workers
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        try:
            topo.build(self.names, delay_ms, nat=nat)
            self.save_state(prefix=self.prefix, delay_ms=delay_ms, mobiles=mobiles, nat=nat,
                            gateways=gateways, place=None, places={}, moves=[],
                            ha_standbys=ha_standbys, gw_workers=gw_workers)
            if ha_standbys:
                topo.build_ha_group(self.names, ha_standbys)
                self.start_etcd()
            if delay_ms > 0:
                self._spawn("delay", "rt", ["-m", "mipsec.lab.delay", "--a", "dl0", "--b", "dl1",
                                           "--delay-ms", str(delay_ms),
                                           "--stats", self.path("delay-stats.json")])
            if gateways > 1:
                config_kw["n_gateways"] = gateways
            self.write_configs(**lab_key_kwargs(encryption, udp_encap, sa_source, handover_mode,
                                                ike), **config_kw)
            self.save_state(sa_source=sa_source, handover_mode=handover_mode)
            for role in self.daemons:
                self.start_daemon(role)
            for role in self.daemons:
                self.wait_ready(role, self._ready_timeout(role))
            if ha_standbys:
                self.wait_active()
            if place:
                for k in range(1, mobiles + 1):
                    self.move(place, wait=wait, k=k)
        except BaseException:
            self.down()
            raise

    def restart_daemon(self, role: str) -> int:
        """Stop a daemon (SIGTERM) and start it again from its config: it forgets every SA
        IKE negotiated, its bindings and SIU state (the re-establishment test)."""
        pid = self.pid(role)
        self.kill(role)
        deadline = time.monotonic() + 5.0
        while pid is not None and pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = self.start_daemon(role)
        self.wait_ready(role, self._ready_timeout(role))
        return pid

    def _ready_timeout(self, role: str) -> float:
        """A GW with workers answers once every worker runs (a fresh interpreter each)."""
        return READY_TIMEOUT_S + (WORKER_READY_S * self.gw_workers if role.startswith("gw")
                                  else 0.0)

    def write_configs(self, **kw: Any) -> dict[str, str]:
        interfaces = tuple(topo.PLACE_IFACE[p] for p in self.places)
        layout = mconfig.KeySetLayout(run_dir=self.state_dir, mn_interfaces=interfaces)
        sets = mconfig.make_key_set(self.mobiles, layout, **kw)
        if self.ha_standbys:
            ha = sets["ha"]
            group = dataclasses.replace(ha.daemon, store="etcd",
                                        store_endpoints=topo.etcd_endpoints(),
                                        store_prefix=f"/mipsec/lab-{self.prefix.rstrip('-')}",
                                        ha_group=True)
            sets["ha"] = dataclasses.replace(ha, daemon=group)
            for name in self.has[1:]:
                sets[name] = dataclasses.replace(
                    ha, daemon=dataclasses.replace(group, control_socket=self.socket(name)),
                    node=dataclasses.replace(ha.node, name=name))
        paths = {}
        for name, cfg in sets.items():
            settings = dataclasses.replace(cfg.daemon, mtu=topo.LAB_TUN_MTU)
            if name == "gw":
                settings = dataclasses.replace(settings, pcap=self.pcap,
                                               pcap_max_mb=LAB_PCAP_MAX_MB, pcap_keep=1)
            if cfg.role == "gw":
                settings = dataclasses.replace(settings, workers=self.gw_workers)
            cfg = dataclasses.replace(cfg, daemon=settings)
            path = self.path(f"{name}.toml")
            mconfig.write_config(cfg, path, comment=f"mipsec lab {self.prefix}: {name}")
            paths[name] = path
        return paths

    def _spawn(self, name: str, node: str, args: list[str], program: str | None = None,
               env: dict[str, str] | None = None) -> int:
        log = open(self.path(f"{name}.log"), "ab")
        proc = subprocess.Popen([topo.IP, "netns", "exec", self.names.ns(node),
                                 program or self.python, *args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd="/",
                                env={**os.environ, **(env or {}), "PYTHONPATH": _package_root()})
        log.close()
        with open(self.path(f"{name}.pid"), "w") as f:
            f.write(f"{proc.pid}\n")
        return proc.pid

    def start_etcd(self) -> None:
        """The HA group's 3-member etcd cluster in ``{p}db`` (fast elections: heartbeat
        50 ms, election timeout 500 ms; small data directories under the state dir)."""
        etcd = shutil.which("etcd")
        if etcd is None:
            raise LabError("an HA group needs etcd (Debian package etcd-server; tools/setup.sh)")
        base = self.path("etcd")
        os.makedirs(base, mode=0o700, exist_ok=True)
        peers = [f"http://127.0.0.1:{p}" for p in topo.ETCD_PEER_PORTS]
        initial = ",".join(f"m{i + 1}={u}" for i, u in enumerate(peers))
        for i, (name, client) in enumerate(zip(self.etcd_members, topo.etcd_endpoints(),
                                                strict=True)):
            self._spawn(name, "db", [
                "--name", f"m{i + 1}", "--data-dir", os.path.join(base, f"m{i + 1}"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peers[i], "--initial-advertise-peer-urls", peers[i],
                "--initial-cluster", initial, "--initial-cluster-token", f"lab-{self.prefix}",
                "--initial-cluster-state", "new", "--heartbeat-interval=50",
                "--election-timeout=500", "--snapshot-count=10000",
                "--quota-backend-bytes=67108864"], program=etcd)

    def ha_status(self) -> dict[str, dict[str, Any]]:
        """Each HA of the group: its ``ha_group`` status (``{}`` when it does not answer)."""
        out = {}
        for name in self.has:
            try:
                out[name] = control.request(self.socket(name), "status",
                                            timeout=1.0).get("ha_group", {})
            except (OSError, ValueError):
                out[name] = {}
        return out

    def active_ha(self) -> str | None:
        serving = [n for n, st in self.ha_status().items() if st.get("serving")]
        if len(serving) > 1:
            raise LabError(f"two HAs serve at once: {serving}")
        return serving[0] if serving else None

    def wait_active(self, timeout: float = ACTIVE_TIMEOUT_S, not_: str | None = None) -> str:
        """Wait until one HA of the group serves (another than ``not_``); its name."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = self.active_ha()
            if active is not None and active != not_:
                return active
            time.sleep(0.05)
        raise LabError(f"no HA active after {timeout} s:\n" +
                       "\n".join(self.log_tail(n) for n in self.has))

    def start_daemon(self, role: str) -> int:
        """Start daemon ``role`` (``ha``, ``gw`` or an MN's name) in its namespace."""
        kind = role[:2]           # ha, ha2 ..., gw, gw2 ..., mn, mn1 ...
        return self._spawn(role, NS_OF.get(role, role), ["-m", "mipsec", kind, "--config",
                                                         self.path(f"{role}.toml")],
                           env=self.daemon_env)

    def pid(self, name: str) -> int | None:
        try:
            with open(self.path(f"{name}.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        pid = self.pid(name)
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait_ready(self, role: str, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if control.request(self.socket(role), "ping", timeout=1.0).get("ok"):
                    return
            except (OSError, ValueError):
                pass
            pid = self.pid(role)
            if pid is not None and not pid_alive(pid):
                raise LabError(f"{role} daemon exited at start-up:\n{self.log_tail(role)}")
            time.sleep(0.05)
        raise LabError(f"{role} daemon not ready after {timeout} s:\n{self.log_tail(role)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            with open(self.path(f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def down(self) -> list[str]:
        """Remove everything of this prefix, whatever state it is in; returns what was removed."""
        removed = []
        for name in (*self.daemons, "delay", *self.etcd_members):
            pid = self.pid(name)
            if pid is not None and pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
                removed.append(f"{name} (pid {pid})")
        deadline = time.monotonic() + 3.0
        for name in (*self.daemons, "delay", *self.etcd_members):
            pid = self.pid(name)
            while pid is not None and pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid is not None and pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        removed += topo.destroy(self.prefix)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return removed

    # --- moving the MN --------------------------------------------------------------------------

    def move(self, where: str, wait: bool = True, timeout: float = REGISTER_TIMEOUT_S,
             make_before_break: bool = False, k: int = 1, dhcp_order: bool = False
             ) -> dict[str, Any]:
        """Move MN ``k`` (to ``a``, ``b``, ``n`` or ``home``); with ``wait``, until its
        registration is done.

        ``make_before_break``: the old care-of address stays until the registration is done
        (then it is removed), so packets still sent to it arrive.
        """
        if make_before_break and (where not in self.places or not wait):
            raise LabError("make-before-break needs a visited network and waiting")
        name = self.mn(k)
        t0 = time.monotonic()
        topo.move_mn(self.names, where, make_before_break, k=k, nat=self.nat,
                     dhcp_order=dhcp_order)
        state = self.load_state()
        moves = state.get("moves", []) + [{"to": where, "time": t0, "mobile": name}]
        places = {**state.get("places", {}), name: where}
        self.save_state(moves=moves, places=places, **({"place": where} if k == 1 else {}))
        result: dict[str, Any] = {"to": where, "time": t0, "make_before_break": make_before_break,
                                  "mobile": name}
        if wait:
            # "noticed": the MN's watcher saw the address change (the `ip` commands that make
            # the move take a few milliseconds); "registered": its reply arrived.
            noticed, done = self.wait_mn_event(t0, ("rrp-received", "deregistered"), timeout, k)
            result["noticed"] = noticed if noticed is not None else t0
            result["registered"] = done
        if make_before_break:
            # Downlink packets the GW sent to the old address before its SIU are still in flight
            # for up to one Internet delay: keep the old address that long, then drop it.
            time.sleep(max(0.05, 2 * self.load_state().get("delay_ms", 0.0) / 1000.0))
            topo.drop_old_coas(self.names, where, k=k, nat=self.nat)
        return result

    def place(self, k: int = 1) -> str | None:
        """Where MN ``k`` was last moved (None before its first move)."""
        return self.load_state().get("places", {}).get(self.mn(k))

    def wait_mn_event(self, since: float, kinds: tuple[str, ...],
                      timeout: float = REGISTER_TIMEOUT_S, k: int = 1) -> tuple[float | None, float]:
        """(time MN ``k`` noticed the move, time of its first ``kinds`` event) after ``since``."""
        name = self.mn(k)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                events = control.request(self.socket(name), f"timeline since {since!r}",
                                         2.0).get("timeline", [])
            except (OSError, ValueError):
                events = []
            noticed = next((ev["time"] for ev in events if ev.get("time", 0) >= since
                            and ev.get("kind") in ("coa-changed", "returned-home")), None)
            for ev in events:
                if ev.get("time", 0) >= since and ev.get("kind") in kinds:
                    return noticed, ev["time"]
            time.sleep(0.02)
        raise LabError(f"{name} did not complete its registration within {timeout} s; "
                       f"its log:\n{self.log_tail(name)}")

    # --- status ---------------------------------------------------------------------------------

    def status(self, role: str) -> dict[str, Any]:
        return control.request(self.socket(role), "status")

    def timelines(self, since: float = 0.0, until: float | None = None) -> list[dict[str, Any]]:
        """Every daemon's timeline events in [since, until), merged and sorted by time."""
        out = []
        for role in self.daemons:
            try:
                events = control.request(self.socket(role), f"timeline since {since!r}",
                                         2.0).get("timeline", [])
            except (OSError, ValueError):
                continue
            for ev in events:
                t = ev.get("time", 0.0)
                if t >= since and (until is None or t < until):
                    out.append(ev)
        out.sort(key=lambda e: e.get("time", 0.0))
        return out

    @contextlib.contextmanager
    def sniff(self, node: str, interface: str, name: str) -> Iterator[str]:
        """Capture ``interface`` of ``node`` (``mipsec.lab.sniff``) into ``<state>/<name>.pcap``
        while the block runs; yields the path (complete once the block has left)."""
        out = self.path(f"{name}.pcap")
        proc = self.popen(node, self.python, "-m", "mipsec.lab.sniff", "--interface", interface,
                          "--out", out, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() != "ready":
                proc.kill()
                raise LabError(f"capture on {node} {interface} did not start: "
                               f"{line}{proc.communicate(timeout=5)[1]}")
            yield out
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()

    def exec(self, node: str, *cmd: str, **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run([topo.IP, "netns", "exec", self.names.ns(node), *cmd],
                              capture_output=True, text=True, **kw)

    def popen(self, node: str, *cmd: str, **kw: Any) -> subprocess.Popen:
        return subprocess.Popen([topo.IP, "netns", "exec", self.names.ns(node), *cmd],
                                env={**os.environ, "PYTHONPATH": _package_root()}, **kw)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: a child of ours that exited is reaped, and a zombie
    counts as gone (the lab, its tests and the HA fail-over run use this one check)."""
    try:   # reap it if it is our child (the lab started it from this process)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie child of ours is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _package_root() -> str:
    import mipsec
    root = os.path.dirname(os.path.dirname(os.path.abspath(mipsec.__file__)))
    extra = os.environ.get("PYTHONPATH")
    return f"{root}:{extra}" if extra else root


# ESP transform names (docs/design.md) -> IKEv2 ESP proposals (mipsec.ike.proposals text form)
IKE_ESP_PROPOSAL = {"ENCR_AES_GCM_16": "aes128gcm16", "ENCR_AES_CBC": "aes128-sha256"}


def lab_key_kwargs(encryption: str | None, udp_encap: bool, sa_source: str, handover_mode: str,
                   ike: dict[str, Any] | None = None) -> dict[str, Any]:
    """``make_key_set`` arguments for a lab: manual keys, or IKEv2 settings that negotiate the
    same transform (``udp_encap`` -> ``force_encap``: ESP in UDP 4500 after IKE's NAT-T).
    ``encryption`` None: AES-GCM with IKEv2, AES-CBC with manual keys."""
    if sa_source == "manual":
        if handover_mode != "siu":
            raise LabError("handover mode 'mobike' needs IKEv2 (not --manual-keys)")
        encryption = encryption or "ENCR_AES_CBC"
        if encryption in mconfig.node_config.AEAD_TRANSFORMS:
            raise LabError(f"--manual-keys with {encryption}: {mconfig.MANUAL_AEAD_REFUSED}")
        return {"encryption": encryption, "udp_encap": udp_encap}
    encryption = encryption or "ENCR_AES_GCM_16"
    if sa_source != "ikev2":
        raise LabError(f"unknown SA source {sa_source!r}")
    if encryption not in IKE_ESP_PROPOSAL:
        raise LabError(f"IKEv2 negotiates {', '.join(IKE_ESP_PROPOSAL)}; use --manual-keys for "
                       f"{encryption}")
    settings = {"esp_proposals": (IKE_ESP_PROPOSAL[encryption],), "force_encap": udp_encap}
    settings.update(ike or {})
    return {"sa_source": "ikev2", "handover_mode": handover_mode, "ike": settings}
