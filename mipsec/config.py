"""TOML configuration of the daemons: loading, validation, writing.

A daemon's file has three parts (docs/operations.md has the full reference)::

    role = "mn"                    # "mn" | "gw" | "ha"

    [daemon]                       # how this process runs: TUN, interfaces, sockets, captures
    tun = "mipsec0"
    interfaces = ["eth1", "wlan0"] # MN: the visited interfaces whose new addresses are care-of
    ...

    [mobile_node]                  # the role itself: the fields of mipsec.node.config's dataclass
    home_address = "10.1.0.100"    # (MobileNodeConfig / GatewayConfig / HomeAgentConfig), nested
    [mobile_node.msa]              # dataclasses as sub-tables, tuples of them as arrays of tables,
    key = "00112233..."            # byte strings as hex

The role part is mapped onto the roles' frozen dataclasses (mipsec.node.config) by their type
hints, so the TOML keys are exactly the dataclass field names, and the dataclasses' own checks
(key length for the transform, known transform, address syntax ...) run at load time.  Every
error raises ``ConfigError`` whose message names the file, the key (``[mobile_node.esp_in]
encryption_key``) and the problem; one bad file gives exactly one message.

Things that can only be checked on the machine (the interfaces exist) are checked by
``check_runtime()``, which a daemon calls at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from mipsec import files
from mipsec.constants import GW_WORKERS_MAX
from mipsec.errors import ConfigError
from mipsec.node import config as node_config

ROLES = ("mn", "gw", "ha")
ROLE_SECTION = {"mn": "mobile_node", "gw": "gateway", "ha": "home_agent"}
ROLE_CLASS = {"mn": node_config.MobileNodeConfig, "gw": node_config.GatewayConfig,
              "ha": node_config.HomeAgentConfig}
SA_SOURCES = ("manual", "ikev2")
# docs/security.md §3.6: why manual keys and AEAD transforms never go together, and what instead
MANUAL_AEAD_REFUSED = (
    "manual keys are forbidden with AES-GCM and ChaCha20-Poly1305 (RFC 4106 §8.1, RFC 7634): "
    "their nonce is the sequence number, which a restart would repeat under the same key; use "
    "sa_source = \"ikev2\" (fresh keys for every SA), or manual keys with ENCR_AES_CBC and an "
    "HMAC integrity transform")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_RUN_DIR = "/run/mipsec"
DEFAULT_STATE_DIR = "/var/lib/mipsec"   # what must survive a restart (the HA's bindings)
STORE_KINDS = ("sqlite", "memory", "etcd")
IFNAMSIZ = 15


@dataclass(frozen=True)
class DaemonSettings:
    """The ``[daemon]`` table: how one daemon process runs (not what the role does)."""
    tun: str = "mipsec0"              # TUN device name (created at start, removed at exit)
    mtu: int = 1400                   # TUN MTU: leaves room for ESP (+ IP-in-IP) in 1500
    control_socket: str = ""          # default /run/mipsec/<role>.sock
    log_level: str = "info"
    log_format: str = "text"          # "text" | "json" (one JSON object per line)
    pcap: str = ""                    # capture of the net side ("" = none)
    pcap_max_mb: int = 64             # rotate the capture at this size (0 = no limit)
    pcap_keep: int = 3                # rotated captures kept (<pcap>.1 ...); older ones deleted
    keyfile: str = ""                 # esp_sa key file for Wireshark (default <pcap>.esp_sa)
    sa_source: str = "manual"         # "manual" (this file's keys) | "ikev2" (mipsec.ike)
    interfaces: tuple[str, ...] = ()  # MN: visited interfaces watched for care-of addresses
    home_interface: str = ""          # MN: its home-link interface; HA: its home-link interface
    inside_interface: str = ""        # GW: the interface towards the home network
    route_table: int = 100            # GW: policy-routing table steering inside traffic to TUN
    rule_priority: int = 1000         # GW: priority of "iif <inside> lookup <route_table>"
    workers: int = 0                  # GW: data-plane worker processes (0: one process does
    #                                   all; N: a control process and N workers, by SPI)
    gratuitous_arp: bool = True       # HA / MN: RFC 5944 §4.6 announcements on the home link
    store: str = "sqlite"             # HA: binding store, "sqlite" (on disk) | "memory" (none)
    #                                   | "etcd" (shared, replicated: the store_* keys below)
    store_endpoints: tuple[str, ...] = ()   # HA, etcd: client URLs of the members
    store_prefix: str = "/mipsec/ha"  # HA, etcd: key prefix, one per home network / HA group
    store_ca_file: str = ""           # HA, etcd over https: CA of the members' certificates
    store_cert_file: str = ""         # HA, etcd over https: this HA's client certificate
    store_key_file: str = ""          # HA, etcd over https: its private key
    ha_group: bool = False            # HA, etcd: several HAs share store_prefix and the HA's
    #                                   address; one is active (leader election), see hagroup
    ha_lease_ttl_s: float = 2.0       # HA group: the leader key's lease (a dead active is
    #                                   replaced after about this)
    ha_renew_every_s: float = 0.4     # HA group: the active's keep-alive period
    ha_fence_margin_s: float = 0.6    # HA group: stop serving this long before the lease can
    #                                   expire at the earliest
    state_dir: str = DEFAULT_STATE_DIR   # HA: <state_dir>/<name>.bindings.sqlite3 (0700/0600);
    #                                      MN/GW with manual keys: <name>.seq.json (0600)


@dataclass(frozen=True)
class MetricsSettings:
    """The ``[metrics]`` table: the Prometheus endpoint (off by default)."""
    listen: str = ""                  # "addr:port", e.g. "127.0.0.1:9474" ("" = off)


@dataclass(frozen=True)
class DaemonConfig:
    role: str
    daemon: DaemonSettings
    node: Any                         # MobileNodeConfig | GatewayConfig | HomeAgentConfig
    path: str = "<memory>"
    metrics: MetricsSettings = MetricsSettings()

    @property
    def control_socket(self) -> str:
        return self.daemon.control_socket or default_socket(self.role)

    @property
    def keyfile(self) -> str:
        if self.daemon.keyfile:
            return self.daemon.keyfile
        return self.daemon.pcap + ".esp_sa" if self.daemon.pcap else ""


def default_socket(role: str) -> str:
    return os.path.join(DEFAULT_RUN_DIR, f"{role}.sock")


# --- TOML -> dataclasses -------------------------------------------------------------------------

def load_config(path: str | os.PathLike[str], *, require_private: bool = False) -> DaemonConfig:
    """Load and check a daemon's file.  ``require_private`` (the daemons): the file holds keys,
    so one that group or others can read or change, or that another user owns, is refused
    (docs/security.md §3.7); the check is on the file actually read (fstat of the open file)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = config_from_dict(data, path)
    if require_private:
        try:
            files.check_private(path, st)
        except files.NotPrivate as exc:
            raise ConfigError(f"{path}: not private: {exc}") from None
    return cfg


