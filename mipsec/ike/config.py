"""IKE configuration, validated at construction.  What the sans-I/O core hands its runtime
(datagrams and events) is in ``mipsec.ike.events``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from mipsec.errors import ConfigError
from mipsec.ike.codec import TrafficSelector
from mipsec.ike.constants import (
    COOKIE_THRESHOLD_HALF_OPEN,
    DPD_INTERVAL_S,
    NAT_KEEPALIVE_INTERVAL_S,
    IdType,
)
from mipsec.ike.crypto import IkeSuite
from mipsec.ike.proposals import EspSuite, parse_esp_suite, parse_ike_suite

Address = tuple[str, int]


def identity(text: str) -> tuple[int, bytes]:
    """An ID payload (§3.5) for a configured identity: an IPv4 address, user@fqdn or an FQDN."""
    try:
        return IdType.ID_IPV4_ADDR, ipaddress.IPv4Address(text).packed
    except ValueError:
        pass
    if "@" in text.lstrip("@"):
        return IdType.ID_RFC822_ADDR, text.encode()
    return IdType.ID_FQDN, text.lstrip("@").encode()


def identity_text(id_type: int, data: bytes) -> str:
    if id_type == IdType.ID_IPV4_ADDR and len(data) == 4:
        return str(ipaddress.IPv4Address(data))
    return data.decode("utf-8", "replace")


@dataclass(frozen=True)
class IkeConfig:
    """One side's IKE policy.  ``psks`` maps a peer identity to its pre-shared key; the key
    ``"*"`` is used for any other peer (a GW serving many MNs may use it)."""
    local_id: str
    psks: dict[str, bytes]
    remote_id: str | None = None                 # initiator: IDr we send and expect
    ike_suites: tuple[IkeSuite, ...] = ()
    esp_suites: tuple[EspSuite, ...] = ()
    local_ts: tuple[TrafficSelector, ...] = (TrafficSelector("0.0.0.0", "255.255.255.255"),)
    remote_ts: tuple[TrafficSelector, ...] = (TrafficSelector("0.0.0.0", "255.255.255.255"),)
    pfs_group: int = 0                           # DH group for child re-keys (0: no PFS)
    ike_lifetime_s: float | None = 14400.0       # re-key the IKE SA after this long
    child_lifetime_s: float | None = 3600.0      # re-key each child SA after this long
    dpd_interval_s: float | None = DPD_INTERVAL_S
    nat_keepalive_s: float = NAT_KEEPALIVE_INTERVAL_S
    force_encap: bool = False                    # pretend to be behind a NAT (RFC 3948 always)
    mobike: bool = True                          # RFC 4555: offer / accept MOBIKE
    cookie_threshold: int | None = COOKIE_THRESHOLD_HALF_OPEN  # responder: half-open SAs
                                                 #   before cookies (0 always, None never)
    initial_contact: bool = True

    def __post_init__(self) -> None:
        if not self.local_id:
            raise ConfigError("ike.local_id: must be set")
        if not self.psks:
            raise ConfigError("ike.psks: at least one pre-shared key is needed")
        for k, v in self.psks.items():
            if not isinstance(v, bytes) or len(v) < 8:
                raise ConfigError(f"ike.psks[{k!r}]: must be bytes of at least 8 octets")
        if not self.ike_suites:
            object.__setattr__(self, "ike_suites", DEFAULT_IKE)
        if not self.esp_suites:
            object.__setattr__(self, "esp_suites", DEFAULT_ESP)

    def psk_for(self, peer_id: str) -> bytes | None:
        return self.psks.get(peer_id, self.psks.get("*"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IkeConfig:
        """From a config mapping: proposals as text (``aes256-sha256-ecp256``), TS as prefixes,
        PSKs as text."""
        d = dict(data)
        try:
            psks = {k: (v.encode() if isinstance(v, str) else bytes(v))
                    for k, v in d.pop("psks").items()}
        except KeyError:
            raise ConfigError("ike.psks: missing") from None
        kw: dict[str, Any] = {"psks": psks}
        if "ike_proposals" in d:
            kw["ike_suites"] = tuple(parse_ike_suite(p) for p in d.pop("ike_proposals"))
        if "esp_proposals" in d:
            kw["esp_suites"] = tuple(parse_esp_suite(p) for p in d.pop("esp_proposals"))
        for side in ("local_ts", "remote_ts"):
            if side in d:
                try:
                    kw[side] = tuple(TrafficSelector.from_network(n) for n in d.pop(side))
                except ValueError as e:
                    raise ConfigError(f"ike.{side}: {e}") from None
        if "pfs_group" in d:
            from mipsec.ike.proposals import _DH
            g = d.pop("pfs_group")
            kw["pfs_group"] = _DH[g] if isinstance(g, str) and g in _DH else int(g or 0)
        kw.update(d)
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"ike: {e}") from None


DEFAULT_IKE = (parse_ike_suite("aes256-sha256-prfsha256-ecp256"),
               parse_ike_suite("aes128gcm16-prfsha256-x25519"),
               parse_ike_suite("aes256-sha256-prfsha256-modp2048"))
DEFAULT_ESP = (parse_esp_suite("aes256gcm16"), parse_esp_suite("aes128-sha256"))

