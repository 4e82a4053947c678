"""Role configurations: frozen dataclasses the daemons build from TOML and the tests build in code.

Three configs, one per role, that must agree with each other (SPIs, keys, addresses):

* ``MobileNodeConfig``: the MN's home address, its HA, the GW's outside address, the home prefix,
  its mobility security association with the HA (RFC 5944 §3.5.1), its ESP SA pair with the GW
  and the registration tunables (lifetime, RFC 5944 §3.6.3 retransmission, renewal).
* ``GatewayConfig``: the GW's outside/inside addresses, one ``GatewayMobile`` per MN (SPIs,
  transforms, keys, the inner destinations its tunnel may reach) and the HAs allowed to send it
  Security Information Updates, with their keys.
* ``HomeAgentConfig``: the HA's address and home prefix, the GWs it sends SIUs to (with keys) and
  one ``HomeAgentMobile`` per MN (home address, MSA, which GW and which GW outbound SPI).

``make_lab_configs(n)`` returns a consistent set for tests, the simulator, ``mipsec keys`` and the
benchmarks, on the addressing plan of docs/design.md.

Construction validates what can be validated locally and raises ``ConfigError`` naming the field.
The ESP key lengths are checked against the transform names of docs/design.md.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mipsec.constants import MIP_PORT as MIP_PORT
from mipsec.errors import ConfigError

# --- specification constants -------------------------------------------------------------------

MIP_SPI_MIN = 256                   # RFC 5944 §1.8: SPI values 0-255 are reserved
MSA_ALGORITHMS = ("hmac-md5", "hmac-sha256")   # RFC 5944 §3.5.1 default, and the stronger option

# Key bytes per transform name (docs/design.md "ESP"; GCM/ChaCha keys include the 4-byte salt:
# RFC 4106 §8.1, RFC 7634 §2).
ENCRYPTION_KEY_BYTES: dict[str, tuple[int, ...]] = {
    "ENCR_AES_CBC": (16, 24, 32),           # RFC 3602
    "ENCR_AES_GCM_16": (20, 36),            # RFC 4106: 16 or 32 + salt
    "ENCR_CHACHA20_POLY1305": (36,),        # RFC 7634: 32 + salt
    "ENCR_NULL": (0,),                      # RFC 2410
}
AEAD_TRANSFORMS = frozenset({"ENCR_AES_GCM_16", "ENCR_CHACHA20_POLY1305"})
INTEGRITY_KEY_BYTES: dict[str, int] = {
    "AUTH_HMAC_SHA1_96": 20,                # RFC 2404
    "AUTH_HMAC_SHA2_256_128": 32,           # RFC 4868
    "AUTH_HMAC_SHA2_384_192": 48,
    "AUTH_HMAC_SHA2_512_256": 64,
}

# --- tunables ----------------------------------------------------------------------------------

REG_LIFETIME_S = 600                # requested registration lifetime (RFC 5944 §3.3: <= 65534)
HA_MAX_LIFETIME_S = 1800            # the HA grants min(requested, this)
RETRANSMIT_INITIAL_S = 1.0          # RFC 5944 §3.6.3: first timeout before any RTT is measured
RETRANSMIT_MIN_S = 0.2              # floor of the measured timeout (mipsec/node/retransmit.py)
RETRANSMIT_MAX_S = 30.0             # cap of the back-off: the MN retries for ever at this pace
RETRANSMIT_MAX_ATTEMPTS = 5         # a round of unanswered transmissions (IKEv2: then a
                                    # liveness check; registration.IKE_FALLBACK_ATTEMPTS)
SIU_RETRANSMIT_INITIAL_S = 0.05     # HA: an SIU not ACKed after this (home link scale) is resent,
SIU_RETRANSMIT_TRIES = 4            # doubling each time, at most this many times (0.75 s in all)
RENEW_FRACTION = 0.8                # re-register at this fraction of the granted lifetime
SIU_KEY_BYTES = 32                  # HMAC-SHA-256 key of an HA-GW pair


def _check_address(where: str, value: str) -> str:
    try:
        ipaddress.IPv4Address(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: not an IPv4 address: {value!r}") from exc
    return value


def _check_prefix(where: str, value: str) -> str:
    try:
        ipaddress.IPv4Network(value, strict=True)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: not an IPv4 prefix (a.b.c.d/n, host bits zero): {value!r}") from exc
    return value


def _check_bytes(where: str, value: Any) -> None:
    if not isinstance(value, (bytes, bytearray)):
        raise ConfigError(f"{where}: must be bytes, got {type(value).__name__}")


@dataclass(frozen=True)
class MobilitySecurityAssociationConfig:
    """The MN-HA mobility security association (RFC 5944 §3.5.1, §5.1)."""
    spi: int
    key: bytes
    algorithm: str = "hmac-md5"

    def __post_init__(self) -> None:
        if not isinstance(self.spi, int) or not MIP_SPI_MIN <= self.spi <= 0xFFFFFFFF:
            raise ConfigError(f"msa.spi: must be an integer in [{MIP_SPI_MIN}, 2^32-1] "
                              f"(RFC 5944 §1.8 reserves 0-255), got {self.spi!r}")
        _check_bytes("msa.key", self.key)
        if len(self.key) < 16:
            raise ConfigError(f"msa.key: at least 16 bytes (RFC 5944 §5.1), got {len(self.key)}")
        if self.algorithm not in MSA_ALGORITHMS:
            raise ConfigError(f"msa.algorithm: one of {MSA_ALGORITHMS}, got {self.algorithm!r}")


@dataclass(frozen=True)
class EspSaConfig:
    """One direction of an ESP SA: SPI, IANA transform names and keys, UDP encapsulation."""
    spi: int
    encryption: str
    encryption_key: bytes
    integrity: str | None = None
    integrity_key: bytes = b""
    udp_encap: bool = False          # RFC 3948 UDP/4500 encapsulation

    def __post_init__(self) -> None:
        if not isinstance(self.spi, int) or not 256 <= self.spi <= 0xFFFFFFFF:
            raise ConfigError(f"esp.spi: must be in [256, 2^32-1] (RFC 4303 §2.1), got {self.spi!r}")
        if self.encryption not in ENCRYPTION_KEY_BYTES:
            raise ConfigError(f"esp.encryption: unknown transform {self.encryption!r}; "
                              f"known: {sorted(ENCRYPTION_KEY_BYTES)}")
        _check_bytes("esp.encryption_key", self.encryption_key)
        if len(self.encryption_key) not in ENCRYPTION_KEY_BYTES[self.encryption]:
            raise ConfigError(f"esp.encryption_key: {self.encryption} needs "
                              f"{ENCRYPTION_KEY_BYTES[self.encryption]} bytes, "
                              f"got {len(self.encryption_key)}")
        if self.encryption in AEAD_TRANSFORMS:
            if self.integrity is not None:
                raise ConfigError(f"esp.integrity: {self.encryption} is AEAD, integrity must be None")
        else:
            if self.integrity not in INTEGRITY_KEY_BYTES:
                raise ConfigError(f"esp.integrity: {self.encryption} needs one of "
                                  f"{sorted(INTEGRITY_KEY_BYTES)}, got {self.integrity!r}")
            _check_bytes("esp.integrity_key", self.integrity_key)
            if len(self.integrity_key) != INTEGRITY_KEY_BYTES[self.integrity]:
                raise ConfigError(f"esp.integrity_key: {self.integrity} needs "
                                  f"{INTEGRITY_KEY_BYTES[self.integrity]} bytes, "
                                  f"got {len(self.integrity_key)}")


HANDOVER_MODES = ("siu", "mobike")


@dataclass(frozen=True)
class IkeSettings:
    """IKEv2 (mipsec.ike) for the MN-GW SA pair, in config-file form (docs/operations.md).

    MN: ``local_id`` (its identity), ``remote_id`` (the GW's), ``psk`` shared with the GW.
    GW: ``local_id``; the PSK of each MN is in its ``GatewayMobile`` (``ike_id``, ``psk``).
    Proposals use the text form of mipsec.ike.proposals (``aes256gcm16``, ``aes128-sha256``).
    """
    local_id: str
    remote_id: str = ""
    psk: bytes = field(default=b"", repr=False)
    ike_proposals: tuple[str, ...] = ()
    esp_proposals: tuple[str, ...] = ()
    pfs_group: str = ""                  # "", "ecp256", "x25519", "modp2048"
    ike_lifetime_s: float = 14400.0
    child_lifetime_s: float = 3600.0
    dpd_interval_s: float = 30.0         # 0: no liveness checks
    force_encap: bool = False            # always ESP in UDP 4500 (RFC 3948)

    def __post_init__(self) -> None:
        if not self.local_id:
            raise ConfigError("ike.local_id: must be set")
        _check_bytes("ike.psk", self.psk)
        if self.psk and len(self.psk) < 8:
            raise ConfigError("ike.psk: at least 8 bytes")
        from mipsec.ike.proposals import parse_esp_suite, parse_ike_suite
        for p in self.ike_proposals:
            parse_ike_suite(p)
        for p in self.esp_proposals:
            parse_esp_suite(p)
        if self.pfs_group not in ("", "ecp256", "x25519", "modp2048"):
            raise ConfigError(f"ike.pfs_group: one of ecp256, x25519, modp2048 or empty, "
                              f"got {self.pfs_group!r}")
        for name in ("ike_lifetime_s", "child_lifetime_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ike.{name}: must be > 0")
        if self.dpd_interval_s < 0:
            raise ConfigError("ike.dpd_interval_s: must be >= 0")

    def ike_config(self, *, psks: dict[str, bytes], mobike: bool, local_ts: tuple[str, ...],
                   remote_ts: tuple[str, ...], initiator_of: str | None = None) -> Any:
        """The mipsec.ike IkeConfig for these settings."""
        from mipsec.ike.config import IkeConfig
        d: dict[str, Any] = {
            "local_id": self.local_id, "psks": psks, "mobike": mobike,
            "local_ts": list(local_ts), "remote_ts": list(remote_ts),
            "ike_lifetime_s": self.ike_lifetime_s, "child_lifetime_s": self.child_lifetime_s,
            "dpd_interval_s": self.dpd_interval_s or None, "force_encap": self.force_encap,
        }
        if initiator_of:
            d["remote_id"] = initiator_of
        if self.ike_proposals:
            d["ike_proposals"] = list(self.ike_proposals)
        if self.esp_proposals:
            d["esp_proposals"] = list(self.esp_proposals)
        if self.pfs_group:
            d["pfs_group"] = self.pfs_group
        return IkeConfig.from_dict(d)


def _check_mode(mode: str) -> None:
    if mode not in HANDOVER_MODES:
        raise ConfigError(f"handover_mode: one of {', '.join(HANDOVER_MODES)}, got {mode!r}")


@dataclass(frozen=True)
class MobileNodeConfig:
    name: str
    home_address: str
    home_agent: str
    gateway: str                     # the GW's outside address (outer destination of our ESP)
    home_prefix: str                 # e.g. "10.1.0.0/24"
    msa: MobilitySecurityAssociationConfig
    esp_in: EspSaConfig | None = None     # GW -> MN (manual keys; None with IKEv2)
    esp_out: EspSaConfig | None = None    # MN -> GW
    lifetime_s: int = REG_LIFETIME_S
    retransmit_initial_s: float = RETRANSMIT_INITIAL_S
    retransmit_max_s: float = RETRANSMIT_MAX_S
    max_attempts: int = RETRANSMIT_MAX_ATTEMPTS
    retransmit_min_s: float = RETRANSMIT_MIN_S
    renew_fraction: float = RENEW_FRACTION
    ike: IkeSettings | None = None        # IKEv2 negotiates the SA pair with the GW
    handover_mode: str = "siu"            # "siu" | "mobike" (needs ike)
    # the GWs to use, in order of preference (outside addresses; the first is ``gateway``):
    # when the one in use is gone the MN re-establishes IKEv2 with the next (docs/scaling.md)
    gateways: tuple[str, ...] = ()

    @property
    def gateway_list(self) -> tuple[str, ...]:
        """The GWs in order of preference: ``gateways``, or just ``gateway``."""
        return self.gateways or (self.gateway,)

    def __post_init__(self) -> None:
        _check_address("home_address", self.home_address)
        _check_address("home_agent", self.home_agent)
        _check_address("gateway", self.gateway)
        for i, gw in enumerate(self.gateways):
            _check_address(f"gateways[{i}]", gw)
        if self.gateways:
            if self.gateways[0] != self.gateway:
                raise ConfigError(f"gateways: the first entry is the GW in use first and must be "
                                  f"gateway ({self.gateway}), got {self.gateways[0]}")
            if len(set(self.gateways)) != len(self.gateways):
                raise ConfigError(f"gateways: an address is listed twice: {list(self.gateways)}")
            if len(self.gateways) > 1 and self.ike is None:
                raise ConfigError("gateways: several GWs need IKEv2 ([ike]): with manual keys "
                                  "the MN has one SA pair, shared with one GW")
        _check_prefix("home_prefix", self.home_prefix)
        net = ipaddress.IPv4Network(self.home_prefix)
        if ipaddress.IPv4Address(self.home_address) not in net:
            raise ConfigError(f"home_address: {self.home_address} is not in home_prefix {self.home_prefix}")
        if not 1 <= self.lifetime_s <= 65534:
            raise ConfigError(f"lifetime_s: in [1, 65534] (RFC 5944 §3.3), got {self.lifetime_s}")
        if not self.retransmit_initial_s > 0 or self.retransmit_max_s < self.retransmit_initial_s:
            raise ConfigError("retransmit_initial_s must be > 0 and <= retransmit_max_s")
        if not 0 < self.retransmit_min_s <= self.retransmit_max_s:
            raise ConfigError("retransmit_min_s must be > 0 and <= retransmit_max_s")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts: at least 1, got {self.max_attempts}")
        if not 0.1 <= self.renew_fraction < 1.0:
            raise ConfigError(f"renew_fraction: in [0.1, 1.0), got {self.renew_fraction}")
        _check_mode(self.handover_mode)
        if self.ike is None:
            if self.esp_in is None or self.esp_out is None:
                raise ConfigError("esp_in and esp_out: needed without [ike] (manual keys)")
            if self.esp_in.spi == self.esp_out.spi:
                raise ConfigError("esp_in.spi and esp_out.spi must differ")
            if self.handover_mode != "siu":
                raise ConfigError("handover_mode 'mobike' needs IKEv2 ([ike])")
        else:
            if not self.ike.remote_id:
                raise ConfigError("ike.remote_id: the GW's IKE identity must be set on an MN")
            if not self.ike.psk:
                raise ConfigError("ike.psk: the MN's pre-shared key with the GW must be set")


@dataclass(frozen=True)
class GatewayMobile:
    """One MN as the GW knows it: its SAs and where its tunnel may go."""
    home_address: str
    home_agent: str
    esp_in: EspSaConfig | None       # MN -> GW (wildcard source); None with IKEv2
    esp_out: EspSaConfig | None      # GW -> MN (re-pointed by SIUs)
    allowed_destinations: tuple[str, ...]   # prefixes, e.g. ("10.1.0.2/32", "10.1.0.0/24")
    ike_id: str = ""                 # IKEv2: the MN's identity (IDi) ...
    psk: bytes = field(default=b"", repr=False)   # ... and its pre-shared key
    # a plain IPsec client without Mobile IPv4 (e.g. a strongSwan road warrior): home_address
    # is its inner address, home_agent = "" (no HA), and the home side's packets for that address go
    # through its SA as they are (no IP-in-IP from an HA, no SIU ever moves it)
    road_warrior: bool = False

    def __post_init__(self) -> None:
        _check_address("mobile.home_address", self.home_address)
        if self.road_warrior:
            if self.home_agent:
                raise ConfigError(f"mobile {self.home_address}: a road warrior has no home "
                                  f"agent: home_agent = \"\", got {self.home_agent!r}")
        else:
            _check_address("mobile.home_agent", self.home_agent)
        _check_bytes("mobile.psk", self.psk)
        if (self.esp_in is None) != (self.esp_out is None):
            raise ConfigError(f"mobile {self.home_address}: esp_in and esp_out go together")
        if self.esp_in is None and not (self.ike_id and self.psk):
            raise ConfigError(f"mobile {self.home_address}: needs esp_in/esp_out (manual keys) "
                              f"or ike_id and psk (IKEv2)")
        if self.psk and len(self.psk) < 8:
            raise ConfigError(f"mobile {self.home_address}: psk at least 8 bytes")
        for p in self.allowed_destinations:
            _check_prefix(f"mobile {self.home_address}: allowed_destinations", p)


@dataclass(frozen=True)
class GatewayHomeAgent:
    """An HA allowed to send SIUs to this GW, with the HA-GW key (docs/protocol.md)."""
    address: str
    key_id: int
    key: bytes

    def __post_init__(self) -> None:
        _check_address("home_agent.address", self.address)
        _check_bytes("home_agent.key", self.key)
        if len(self.key) < 16:
            raise ConfigError(f"home_agent {self.address}: key at least 16 bytes")


@dataclass(frozen=True)
class GatewayConfig:
    name: str
    outside_address: str
    inside_address: str
    mobiles: tuple[GatewayMobile, ...] = ()
    home_agents: tuple[GatewayHomeAgent, ...] = ()
    ike: IkeSettings | None = None   # IKEv2 responder for the MNs with ike_id / psk
    handover_mode: str = "siu"       # "mobike": also accept MOBIKE address updates

    def __post_init__(self) -> None:
        _check_address("outside_address", self.outside_address)
        _check_address("inside_address", self.inside_address)
        _check_mode(self.handover_mode)
        seen: set[Any] = set()
        for m in self.mobiles:
            if m.esp_in is None and self.ike is None:
                raise ConfigError(f"mobile {m.home_address}: no esp_in/esp_out and no [ike]")
            keys: list[tuple[str, object]] = [("home", m.home_address)]
            if m.esp_in is not None:
                keys.append(("spi", m.esp_in.spi))
            if m.esp_out is not None:
                keys.append(("spi", m.esp_out.spi))
            if m.ike_id:
                keys.append(("ike_id", m.ike_id))
            for key in keys:
                if key in seen:
                    raise ConfigError(f"gateway mobiles: duplicate {key[0]} {key[1]!r}")
                seen.add(key)
        has = {h.address for h in self.home_agents}
        for m in self.mobiles:
            if m.home_agent not in has and not m.road_warrior:
                raise ConfigError(f"mobile {m.home_address}: home_agent {m.home_agent} is not "
                                  f"a configured HA")


@dataclass(frozen=True)
class HomeAgentGateway:
    """A GW this HA sends SIUs to (its inside address) with the HA-GW key."""
    address: str
    key_id: int
    key: bytes
    outside_address: str = ""        # the GW's outside address, if known: never a care-of address

    def __post_init__(self) -> None:
        _check_address("gateway.address", self.address)
        if self.outside_address:
            _check_address("gateway.outside_address", self.outside_address)
        _check_bytes("gateway.key", self.key)
        if len(self.key) < 16:
            raise ConfigError(f"gateway {self.address}: key at least 16 bytes")


@dataclass(frozen=True)
class HomeAgentMobile:
    home_address: str
    msa: MobilitySecurityAssociationConfig
    gateway: str                     # the GW's inside address (where SIUs go)
    gateway_spi: int = 0             # the GW's outbound SPI for this MN (names the SA in the SIU);
                                     #   0 = not known (IKEv2): the GW's SIU ACKs teach it

    def __post_init__(self) -> None:
        _check_address("mobile.home_address", self.home_address)
        _check_address("mobile.gateway", self.gateway)


@dataclass(frozen=True)
class HomeAgentConfig:
    name: str
    address: str
    home_prefix: str
    gateways: tuple[HomeAgentGateway, ...] = ()
    mobiles: tuple[HomeAgentMobile, ...] = ()
    max_lifetime_s: int = HA_MAX_LIFETIME_S
    siu_retransmit_s: float = SIU_RETRANSMIT_INITIAL_S     # 0: never resend an SIU
    siu_retransmit_tries: int = SIU_RETRANSMIT_TRIES

    def __post_init__(self) -> None:
        _check_address("address", self.address)
        _check_prefix("home_prefix", self.home_prefix)
        if not 0 <= self.siu_retransmit_s <= 5 or not 0 <= self.siu_retransmit_tries <= 16:
            raise ConfigError(f"siu_retransmit_s must be in [0, 5] and siu_retransmit_tries in "
                              f"[0, 16], got {self.siu_retransmit_s}, {self.siu_retransmit_tries}")
        net = ipaddress.IPv4Network(self.home_prefix)
        gws = {g.address for g in self.gateways}
        homes: set[str] = set()
        spis: set[int] = set()
        for m in self.mobiles:
            if ipaddress.IPv4Address(m.home_address) not in net:
                raise ConfigError(f"mobile {m.home_address}: not in home_prefix {self.home_prefix}")
            if m.gateway not in gws:
                raise ConfigError(f"mobile {m.home_address}: gateway {m.gateway} is not configured")
            if m.home_address in homes:
                raise ConfigError(f"mobiles: duplicate home address {m.home_address}")
            if m.msa.spi in spis:
                raise ConfigError(f"mobiles: duplicate MSA SPI {m.msa.spi} ({m.home_address})")
            homes.add(m.home_address)
            spis.add(m.msa.spi)


# --- a consistent lab set ------------------------------------------------------------------------

# docs/design.md "The lab / sim addressing plan"
LAB_HOME_PREFIX = "10.1.0.0/24"
LAB_HOME_PREFIX_LARGE = "10.1.0.0/16"   # used when more MNs than a /24 holds
LAB_CN = "10.1.0.10"
LAB_HA = "10.1.0.2"
LAB_GW_INSIDE = "10.1.0.1"
LAB_GW_OUTSIDE = "172.16.0.1"
LAB_FIRST_HOME_ADDRESS = "10.1.0.100"
LAB_SPI_MN_TO_GW = 0x10000000
LAB_SPI_GW_TO_MN = 0x20000000
LAB_MSA_SPI = 0x1000
LAB_GW_IKE_ID = "gw.mipsec.lab"
LAB_IKE_DOMAIN = "mipsec.lab"


@dataclass(frozen=True)
class LabConfigs:
    home_agent: HomeAgentConfig
    gateway: GatewayConfig
    mobiles: tuple[MobileNodeConfig, ...] = field(default_factory=tuple)
    more_gateways: tuple[GatewayConfig, ...] = ()     # GW 2, 3 ... of a GW pool

    @property
    def gateways(self) -> tuple[GatewayConfig, ...]:
        return (self.gateway, *self.more_gateways)


MAX_LAB_GATEWAYS = 8


def lab_gateway_addresses(k: int) -> tuple[str, str]:
    """(inside, outside) address of lab GW ``k`` (1-based): GW 1 is 10.1.0.1 / 172.16.0.1,
    GW k > 1 is 10.1.0.(20 + k) / 172.16.0.k (docs/design.md addressing plan)."""
    if not 1 <= k <= MAX_LAB_GATEWAYS:
        raise ConfigError(f"gateways: 1..{MAX_LAB_GATEWAYS}, got GW {k}")
    if k == 1:
        return LAB_GW_INSIDE, LAB_GW_OUTSIDE
    return f"10.1.0.{20 + k}", f"172.16.0.{k}"


def lab_home_address(index: int, n_mobiles: int = 1) -> str:
    """Home address of MN ``index`` (0-based): 10.1.0.100, .101, ... continuing past .254 in a /16."""
    base = int(ipaddress.IPv4Address(LAB_FIRST_HOME_ADDRESS))
    return str(ipaddress.IPv4Address(base + index))


def _key_source(keys_from: Any) -> Callable[[int], bytes]:
    if keys_from is None:
        return os.urandom
    if hasattr(keys_from, "randbytes"):           # random.Random (reproducible tests)
        return keys_from.randbytes
    if callable(keys_from):
        return keys_from
    raise ConfigError(f"keys_from: a random.Random, a callable(n) -> bytes or None, got {keys_from!r}")


def make_lab_configs(n_mobiles: int = 1, keys_from: Any = None, *,
                     encryption: str = "ENCR_AES_GCM_16", integrity: str | None = None,
                     encryption_key_bytes: int | None = None,
                     msa_algorithm: str = "hmac-md5", udp_encap: bool = False,
                     lifetime_s: int = REG_LIFETIME_S,
                     retransmit_initial_s: float = RETRANSMIT_INITIAL_S,
                     max_attempts: int = RETRANSMIT_MAX_ATTEMPTS, sa_source: str = "manual",
                     retransmit_max_s: float = RETRANSMIT_MAX_S,
                     handover_mode: str = "siu",
                     ike: dict[str, Any] | None = None, n_gateways: int = 1) -> LabConfigs:
    """A matching HA / GW / MN config set on the docs/design.md addressing plan.

    ``keys_from`` is where key bytes come from: ``None`` (os.urandom), a ``random.Random``
    (reproducible) or a callable ``n -> bytes``.  MN ``i`` gets home address 10.1.0.100 + i; with
    more than 150 MNs the home prefix becomes 10.1.0.0/16.

    ``sa_source="ikev2"``: no ESP keys; the MN and the GW get ``IkeSettings`` (identities
    ``mn<i>@mipsec.lab`` and ``gw.mipsec.lab``, one random PSK per MN; ``ike`` overrides
    ``IkeSettings`` fields, e.g. ``{"child_lifetime_s": 60}``), the HA ``gateway_spi=0``.

    ``n_gateways > 1`` (IKEv2 only): a GW pool sharing one IKE identity, each GW knowing every
    MN (PSKs included) and holding its own HA-GW key; MN ``i``'s ordered ``gateways`` list starts
    at GW ``i mod n`` and goes round, so the MNs are spread over the GWs and each has the others
    to fall back on.
    """
    if sa_source not in ("manual", "ikev2"):
        raise ConfigError(f"sa_source: 'manual' or 'ikev2', got {sa_source!r}")
    use_ike = sa_source == "ikev2"
    ike_extra = dict(ike or {})
    if not isinstance(n_mobiles, int) or not 1 <= n_mobiles <= 60000:
        raise ConfigError(f"n_mobiles: in [1, 60000], got {n_mobiles!r}")
    if not isinstance(n_gateways, int) or not 1 <= n_gateways <= MAX_LAB_GATEWAYS:
        raise ConfigError(f"n_gateways: in [1, {MAX_LAB_GATEWAYS}], got {n_gateways!r}")
    if n_gateways > 1 and not use_ike:
        raise ConfigError("n_gateways: several GWs need sa_source='ikev2' (manual keys are one "
                          "SA pair with one GW)")
    gw_addrs = [lab_gateway_addresses(k) for k in range(1, n_gateways + 1)]
    rnd = _key_source(keys_from)
    prefix = LAB_HOME_PREFIX if n_mobiles <= 150 else LAB_HOME_PREFIX_LARGE
    enc_len = encryption_key_bytes or ENCRYPTION_KEY_BYTES.get(encryption, (16,))[0]
    if integrity is None and encryption not in AEAD_TRANSFORMS:
        integrity = "AUTH_HMAC_SHA2_256_128"
    int_len = INTEGRITY_KEY_BYTES.get(integrity, 0) if integrity else 0

    def esp(spi: int) -> EspSaConfig:
        return EspSaConfig(spi=spi, encryption=encryption, encryption_key=rnd(enc_len),
                           integrity=integrity, integrity_key=rnd(int_len) if int_len else b"",
                           udp_encap=udp_encap)

    siu_keys = [rnd(SIU_KEY_BYTES) for _ in gw_addrs]
    mns, gw_mobiles, ha_mobiles = [], [], []
    for i in range(n_mobiles):
        home = lab_home_address(i, n_mobiles)
        msa = MobilitySecurityAssociationConfig(spi=LAB_MSA_SPI + i, key=rnd(16), algorithm=msa_algorithm)
        name = f"mn{i + 1}" if n_mobiles > 1 else "mn"
        if use_ike:
            to_gw = to_mn = None
            ike_id, psk = f"{name}@{LAB_IKE_DOMAIN}", rnd(32)
            mn_ike = IkeSettings(local_id=ike_id, remote_id=LAB_GW_IKE_ID, psk=psk, **ike_extra)
        else:
            to_gw, to_mn = esp(LAB_SPI_MN_TO_GW + i), esp(LAB_SPI_GW_TO_MN + i)
            ike_id, psk, mn_ike = "", b"", None
        first = i % n_gateways
        order = [gw_addrs[(first + j) % n_gateways] for j in range(n_gateways)]
        mns.append(MobileNodeConfig(
            name=name, home_address=home, home_agent=LAB_HA,
            gateway=order[0][1], gateways=tuple(o for _i, o in order) if n_gateways > 1 else (),
            home_prefix=prefix, msa=msa, esp_in=to_mn, esp_out=to_gw,
            lifetime_s=lifetime_s, retransmit_initial_s=retransmit_initial_s,
            retransmit_max_s=max(retransmit_max_s, retransmit_initial_s), max_attempts=max_attempts,
            ike=mn_ike, handover_mode=handover_mode))
        gw_mobiles.append(GatewayMobile(home_address=home, home_agent=LAB_HA, esp_in=to_gw, esp_out=to_mn,
                                        allowed_destinations=(f"{LAB_HA}/32", prefix),
                                        ike_id=ike_id, psk=psk))
        ha_mobiles.append(HomeAgentMobile(home_address=home, msa=msa, gateway=order[0][0],
                                          gateway_spi=to_mn.spi if to_mn else 0))
    gws = [GatewayConfig(name="gw" if g == 0 else f"gw{g + 1}", outside_address=outside,
                         inside_address=inside, mobiles=tuple(gw_mobiles),
                         home_agents=(GatewayHomeAgent(address=LAB_HA, key_id=g + 1,
                                                       key=siu_keys[g]),),
                         ike=(IkeSettings(local_id=LAB_GW_IKE_ID,
                                          **{k: v for k, v in ike_extra.items() if k != "psk"})
                              if use_ike else None),
                         handover_mode=handover_mode)
           for g, (inside, outside) in enumerate(gw_addrs)]
    ha = HomeAgentConfig(name="ha", address=LAB_HA, home_prefix=prefix,
                         gateways=tuple(HomeAgentGateway(address=inside, key_id=k + 1,
                                                         key=siu_keys[k], outside_address=outside)
                                        for k, (inside, outside) in enumerate(gw_addrs)),
                         mobiles=tuple(ha_mobiles))
    return LabConfigs(home_agent=ha, gateway=gws[0], mobiles=tuple(mns),
                      more_gateways=tuple(gws[1:]))