def config_from_dict(data: dict[str, Any], path: str = "<memory>") -> DaemonConfig:
    role = data.get("role")
    if role is None:
        raise ConfigError(f"{path}: missing key 'role' (one of {', '.join(ROLES)})")
    if role not in ROLES:
        raise ConfigError(f"{path}: role: unknown role {role!r} (one of {', '.join(ROLES)})")
    section = ROLE_SECTION[role]
    allowed = {"role", "daemon", "metrics", section}
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key {key!r} at top level "
                              f"(a {role} file has: {', '.join(sorted(allowed))})")
    if section not in data:
        raise ConfigError(f"{path}: missing table [{section}]")
    daemon = _build(DaemonSettings, data.get("daemon", {}), path, "daemon")
    _check_daemon(daemon, role, path)
    table = data[section]
    if (role == "mn" and isinstance(table, dict) and "gateway" not in table
            and isinstance(table.get("gateways"), list) and table["gateways"]):
        # an ordered GW list alone: the first one is the one in use first
        table = {**table, "gateway": table["gateways"][0]}
    node = _build(ROLE_CLASS[role], table, path, section)
    _check_sa_source(daemon, role, node, path, section)
    metrics = _build(MetricsSettings, data.get("metrics", {}), path, "metrics")
    _check_metrics(metrics, path)
    return DaemonConfig(role=role, daemon=daemon, node=node, path=path, metrics=metrics)


