"""The IKE endpoint: every IKE SA of one node behind one pair of UDP ports (500, 4500).

``IkeEndpoint`` is what a runtime drives (the roles through ``mipsec.node.ike.RoleIke``, in the
daemons and the simulator; the in-memory tests; the benchmark)::

    ep = IkeEndpoint(config)
    out = ep.initiate(local=("172.16.1.10", 500), remote=("172.16.0.1", 500), now=now)
    out = ep.receive_datagram(udp_payload, local=(ip, port), remote=(ip, port), now=now)
    out = ep.handle_timer(now);  ep.get_timer() -> float | None
    ep.ike_sas, ep.drops, ep.status()

Each call returns ``SendDatagram`` outputs and events (``mipsec.ike.events``) in order.  The
events are plain data naming an IKE SA by its ``ike_id``; a runtime acts on an IKE SA only
through the endpoint, with that identifier::

    ep.info(ike_id) -> IkeSaInfo | None;  ep.infos()
    ep.delete_child(ike_id, spi_in, now);  ep.check_liveness(ike_id, now)
    ep.update_addresses(ike_id, local, now)            # MOBIKE (RFC 4555 §3.5)
    ep.follow_addresses(ike_id, local=..., remote=...) # moved by other means (the SIU)
``receive_datagram`` takes the UDP payload exactly as received: on port 4500 that is the
RFC 3948 non-ESP marker and the IKE message, or a NAT keepalive; ESP in UDP is the runtime's
business (``classify_udp`` tells the three apart).

Demultiplexing (§2.1, §3.1): a message belongs to the IKE SA whose SPI *we* chose (the
responder's SPI when the message has the I flag, the initiator's otherwise).  An IKE_SA_INIT
request (responder SPI zero) either is a retransmission for a half-open SA (same initiator SPI and
address) or starts a new responder SA.

Cookies (§2.6): above ``config.cookie_threshold`` half-open SAs (0 = always) an IKE_SA_INIT
request without a valid COOKIE is answered with one and no state is kept.  The cookie is
``version | SHA-256(Ni | IPi | SPIi | secret[version])``; the secret is derived from a random
master key and the time slot (``COOKIE_SECRET_LIFETIME_S``), and the previous slot is still
accepted, so secrets rotate without a timer.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.ike import codec
from mipsec.ike.config import Address, IkeConfig
from mipsec.ike.constants import (
    COOKIE_SECRET_LIFETIME_S,
    NAT_KEEPALIVE,
    NON_ESP_MARKER,
    ExchangeType,
    Flag,
    NotifyType,
)
from mipsec.ike.events import (
    ChildSaDeleted,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaId,
    IkeSaInfo,
    IkeSaRekeyed,
    SendDatagram,
)
from mipsec.ike.sa import IkeSa, State

Random = Callable[[int], bytes]


def classify_udp(payload: bytes) -> str:
    """What arrived on UDP port 4500 (RFC 3948 §2.2): "ike", "keepalive" or "esp"."""
    if payload == NAT_KEEPALIVE:
        return "keepalive"
    if payload[:4] == NON_ESP_MARKER:
        return "ike"
    return "esp"


class IkeEndpoint:
    def __init__(self, config: IkeConfig, *, random: Random = os.urandom):
        self.config = config
        self._random = random
        self._by_spi: dict[bytes, IkeSa] = {}          # our SPI -> SA
        self._half_open: dict[tuple[bytes, Address], IkeSa] = {}
        self._esp_spis: set[int] = set()
        self._cookie_master = random(32)
        self.drops: Counter[DropReason] = Counter()
        self.events: list = []                         # kept for status(): last few events
        # which inbound ESP SPI to use for a random candidate and the peer's identity (None:
        # the candidate): a GW with worker processes picks the worker that holds the peer's
        # SAs (mipsec.node.gateway_worker); ``_serving``: the IKE SA being driven right now
        self.esp_spi_policy: Callable[[int, str | None], int] | None = None
        self._serving: IkeSa | None = None

    # --- public API -------------------------------------------------------------------------

    @property
    def ike_sas(self) -> list[IkeSa]:
        seen, out = set(), []
        for sa in self._by_spi.values():
            if id(sa) not in seen:
                seen.add(id(sa))
                out.append(sa)
        return out

    def initiate(self, local: Address, remote: Address, now: float) -> list:
        sa = IkeSa.new_initiator(self.config, local, remote, now=now, random=self._random,
                                 alloc_esp_spi=self._alloc_esp_spi, drops=self.drops,
                                 release_esp_spi=self._esp_spis.discard)
        while sa.spi_i in self._by_spi:
            sa.spi_i = self._random(8)
        self._by_spi[sa.spi_i] = sa
        return self._track(sa, sa.start(now))

    def reestablish(self, local: Address, remote: Address, now: float) -> list:
        """Start a fresh IKE SA to ``remote`` from ``local`` (e.g. the MN's new care-of address
        after its registrations failed) and forget every IKE SA we have with that peer: they
        cannot be reached any more, and our INITIAL_CONTACT makes the peer drop them too."""
        return self.abandon(remote[0], "replaced by a new IKE SA") + self.initiate(local, remote,
                                                                                  now)

    def abandon(self, peer: str, reason: str) -> list:
        """End every IKE SA with ``peer`` here, without an exchange (we cannot reach it from
        where they speak), each with its child SAs first (RFC 7296 §1.4.1) and ``reason``."""
        out = []
        for sa in self.ike_sas:
            if sa.remote[0] == peer and sa.state != State.CLOSED:
                out += self._track(sa, sa.abandon(reason))
        return out

    def receive_datagram(self, data: bytes, local: Address, remote: Address, now: float) -> list:
        if remote[1] == 0 or _no_unicast_source(remote[0]):
            # the UDP/IP header is not covered by IKE's integrity: an on-path rewrite to port 0
            # or to a source no reply can go to (0/8, multicast, 240/4, broadcast) would become
            # an ESP SA's UDP port or a MOBIKE / NAT peer address that cannot be used
            self.drops[DropReason.MALFORMED] += 1
            return []
        if local[1] != 500:                           # our NAT-T socket (RFC 3948 §2.2)
            kind = classify_udp(data)
            if kind == "keepalive":
                self.drops[DropReason.NAT_KEEPALIVE] += 1
                return []
            if kind == "esp":
                self.drops[DropReason.WRONG_PROTOCOL] += 1
                return []
            data = data[4:]
        try:
            m = codec.parse_message(data)
        except ParseError as e:
            self.drops[e.reason] += 1
            return []
        h = m.header
        if h.exchange == ExchangeType.IKE_SA_INIT and not h.is_response:
            return self._init_request(m, local, remote, now)
        ours = h.spi_r if h.from_initiator else h.spi_i
        sa = self._by_spi.get(ours)
        if sa is None:
            self.drops[DropReason.IKE_UNKNOWN_SA] += 1
            return []
        self._serving = sa
        try:
            return self._track(sa, sa.receive(m, local, remote, now))
        finally:
            self._serving = None

    # --- acting on one IKE SA, named by the ``ike_id`` of its events ---------------------------

    def info(self, ike_id: IkeSaId | None) -> IkeSaInfo | None:
        """A snapshot of the live IKE SA ``ike_id`` (None: unknown or ended)."""
        sa = self._live(ike_id)
        return _info(sa) if sa is not None else None

    def infos(self) -> list[IkeSaInfo]:
        """Every live IKE SA, oldest first."""
        return [_info(sa) for sa in self.ike_sas if sa.state != State.CLOSED]

    def delete_child(self, ike_id: IkeSaId, spi_in: int, now: float) -> list:
        """Delete one child SA at the peer (§1.4.1); nothing if the IKE SA or child is gone."""
        sa = self._live(ike_id)
        if sa is None or spi_in not in sa.children:
            return []
        return self._track(sa, sa.delete_child(spi_in, now))

    def check_liveness(self, ike_id: IkeSaId, now: float) -> list:
        sa = self._need(ike_id)
        return self._track(sa, sa.check_liveness(now))

    def update_addresses(self, ike_id: IkeSaId, local: Address, now: float) -> list:
        sa = self._need(ike_id)
        return self._track(sa, sa.update_addresses(local, now))

    def follow_addresses(self, ike_id: IkeSaId, *, local: str | None = None,
                         remote: str | None = None) -> None:
        """Move the IKE SA's local and/or remote address, ports kept, without an exchange
        (``IkeSa.follow_addresses``: the runtime moved its ESP SAs by other means); nothing if
        the IKE SA is gone."""
        sa = self._live(ike_id)
        if sa is not None:
            sa.follow_addresses(local=(local, sa.local[1]) if local is not None else None,
                                remote=(remote, sa.remote[1]) if remote is not None else None)

    def reserve_esp_spi(self, spi: int) -> None:
        """An inbound ESP SPI the runtime uses outside IKE (manual keys): never allocate it."""
        self._esp_spis.add(spi)

    def get_timer(self) -> float | None:
        times = [t for t in (sa.get_timer() for sa in self.ike_sas) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> list:
        out = []
        for sa in self.ike_sas:
            t = sa.get_timer()
            if t is not None and now >= t:
                self._serving = sa
                try:
                    out += self._track(sa, sa.handle_timer(now))
                finally:
                    self._serving = None
        return out

    def status(self) -> dict[str, Any]:
        return {"ike_sas": [sa.status() for sa in self.ike_sas],
                "drops": {str(k): v for k, v in self.drops.items() if v}}

    def sizes(self) -> dict[str, int]:
        """How many entries each table holds (a soak test watches that none grows)."""
        return {"ike_sas": len(self.ike_sas), "spis": len(self._by_spi),
                "half_open": len(self._half_open), "esp_spis": len(self._esp_spis),
                "children": sum(len(sa.children) for sa in self.ike_sas)}

    # --- internals ----------------------------------------------------------------------------

    def _live(self, ike_id: IkeSaId | None) -> IkeSa | None:
        sa = self._by_spi.get(ike_id) if ike_id is not None else None
        return sa if sa is not None and sa.ike_id == ike_id and sa.state != State.CLOSED else None

    def _need(self, ike_id: IkeSaId) -> IkeSa:
        sa = self._live(ike_id)
        if sa is None:
            raise UsageError(f"no live IKE SA {ike_id.hex()}")
        return sa

    def _alloc_esp_spi(self) -> int:
        policy = self.esp_spi_policy
        peer = self._serving.peer_id if self._serving is not None else None
        while True:
            spi = int.from_bytes(self._random(4), "big")
            if policy is not None:
                spi = policy(spi, peer)
            if spi >= 256 and spi not in self._esp_spis:     # RFC 4303 §2.1
                self._esp_spis.add(spi)
                return spi

    def _track(self, sa: IkeSa, out: list) -> list:
        """Keep the SPI table in step with the events an SA reports."""
        extra: list = []
        for ev in out:
            if isinstance(ev, IkeSaEstablished) and ev.initial_contact:
                # §2.4: the peer has no other IKE SA with us: drop the ones it forgot
                for other in self.ike_sas:
                    if other.ike_id != ev.ike_id and other.peer_id == ev.peer_id \
                            and other.state != State.CLOSED:
                        gone = other.abandon("INITIAL_CONTACT from the peer")
                        self._forget(other)
                        for child_ev in gone:         # (abandon emptied other.children)
                            if isinstance(child_ev, ChildSaDeleted):
                                self._esp_spis.discard(child_ev.child.spi_in)
                        extra += gone
            if isinstance(ev, IkeSaRekeyed):
                old = self._by_spi.get(ev.ike_id)
                new = old.successor if old is not None else None
                if isinstance(new, IkeSa):
                    self._by_spi[new.ike_id] = new
            elif isinstance(ev, (IkeSaDeleted, IkeSaFailed)):
                ended = self._by_spi.get(ev.ike_id)
                if ended is not None:
                    self._forget(ended)
            elif isinstance(ev, ChildSaDeleted):
                # its SPI may be allocated again (else every re-key would grow the set)
                self._esp_spis.discard(ev.child.spi_in)
        if sa.state != State.INIT_ANSWERED:
            for key, s in list(self._half_open.items()):
                if s is sa:
                    del self._half_open[key]
        return out + extra

    def _forget(self, sa: IkeSa) -> None:
        for spi in (sa.spi_i, sa.spi_r):
            if self._by_spi.get(spi) is sa:
                del self._by_spi[spi]
        for key, s in list(self._half_open.items()):
            if s is sa:
                del self._half_open[key]
        for ch in sa.children.values():
            self._esp_spis.discard(ch.spi_in)

    def _cookie(self, m: codec.Message, remote: Address, version: int) -> bytes:
        version %= 1 << 16
        secret = hmac.new(self._cookie_master, version.to_bytes(2, "big"), hashlib.sha256).digest()
        nonce = m.find(codec.NoncePayload)
        ni = nonce.data if nonce else b""
        digest = hashlib.sha256(ni + ipaddress.IPv4Address(remote[0]).packed + m.header.spi_i
                                + secret).digest()
        return version.to_bytes(2, "big") + digest

    def _init_request(self, m: codec.Message, local: Address, remote: Address, now: float) -> list:
        h = m.header
        if any(h.spi_r) or h.message_id != 0 or not h.from_initiator:
            self.drops[DropReason.MALFORMED] += 1
            return []
        if m.encrypted is not None:
            self.drops[DropReason.IKE_UNEXPECTED_EXCHANGE] += 1
            return []
        old = self._half_open.get((h.spi_i, remote))
        if old is not None:
            return self._track(old, old.retransmitted_init(m, local, remote, now))
        threshold = self.config.cookie_threshold
        if threshold is not None and len(self._half_open) >= threshold:
            slot = int(now // COOKIE_SECRET_LIFETIME_S)
            got = m.notifies(NotifyType.COOKIE)
            first_is_cookie = bool(m.payloads) and isinstance(m.payloads[0], codec.NotifyPayload) \
                and m.payloads[0].type == NotifyType.COOKIE
            valid = first_is_cookie and any(
                hmac.compare_digest(got[0].data, self._cookie(m, remote, v))
                for v in (slot, slot - 1))
            if not valid:
                if got:
                    self.drops[DropReason.IKE_INVALID_COOKIE] += 1
                resp = codec.build_message(
                    codec.Header(h.spi_i, bytes(8), h.exchange, Flag.RESPONSE, 0),
                    [codec.NotifyPayload(NotifyType.COOKIE, self._cookie(m, remote, slot))])
                marker = b"" if local[1] == 500 else NON_ESP_MARKER
                return [SendDatagram(marker + resp, local, remote)]
        spi_r = b""
        while not any(spi_r) or spi_r in self._by_spi:
            spi_r = self._random(8)
        sa, out = IkeSa.respond_init(self.config, m, local, remote, now, spi_r=spi_r,
                                     random=self._random, drops=self.drops,
                                     alloc_esp_spi=self._alloc_esp_spi,
                                     release_esp_spi=self._esp_spis.discard)
        if sa is not None:
            self._by_spi[spi_r] = sa
            self._half_open[(h.spi_i, remote)] = sa
        return out


def _info(sa: IkeSa) -> IkeSaInfo:
    return IkeSaInfo(ike_id=sa.ike_id, name=sa.name, state=sa.state.value,
                     established=sa.is_established, initiator=sa.initiator,
                     peer_id=sa.peer_id or "", local=sa.local, remote=sa.remote,
                     mobike=sa.peer_mobike and sa.config.mobike,
                     children=tuple(sa.children), created=sa.created, last_heard=sa.last_heard)


def _no_unicast_source(address: str) -> bool:
    """RFC 1122 §3.2.1.3 / RFC 6890: 0/8, multicast 224/4, 240/4 and broadcast are never the
    source of a datagram we could answer (loopback is: the daemons' tests use it)."""
    try:
        first = int(address.split(".", 1)[0])
    except (ValueError, AttributeError):
        return True
    return first == 0 or first >= 224