def _check_metrics(m: MetricsSettings, path: str) -> None:
    if not m.listen:
        return
    host, sep, port = m.listen.rpartition(":")
    try:
        socket.inet_aton(host)
        ok = sep == ":" and host.count(".") == 3 and 1 <= int(port) <= 65535
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{_where(path, 'metrics', 'listen')}: not an IPv4 addr:port: "
                          f"{m.listen!r} (e.g. \"127.0.0.1:9474\")")


def _check_sa_source(d: DaemonSettings, role: str, node: Any, path: str, section: str) -> None:
    """``sa_source`` and the role table must agree: "ikev2" needs [<role>.ike] (and, at the GW,
    ike_id + psk per mobile); "manual" needs the ESP keys (esp_in / esp_out)."""
    if role == "ha":
        return                                # the HA has no ESP SAs; it learns the GW's SPIs
    where = _where(path, "daemon", "sa_source")
    if d.sa_source == "ikev2":
        if node.ike is None:
            raise ConfigError(f"{where}: 'ikev2' needs a [{section}.ike] table "
                              f"(local_id{', remote_id, psk' if role == 'mn' else ''})")
        if role == "gw":
            for m in node.mobiles:
                if not (m.ike_id and m.psk):
                    raise ConfigError(f"{where}: 'ikev2': mobile {m.home_address} needs ike_id "
                                      f"and psk in [[gateway.mobiles]]")
    else:
        mobiles = [node] if role == "mn" else list(node.mobiles)
        for m in mobiles:
            who = "" if role == "mn" else f" (mobile {m.home_address})"
            if m.esp_in is None or m.esp_out is None:
                raise ConfigError(f"{where}: 'manual' needs esp_in and esp_out{who}; "
                                  f"or set sa_source = \"ikev2\"")
            for sa in (m.esp_in, m.esp_out):
                if sa.encryption in node_config.AEAD_TRANSFORMS:
                    raise ConfigError(f"{where}: 'manual' with {sa.encryption}{who}: "
                                      f"{MANUAL_AEAD_REFUSED}")
        if node.handover_mode != "siu":
            raise ConfigError(f"{where}: handover_mode 'mobike' needs sa_source = \"ikev2\"")


def _where(path: str, table: str, key: str | None = None) -> str:
    return f"{path}: [{table}]" + (f" {key}" if key else "")


def _build(cls: type, table: Any, path: str, name: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {name} must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(f"{_where(path, name, key)}: unknown key (known: "
                              f"{', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for fname, f in fields.items():
        if fname not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if type(None) in typing.get_args(hints[fname]):
                    kwargs[fname] = None            # an optional table left out (esp_in with IKEv2)
                    continue
                raise ConfigError(f"{_where(path, name, fname)}: missing key")
            continue
        kwargs[fname] = _convert(hints[fname], table[fname], path, name, fname)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{_where(path, name)} {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_where(path, name)}: {exc}") from None


def _convert(hint: Any, value: Any, path: str, table: str, key: str) -> Any:
    where = _where(path, table, key)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and value is None:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return _convert(others[0], value, path, table, key)
        raise ConfigError(f"{where}: unsupported type {hint}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path, f"{table}.{key}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be an array, got {_tname(value)}")
        item = args[0]
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            return tuple(_build(item, v, path, f"{table}.{key}[{i}]") for i, v in enumerate(value))
        return tuple(_convert(item, v, path, table, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bytes:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a hex string, got {_tname(value)}")
        text = value.strip().removeprefix("0x").replace(":", "").replace(" ", "")
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ConfigError(f"{where}: not a hex string: {value!r}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {_tname(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {_tname(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {_tname(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {_tname(value)}")
        return value
    if hint is Any:
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def _tname(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _check_daemon(d: DaemonSettings, role: str, path: str) -> None:
    def bad(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{_where(path, 'daemon', key)}: {problem}")

    if d.sa_source not in SA_SOURCES:
        raise bad("sa_source", f"unknown SA source {d.sa_source!r} (one of {', '.join(SA_SOURCES)})")
    if d.log_format not in LOG_FORMATS:
        raise bad("log_format", f"unknown format {d.log_format!r} (one of "
                                f"{', '.join(LOG_FORMATS)})")
    if d.log_level not in LOG_LEVELS:
        raise bad("log_level", f"unknown level {d.log_level!r} (one of {', '.join(LOG_LEVELS)})")
    if d.pcap_max_mb < 0:
        raise bad("pcap_max_mb", f"must be 0 (no limit) or a size in MB, got {d.pcap_max_mb}")
    if d.pcap_keep < 0:
        raise bad("pcap_keep", f"must be 0 or more, got {d.pcap_keep}")
    if not 0 <= d.workers <= GW_WORKERS_MAX:
        raise bad("workers", f"must be 0 (one process) to {GW_WORKERS_MAX}, got {d.workers}")
    if d.workers and role != "gw":
        raise bad("workers", f"only a GW has worker processes, not a {role}")
    if not 576 <= d.mtu <= 65535:
        raise bad("mtu", f"must be in [576, 65535], got {d.mtu}")
    for key in ("tun", "home_interface", "inside_interface"):
        name = getattr(d, key)
        if len(name.encode()) > IFNAMSIZ or "/" in name or " " in name:
            raise bad(key, f"not a valid interface name: {name!r}")
    if not d.tun:
        raise bad("tun", "must not be empty")
    if d.store not in STORE_KINDS:
        raise bad("store", f"unknown binding store {d.store!r} (one of {', '.join(STORE_KINDS)})")
    if role == "ha" and d.store == "etcd" and not d.store_endpoints:
        raise bad("store_endpoints", "missing key: store = \"etcd\" needs the members' URLs")
    if role == "ha" and d.ha_group and d.store != "etcd":
        raise bad("ha_group", "needs store = \"etcd\": the HAs of a group share their bindings "
                              "and elect the active one there")
    if role == "ha" and d.ha_group:
        from mipsec.node.election import HaElection
        try:
            HaElection("check", ttl_s=d.ha_lease_ttl_s, renew_every_s=d.ha_renew_every_s,
                       fence_margin_s=d.ha_fence_margin_s)
        except ConfigError as exc:
            raise ConfigError(f"{_where(path, 'daemon', 'ha_lease_ttl_s')}: {exc}") from None
    if role == "ha" and d.store == "sqlite" and not os.path.isabs(d.state_dir):
        raise bad("state_dir", f"must be an absolute path, got {d.state_dir!r}")
    if role == "mn" and not d.interfaces:
        raise bad("interfaces", "missing key: a mobile node needs the visited interfaces to watch")
    if role == "gw" and not d.inside_interface:
        raise bad("inside_interface", "missing key: a gateway needs its home-side interface")
    if role == "ha" and not d.home_interface:
        raise bad("home_interface", "missing key: a home agent needs its home-link interface")
    if not 1 <= d.route_table <= 0xFFFFFFFF or d.route_table in (253, 254, 255):
        raise bad("route_table", f"must be a free routing table id (not 253-255), got {d.route_table}")


def check_runtime(cfg: DaemonConfig) -> None:
    """Checks that need the machine: every named interface exists (in this namespace)."""
    d = cfg.daemon
    names = [("interfaces", n) for n in d.interfaces]
    for key in ("home_interface", "inside_interface"):
        if getattr(d, key):
            names.append((key, getattr(d, key)))
    for key, name in names:
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise ConfigError(f"{_where(cfg.path, 'daemon', key)}: interface {name!r} does not "
                              f"exist") from None


# --- dataclasses -> TOML -------------------------------------------------------------------------

def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (bytes, bytearray)):
        return json.dumps(bytes(value).hex())
    if isinstance(value, str):
        return json.dumps(value)          # a JSON string is a valid TOML basic string
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_table(value: Any) -> bool:
    return dataclasses.is_dataclass(value)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and bool(value) and all(map(_is_table, value))


# [daemon] keys that mean nothing for a role are left out of the files we write.
_STORE_KEYS = {"store_endpoints", "store_prefix", "store_ca_file", "store_cert_file",
               "store_key_file", "ha_group", "ha_lease_ttl_s", "ha_renew_every_s",
               "ha_fence_margin_s"}
_NOT_FOR_ROLE = {
    "mn": {"inside_interface", "route_table", "rule_priority", "store", "workers",
           *_STORE_KEYS},
    "gw": {"interfaces", "home_interface", "gratuitous_arp", "store", *_STORE_KEYS},
    "ha": {"interfaces", "inside_interface", "route_table", "rule_priority", "workers"},
}


def _emit(obj: Any, name: str, out: list[str], array: bool = False,
          skip: frozenset[str] | set[str] = frozenset()) -> None:
    out.append(f"\n[[{name}]]" if array else f"\n[{name}]")
    later = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None or f.name in skip:
            continue
        if _is_table(value) or _is_table_array(value):
            later.append((f.name, value))
        else:
            out.append(f"{f.name} = {_scalar(value)}")
    for key, value in later:
        if _is_table(value):
            _emit(value, f"{name}.{key}", out)
        else:
            for item in value:
                _emit(item, f"{name}.{key}", out, array=True)


def dump_config(cfg: DaemonConfig, comment: str = "") -> str:
    out = []
    if comment:
        out += [f"# {line}" if line else "#" for line in comment.splitlines()]
    out.append(f"role = {_scalar(cfg.role)}")
    skip = _NOT_FOR_ROLE[cfg.role] | (_STORE_KEYS if cfg.daemon.store != "etcd" else set())
    _emit(cfg.daemon, "daemon", out, skip=skip)
    _emit(cfg.node, ROLE_SECTION[cfg.role], out)
    if cfg.metrics.listen:
        _emit(cfg.metrics, "metrics", out)
    return "\n".join(out) + "\n"


def write_config(cfg: DaemonConfig, path: str | os.PathLike[str], comment: str = "", *,
                 exclusive: bool = False) -> None:
    """Write ``cfg`` as TOML, mode 0600, atomically through a fresh O_EXCL temporary file
    (``mipsec.files.write_private``); ``exclusive``: never replace an existing file."""
    files.write_private(path, dump_config(cfg, comment), exclusive=exclusive)


# --- matching sets (mipsec keys, the lab) --------------------------------------------------------

@dataclass(frozen=True)
class KeySetLayout:
    """Interface names and paths written into a generated set (defaults: the lab's names)."""
    mn_interfaces: tuple[str, ...] = ("va0", "vb0")
    mn_home_interface: str = "home0"
    gw_inside_interface: str = "in0"
    ha_home_interface: str = "eth0"
    run_dir: str = DEFAULT_RUN_DIR
    pcap_dir: str = ""                # "" = no captures
    state_dir: str = ""               # HA store; "" = DEFAULT_STATE_DIR, or run_dir if it is set
    tun_names: dict[str, str] = field(default_factory=lambda: {"mn": "mtun0", "gw": "gtun0",
                                                                "ha": "htun0"})


def make_key_set(n_mobiles: int = 1, layout: KeySetLayout | None = None, keys_from: Any = None,
                 **lab_kwargs: Any) -> dict[str, DaemonConfig]:
    """Fresh keys for an HA, a GW and ``n_mobiles`` MNs that match each other.

    Returns {"ha": ..., "gw": ..., "mn" (or "mn1", "mn2" ...): ...} (and "gw2" ... with
    ``n_gateways=2`` ...); built on
    ``mipsec.node.config.make_lab_configs`` so the sim, the lab and generated files agree.
    """
    lay = layout or KeySetLayout()
    sa_source = lab_kwargs.get("sa_source", "manual")
    if sa_source == "manual":
        # manual keys: CBC + HMAC by default; never an AEAD transform (docs/security.md §3.6)
        encryption = lab_kwargs.setdefault("encryption", "ENCR_AES_CBC")
        if encryption in node_config.AEAD_TRANSFORMS:
            raise ConfigError(f"encryption {encryption}: {MANUAL_AEAD_REFUSED}")
    lab = node_config.make_lab_configs(n_mobiles, keys_from, **lab_kwargs)

    def settings(role: str, name: str, **kw: Any) -> DaemonSettings:
        pcap = os.path.join(lay.pcap_dir, f"{name}.pcap") if lay.pcap_dir else ""
        if role != "ha":
            kw["sa_source"] = sa_source
        return DaemonSettings(tun=lay.tun_names[role],
                              control_socket=os.path.join(lay.run_dir, f"{name}.sock"),
                              pcap=pcap, **kw)

    state_dir = lay.state_dir or (DEFAULT_STATE_DIR if lay.run_dir == DEFAULT_RUN_DIR
                                  else lay.run_dir)
    out = {
        "ha": DaemonConfig("ha", settings("ha", "ha", home_interface=lay.ha_home_interface,
                                          state_dir=state_dir), lab.home_agent),
        "gw": DaemonConfig("gw", settings("gw", "gw", inside_interface=lay.gw_inside_interface,
                                          state_dir=state_dir), lab.gateway),
    }
    for gw in lab.more_gateways:           # a GW pool (n_gateways > 1): gw2, gw3 ...
        out[gw.name] = DaemonConfig("gw", settings("gw", gw.name,
                                                   inside_interface=lay.gw_inside_interface,
                                                   state_dir=state_dir), gw)
    for mn in lab.mobiles:
        out[mn.name] = DaemonConfig("mn", settings("mn", mn.name, interfaces=lay.mn_interfaces,
                                                   home_interface=lay.mn_home_interface,
                                                   state_dir=state_dir), mn)
    return out


def write_key_set(out_dir: str | os.PathLike[str], n_mobiles: int = 1,
                  layout: KeySetLayout | None = None, *, force: bool = False,
                  **kw: Any) -> dict[str, str]:
    """``mipsec keys``: write ha.toml, gw.toml and one file per MN; returns name -> path.

    Existing files are not overwritten unless ``force`` (ConfigError naming them, and nothing
    written); a new directory is created mode 0700."""
    out_dir = os.fspath(out_dir)
    sets = make_key_set(n_mobiles, layout, **kw)
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.toml") for name in sets}
    existing = [p for p in paths.values() if os.path.lexists(p)]
    if existing and not force:
        raise ConfigError(f"{', '.join(existing)}: exists already; not overwritten (--force "
                          f"replaces {'them' if len(existing) > 1 else 'it'})")
    for name, cfg in sets.items():
        write_config(cfg, paths[name], exclusive=not force,
                     comment=f"mipsec {cfg.role} configuration for {name!r}, generated "
                     f"by `mipsec keys`.\nSecret keys inside: keep this file private (mode 0600).")
    return paths
