"""The VPN gateway (GW) role, sans-I/O.

Theory of operation
-------------------
The GW sits at the edge of the home network: an outside address on the Internet, an inside
address on the home network.  Each mobile node (MN) has one ESP SA pair with it:

* the inbound SA (MN -> GW) has a wildcard source (``remote=None``): the MN may send from any
  care-of address (CoA) and the SA still authenticates it.  After decapsulation the inner packet
  must go to one of the MN's allowed destinations (its HA, its home prefix), else it is dropped
  as FORBIDDEN_DESTINATION, and must not claim to come from another home-side address
  (FORBIDDEN_SOURCE, ``Mobile.may_send_from``).  Allowed packets go on into the home network
  (``WriteToTun``).  A Registration Request seen inside is forwarded with its MIP message
  unchanged (the GW never acts on it) but from the GW's inside address (UDP from our inside
  address, the request's ports kept): so the HA learns from the request's path which GW of a
  pool holds this MN's SAs, and sends its SIU there; the care-of address it registers is
  remembered for that MN with the *outer*
  source address and UDP port the request came from (``Mobile.rrq_sources``, the last
  ``RRQ_SOURCES_PER_MOBILE`` for ``RRQ_SOURCE_MAX_AGE_S``; raw ESP only from that very
  address, ESP in UDP also from a NAT's public address): an SIU naming that CoA may point
  the MN's SA there and nowhere else.
* the outbound SA (GW -> MN) carries the MN's downlink (the HA's IP-in-IP).  Home-side packets
  are matched to an MN by the MN itself, the home address inside the IP-in-IP (inner
  destination), never by the outer destination: one MN cannot capture another's downlink by
  registering its CoA, and two MNs behind one NAT (one public CoA) each keep their own.  Not
  IP-in-IP or no such MN: NO_POLICY; the MN's SA has no outer binding: NO_SA.  The SA's outer
  destination, the *binding*, moves only when an authenticated, fresh Security Information
  Update (SIU, docs/protocol.md) from the MN's HA says so (or, in MOBIKE mode only, an
  authenticated UPDATE_SA_ADDRESSES, docs/protocol.md §2.4).

SIU processing (``receive_siu``: the adapter calls it only for datagrams that arrived on the
inside interface; an SIU anywhere else is SIU_WRONG_INTERFACE), in this order: UDP to our
inside address and SIU port; ``SiuVerifier.authenticate`` (source is a configured HA, HMAC:
SIU_UNKNOWN_SENDER / SIU_AUTH_FAILED); ``freshness``: the sequence number is new in that HA's
replay window (SIU_REPLAYED) and the SIU echoes our epoch, a random number drawn at start, or
carries epoch 0 and a Timestamp from after our start (else SIU_STALE_EPOCH: from before our
restart; answered with an ACK that tells the HA the epoch, flag E); the MN is known and served by
that HA (SIU_UNKNOWN_MOBILE, SIU_UNKNOWN_SENDER); the SIU names this MN's outbound SPI
(SIU_UNKNOWN_SA); an UPDATE's or REJECT's new CoA can be a tunnel endpoint
(``ipip.unusable_care_of``, MIP_BAD_CARE_OF) and is the outer source of a recent authenticated
Registration Request of this MN (SIU_CARE_OF_MISMATCH: an authenticated MN cannot aim its
downlink at a third party); an embedded RRP is a Registration Reply for this MN from this HA
(SIU_RRP_MISMATCH); then the binding machine (``mipsec/mobility/gw_binding.py``).  Refusals
before authentication and replays are only counted; refusals of authenticated SIUs also record
"siu-refused".  A move re-points the SA (address, and the UDP port the Registration Request came
from) and returns ``RebindSa`` BEFORE the embedded Registration Reply is encrypted and sent: the
reply can only go out through the re-pointed SA.  Every authenticated, non-replayed UPDATE /
DEREGISTER / REJECT is answered with an ACK to its HA (signed with the HA-GW key, echoing the
sequence, reporting where the SA points now and our epoch), also when it was refused: that tells
the HA the GW's real binding so it can send a correcting SIU.

The binding state machine per MN, the compare-and-swap of the SIU (``BindingState``,
``BINDING_TRANSITIONS``), and all the state it works on (the binding, the RRQ sources, the last
SIU sequence applied) are in ``mipsec/mobility/gw_binding.py``: ``Mobile`` is that machine plus
the MN's SAs and counters.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from mipsec.constants import UNSPECIFIED_ADDRESS
from mipsec.drops import DropReason
from mipsec.errors import Dropped, ParseError, SaExhausted, UsageError
from mipsec.ike.book import ChildSaBook
from mipsec.ipsec.sa import Direction, SecurityAssociation
from mipsec.ipsec.sad import Sad
from mipsec.mip.constants import SIU_PORT
from mipsec.mip.security import ntp_from_unix
from mipsec.mip.siu import SiuSigner, SiuVerifier
from mipsec.mobility.gw_binding import (  # noqa: F401  (re-exported: the role's vocabulary)
    BINDING_TRANSITIONS,
    RRQ_SOURCES_PER_MOBILE,
    BindingEvent,
    BindingState,
    Effect,
    GwBinding,
    classify,
)
from mipsec.node import timeline as tl
from mipsec.node.actions import Action, SendToNet, TimelineEvent, WriteToTun
from mipsec.node.config import MIP_PORT, GatewayConfig, GatewayMobile
from mipsec.node.gateway_ike import LINEAGE_SPIS, GatewayIke
from mipsec.node.gateway_siu import GatewaySiu
from mipsec.node.ike import RoleIke
from mipsec.node.mobile_node import make_sa
from mipsec.node.packet import (
    IPPROTO_ESP,
    IPPROTO_IPIP,
    IPPROTO_UDP,
    a2b,
    b2a,
    build_udp_packet,
    parse_prefix,
    peek_ipv4,
    udp_ports,
)
from mipsec.wire.mip import MSG_REGISTRATION_REQUEST

UNBOUND_ADDRESS = UNSPECIFIED_ADDRESS    # the outer destination of an SA no SIU has bound
STATUS_MOBILES = 256           # MNs shown in detail by status() (all are counted)

_unpack_total_frag = struct.Struct("!H2xH").unpack_from   # IPv4 total length, flags+offset
_unpack_spi = struct.Struct("!I").unpack_from


class Mobile(GwBinding):
    """What the GW keeps per MN: its binding machine (``GwBinding``: the binding, the RRQ
    sources, the last SIU applied) plus its current SAs and counters (every collection
    bounded: ``LINEAGE_SPIS``, ``RRQ_SOURCES_PER_MOBILE``; IKEv2's other pairs, re-keyed ones
    in their grace period too, are the GW's ``book``'s)."""

    __slots__ = ("home_address", "home_agent", "inbound", "outbound", "allowed",
                 "allowed_text", "packets_up", "packets_down", "home_bytes",
                 "lineage", "ike_id", "installed_at", "road_warrior")

    def __init__(self, home_address: str, home_agent: str, inbound: SecurityAssociation,
                 outbound: SecurityAssociation, allowed: Iterable[str],
                 road_warrior: bool = False):
        super().__init__(f"GW binding of {home_address}")
        # no Mobile IPv4 (GatewayMobile.road_warrior): the downlink is the home side's plain
        # packets for home_address, not an HA's IP-in-IP
        self.road_warrior = road_warrior
        self.home_address = home_address
        self.home_bytes = a2b(home_address)
        self.home_agent = home_agent
        self.inbound = inbound
        self.outbound = outbound
        self.allowed_text = tuple(allowed)
        self.allowed = tuple(parse_prefix(p) for p in self.allowed_text)
        self.packets_up = 0
        self.packets_down = 0
        self.lineage: list[int] = []      # earlier outbound SPIs of this MN (re-keys), newest last
        self.ike_id: bytes | None = None  # the IKE SA that made these SAs (IKEv2 mode)
        self.installed_at = 0.0

    def names_spi(self, spi: int) -> bool:
        """docs/protocol.md §2.2 step 2: the SIU's Gateway SA Identifier names this MN's SA pair
        when it is the current outbound SPI, 0 ("the SA that currently serves this home
        address"), or an earlier outbound SPI of this MN that a re-key replaced."""
        return spi == self.outbound.spi or spi == 0 or spi in self.lineage

    def may_send_from(self, inner: bytes, proto: int, ihl: int) -> bool:
        """Anti-spoofing: an MN speaks only for itself on the home side.

        The source of the packet it tunnels (its CoA, or its home address) must not be another
        address inside its allowed destinations; for IP-in-IP (the reverse tunnel, RFC 3024) the
        innermost source must be its own home address.  Without this an MN could put another
        MN's home address and CoA into its tunnel and the HA's RFC 3024 check would pass.
        """
        src = inner[12:16]
        home = self.home_bytes
        if src != home and self.allows(src):
            return False
        if proto == IPPROTO_IPIP:
            if len(inner) < ihl + 20 or inner[ihl + 12:ihl + 16] != home:
                return False
        return True

    def allows(self, dst: bytes) -> bool:
        value = int.from_bytes(dst, "big")
        for net, mask in self.allowed:
            if value & mask == net:
                return True
        return False


class VpnGateway(GatewaySiu, GatewayIke):
    """The GW role: see the module docstring; API in docs/design.md "Roles"."""

    def __init__(self, config: GatewayConfig, *, now: float = 0.0,
                 random: Callable[[int], bytes] | None = None,
                 wallclock: Callable[[], float] | None = None):
        self.config = config
        self.name = config.name
        self.outside = config.outside_address
        self.inside = config.inside_address
        self._outside_b = a2b(self.outside)
        self._inside_b = a2b(self.inside)
        self._own_addresses = frozenset((self.outside, self.inside))
        self.verifier = SiuVerifier({h.address: (h.key_id, h.key) for h in config.home_agents})
        self._home_agents = frozenset(h.address for h in config.home_agents)
        # ACKs (docs/protocol.md §2.2 step 5) are signed with the HA-GW key, sender = our inside
        # address; their timestamp is informational (0 without an injected wall clock)
        self.wallclock = wallclock or (lambda: 0.0)
        self._ack_signers = {h.address: SiuSigner(self.inside, h.key, h.key_id)
                             for h in config.home_agents}
        self.sad = Sad()
        self._sas_by_spi = self.sad.by_spi      # the data path's view of the SAD (read only)
        self.mobiles: dict[str, Mobile] = {}
        self._by_spi: dict[int, Mobile] = {}
        self._by_home: dict[bytes, Mobile] = {}    # the downlink's key: the MN's home address
        # SIU freshness across restarts (docs/protocol.md §2.3): a random, non-zero 64-bit
        # number per run that every ACK announces and every SIU must echo
        self.epoch = int.from_bytes((random or os.urandom)(8), "big") or 1
        # ... and an SIU from an HA that does not know it yet (epoch 0) must be built after our
        # start (its Timestamp)
        self._epoch_floor = ntp_from_unix(self.wallclock()) if wallclock is not None else 0
        self.drops: Counter[DropReason] = Counter()
        self.timeline: list[TimelineEvent] = tl.Timeline(tl.limit_for(len(config.mobiles) + 1))
        self.record_data_path = False      # timeline is for the control plane only
        self._random = random
        # IKEv2 responder (docs/ikev2.md "Integration"): MNs known by identity, PSK per MN
        self.ike: RoleIke | None = None
        # IKEv2's child SA pairs (the bookkeeping shared with the MN); an inbound SPI the SAD
        # already holds (another MN's, a manually keyed one) is refused
        self.book = ChildSaBook(inbound_any_source=True, follow_moves=False,
                                spi_taken=self.sad.by_spi.__contains__)
        self._by_ike_id: dict[str, GatewayMobile] = {m.ike_id: m for m in config.mobiles
                                                     if m.ike_id}
        if config.ike is not None and self._by_ike_id:
            self.ike = RoleIke(config.ike.ike_config(
                psks={m.ike_id: m.psk for m in self._by_ike_id.values()},
                mobike=config.handover_mode == "mobike", local_ts=("0.0.0.0/0",),
                remote_ts=("0.0.0.0/0",)), random=random)
        for m in config.mobiles:
            if m.esp_in is None or m.esp_out is None:
                continue                     # its SAs come from IKEv2
            inbound = make_sa(m.esp_in, Direction.INBOUND, local=self.outside, remote=None,
                              now=now, random=random)
            outbound = make_sa(m.esp_out, Direction.OUTBOUND, local=self.outside,
                               remote=UNBOUND_ADDRESS, now=now, random=random)
            self.install_mobile(m.home_address, inbound, outbound, home_agent=m.home_agent,
                                allowed_destinations=m.allowed_destinations, now=now,
                                road_warrior=m.road_warrior)
            if self.ike is not None:
                self._ikev2.endpoint.reserve_esp_spi(inbound.spi)   # IKE never allocates it

    # --- configuration / IKE hook ---------------------------------------------------------------
    def install_mobile(self, home_address: str, inbound_sa: SecurityAssociation,
                       outbound_sa: SecurityAssociation, *, home_agent: str,
                       allowed_destinations: Iterable[str], now: float = 0.0,
                       road_warrior: bool = False) -> list[Action]:
        """Install (or replace) an MN's SA pair.  The outbound SA starts unbound: the next SIU
        binds it (the MN re-registers after new SAs)."""
        if inbound_sa.direction is not Direction.INBOUND or outbound_sa.direction is not Direction.OUTBOUND:
            raise UsageError("install_mobile: inbound/outbound SA directions swapped")
        if inbound_sa.remote is not None:
            raise UsageError("install_mobile: the inbound SA must have a wildcard source (remote=None)")
        if road_warrior:
            if home_agent:
                raise UsageError(f"install_mobile: road warrior {home_address} has no home agent")
        elif home_agent not in self._home_agents:
            raise UsageError(f"install_mobile: {home_agent} is not a configured home agent")
        old = self.mobiles.get(home_address)
        if old is not None:
            self.remove_mobile(home_address)
        mobile = Mobile(home_address, home_agent, inbound_sa, outbound_sa, allowed_destinations,
                        road_warrior)
        mobile.installed_at = now
        if old is not None:
            mobile.lineage = (old.lineage + [old.outbound.spi])[-LINEAGE_SPIS:]
            mobile.rrq_sources = old.rrq_sources      # the RRQ that follows new SAs may be seen
        self.sad.add(inbound_sa)
        self.mobiles[home_address] = mobile
        self._by_spi[inbound_sa.spi] = mobile
        self._by_home[mobile.home_bytes] = mobile
        if old is not None:
            tl.record(self.timeline, now, self.name, "mobile-installed", home_address=home_address,
                      inbound_spi=inbound_sa.spi, outbound_spi=outbound_sa.spi)
        return []

    def remove_mobile(self, home_address: str) -> None:
        mobile = self.mobiles.pop(home_address)
        if self._by_home.get(mobile.home_bytes) is mobile:
            del self._by_home[mobile.home_bytes]
        self.sad.remove(mobile.inbound.spi)
        self._by_spi.pop(mobile.inbound.spi, None)
        mobile.care_of = None

    def _drop(self, reason: DropReason) -> list[Action]:
        self.drops[reason] += 1
        return []

    # --- from the outside: ESP; from the inside: SIUs --------------------------------------------
    def receive_from_net(self, packet: bytes, now: float) -> list[Action]:
        """A packet for one of our addresses from the outside (ESP, IKE).  SIUs come only
        through ``receive_siu``: one addressed to us here is SIU_WRONG_INTERFACE."""
        try:
            proto, src, dst, ihl = peek_ipv4(packet)
        except ParseError as exc:
            return self._drop(exc.reason)
        if dst == self._inside_b:
            if proto != IPPROTO_UDP:
                return self._drop(DropReason.WRONG_PROTOCOL)
            ports = udp_ports(packet, ihl)
            if ports is None:
                return self._drop(DropReason.TRUNCATED)
            if ports[1] != SIU_PORT:
                return self._drop(DropReason.MIP_NOT_FOR_US)
            return self._drop(DropReason.SIU_WRONG_INTERFACE)
        if dst != self._outside_b:
            return self._drop(DropReason.MIP_NOT_FOR_US)
        if self.ike is not None and RoleIke.is_ike(packet, proto, ihl):
            try:
                outputs = self._ikev2.receive(packet, now)
            except ParseError as exc:
                return self._drop(exc.reason)
            return self._ike_outputs(outputs, now)
        if proto != IPPROTO_ESP and proto != IPPROTO_UDP:
            return self._drop(DropReason.WRONG_PROTOCOL)
        sa = self.sad.lookup(packet)
        if isinstance(sa, DropReason):
            return self._drop(sa)
        try:
            inner = sa.decapsulate(packet, now)
            iproto, _isrc, idst, iihl = peek_ipv4(inner)
        except Dropped as exc:
            return self._drop(exc.reason)
        except ParseError as exc:
            return self._drop(exc.reason)
        mobile = self._by_spi[sa.spi]
        if not mobile.allows(idst):
            return self._drop(DropReason.FORBIDDEN_DESTINATION)
        if not mobile.may_send_from(inner, iproto, iihl):
            return self._drop(DropReason.FORBIDDEN_SOURCE)
        mobile.packets_up += 1
        if iproto == IPPROTO_UDP:
            forwarded = self._note_rrq(mobile, sa, packet, proto, ihl, inner, iihl, now)
            if forwarded is not None:
                return forwarded
        return [WriteToTun(inner)]

    def _note_rrq(self, mobile: Mobile, sa: SecurityAssociation, packet: bytes, proto: int,
                  ihl: int, inner: bytes, iihl: int, now: float) -> list[Action] | None:
        """An authenticated UDP packet of ``mobile`` going home: if it is a Registration
        Request, ``_forward_rrq`` (from the outer source and, ESP in UDP, port); None: not
        a request."""
        ports = udp_ports(inner, iihl)
        if (ports is not None and ports[1] == MIP_PORT and len(inner) >= iihl + 8 + 24
                and inner[iihl + 8] == MSG_REGISTRATION_REQUEST):
            port = int.from_bytes(packet[ihl:ihl + 2], "big") if proto == IPPROTO_UDP else None
            return self._forward_rrq(mobile, sa.spi, packet[12:16], port, inner, iihl, ports,
                                     now)
        return None

    def _forward_rrq(self, mobile: Mobile, spi: int, src: bytes, port: int | None,
                     inner: bytes, iihl: int, ports: tuple[int, int],
                     now: float) -> list[Action] | None:
        """Remember the care-of address the request registers (RFC 5944 §3.3, offset 12) and
        where it came from: the only place an SIU naming that CoA may point the MN's SA at
        (bounded per MN, like its timeline events); and return it as sent from our inside
        address (the HA learns the GW from the path: module doc).  None: its UDP length is
        wrong (the packet then goes on as it is)."""
        mobile.note_rrq_source(inner[iihl + 20:iihl + 24], src, port, now)
        tl.record(self.timeline, now, self.name, "rrq-forwarded",
                  home_address=mobile.home_address, source=b2a(src),
                  **({"port": port} if port is not None else {}), spi=spi)
        ulen = int.from_bytes(inner[iihl + 4:iihl + 6], "big")
        if 8 <= ulen <= len(inner) - iihl:
            return [SendToNet(build_udp_packet(self._inside_b, inner[16:20], ports[0],
                                               ports[1], inner[iihl + 8:iihl + ulen]))]
        return None

    def net_fast_path(self, packet: bytes, now: float) -> bytes | list[Action] | None:
        """``receive_from_net`` for the event loop's data path: the inner packet for the TUN
        (bytes), None when the packet was dropped (counted as there), or that method's actions.

        Only the common case is handled here, without a second parse of what the SA checks: an
        option-less (IHL 5), unfragmented outer header whose total length is the packet's, to
        our outside address, raw ESP or ESP in UDP (not IKE) with an SPI in the SAD.  Every other
        packet goes through ``receive_from_net``, so the bytes, drops and counters are the same
        for any input.  Of the inner header, ``decapsulate`` has already checked version, IHL
        and total length; only the fragment bits are left to check (IP_FRAGMENT, as
        ``peek_ipv4`` would)."""
        n = len(packet)
        if n < 32 or packet[0] != 0x45 or packet[16:20] != self._outside_b:
            return self.receive_from_net(packet, now)
        total, frag = _unpack_total_frag(packet, 2)
        proto = packet[9]
        if total != n or frag & 0x3FFF:
            return self.receive_from_net(packet, now)
        if proto == IPPROTO_ESP:
            spi = _unpack_spi(packet, 20)[0]
        elif proto == IPPROTO_UDP:
            if self.ike is not None and RoleIke.is_ike(packet, proto, 20):
                return self.receive_from_net(packet, now)
            spi = _unpack_spi(packet, 28)[0]
        else:
            return self.receive_from_net(packet, now)
        sa = self._sas_by_spi.get(spi)
        if sa is None or spi == 0:
            return self.receive_from_net(packet, now)
        try:
            inner = sa.decapsulate(packet, now)
        except Dropped as exc:
            self.drops[exc.reason] += 1
            return None
        except ParseError as exc:
            self.drops[exc.reason] += 1
            return None
        if inner[6] & 0x3F or inner[7]:
            self.drops[DropReason.IP_FRAGMENT] += 1
            return None
        mobile = self._by_spi[spi]
        iihl = (inner[0] & 0x0F) << 2
        if not mobile.allows(inner[16:20]):
            self.drops[DropReason.FORBIDDEN_DESTINATION] += 1
            return None
        iproto = inner[9]
        if not mobile.may_send_from(inner, iproto, iihl):
            self.drops[DropReason.FORBIDDEN_SOURCE] += 1
            return None
        mobile.packets_up += 1
        if iproto == IPPROTO_UDP:
            forwarded = self._note_rrq(mobile, sa, packet, proto, 20, inner, iihl, now)
            if forwarded is not None:
                return forwarded
        return inner

    def receive_siu(self, packet: bytes, now: float) -> list[Action]:
        """A datagram that arrived on the inside interface for our inside address (the adapter
        calls this only for its inside SIU socket, the simulator only for the inside link)."""
        try:
            proto, _src, dst, ihl = peek_ipv4(packet)
        except ParseError as exc:
            return self._drop(exc.reason)
        if dst != self._inside_b or proto != IPPROTO_UDP:
            return self._drop(DropReason.SIU_WRONG_INTERFACE)
        ports = udp_ports(packet, ihl)
        if ports is None:
            return self._drop(DropReason.TRUNCATED)
        if ports[1] != SIU_PORT:
            return self._drop(DropReason.MIP_NOT_FOR_US)
        return self._siu(packet, now)

    def receive_from_tun(self, packet: bytes, now: float) -> list[Action]:
        """A packet from the home side routed towards a CoA: the HA's IP-in-IP, protected with
        the SA of the MN whose home address is its inner destination; or, for a road warrior
        (no Mobile IPv4), any packet whose destination is its address."""
        try:
            proto, _src, dst, ihl = peek_ipv4(packet)
        except ParseError as exc:
            return self._drop(exc.reason)
        if proto == IPPROTO_IPIP:
            mobile = self._by_home.get(packet[ihl + 16:ihl + 20])
        else:
            mobile = self._by_home.get(dst)
            if mobile is not None and not mobile.road_warrior:
                mobile = None                 # an MN's downlink comes from its HA only
        if mobile is None:
            return self._drop(DropReason.NO_POLICY)
        if not mobile.carries_downlink:
            # never bound, or deregistered / expired: the SA has no outer binding
            return self._drop(DropReason.NO_SA)
        try:
            outer = mobile.outbound.encapsulate(packet, now)
        except Dropped as exc:
            return self._drop(exc.reason)
        except SaExhausted:
            return self._drop(DropReason.SA_EXHAUSTED)
        mobile.packets_down += 1
        return [SendToNet(outer)]

    def tun_fast_path(self, packet: bytes, now: float) -> bytes | list[Action] | None:
        """``receive_from_tun`` for the event loop's data path: the ESP packet to send (bytes),
        None when the packet was dropped (counted), or that method's actions.  Only the HA's
        IP-in-IP with an option-less, unfragmented, whole outer header for a bound MN is handled
        here (``encapsulate`` checks the rest); every other packet goes through
        ``receive_from_tun``, so the result is the same for any input."""
        n = len(packet)
        if n < 40 or packet[0] != 0x45 or packet[9] != IPPROTO_IPIP:
            return self.receive_from_tun(packet, now)
        total, frag = _unpack_total_frag(packet, 2)
        mobile = self._by_home.get(packet[36:40])
        if (total != n or frag & 0x3FFF or mobile is None
                or mobile.state is not BindingState.BOUND):
            return self.receive_from_tun(packet, now)
        try:
            outer = mobile.outbound.encapsulate(packet, now)
        except Dropped as exc:
            self.drops[exc.reason] += 1
            return None
        except SaExhausted:
            self.drops[DropReason.SA_EXHAUSTED] += 1
            return None
        mobile.packets_down += 1
        return outer

    # --- timers (IKE's; bindings live as long as the HA says) and status -----------------------
    def handle_event(self, event: object, now: float) -> list[Action]:
        raise UsageError(f"GW {self.name}: unknown event {event!r}")

    def get_timer(self) -> float | None:
        t = self._ikev2.get_timer() if self.ike is not None else None
        grace = self.book.get_timer()
        return grace if t is None else t if grace is None else min(t, grace)

    def handle_timer(self, now: float) -> list[Action]:
        actions = self._pairs_changed(self.book.expire(now), now)
        if self.ike is None:
            return actions
        t = self._ikev2.get_timer()
        if t is None or now < t:
            return actions
        return actions + self._ike_outputs(self._ikev2.handle_timer(now), now)

    def status(self) -> dict[str, Any]:
        """Bounded at any size: the first ``STATUS_MOBILES`` MNs in detail, counts for all."""
        shown = itertools.islice(self.mobiles.values(), STATUS_MOBILES)
        states = Counter(m.state.value for m in self.mobiles.values())
        return {
            "role": "gw", "name": self.name, "outside": self.outside, "inside": self.inside,
            "mobiles": {
                m.home_address: {
                    "binding": m.state.value, "care_of": m.care_of, "home_agent": m.home_agent,
                    **({"road_warrior": True} if m.road_warrior else {}),
                    "allowed": list(m.allowed_text), "packets_up": m.packets_up,
                    "packets_down": m.packets_down,
                    "sas": {"inbound": m.inbound.describe(), "outbound": m.outbound.describe()},
                } for m in shown},
            "mobiles_total": len(self.mobiles), "bindings": dict(states),
            "siu_last_sequence": self.verifier.last_sequence,
            "handover_mode": self.config.handover_mode,
            **({"ike": self._ikev2.status()} if self.ike is not None else {}),
            "drops": {str(k): v for k, v in self.drops.items()},
            "sad_drops": {str(k): v for k, v in self.sad.drops.items()},
            "timeline": tl.as_dicts(self.timeline[-32:]),
            "sizes": self.sizes(),
            # re-keyed inbound SAs after their Delete, still decrypting for the grace period
            "inbound_retiring": [f"0x{spi:08x}" for spi in self.book.retired],
        }

    def esp_sas(self) -> list[SecurityAssociation]:
        """Every ESP SA we hold: each MN's pair, IKEv2's other pairs and re-keyed inbound SAs
        (``Role``)."""
        sas: list[SecurityAssociation] = []
        for m in self.mobiles.values():
            sas += [m.inbound, m.outbound]
        held = {id(sa) for sa in sas}
        return sas + [sa for sa in self.book.sas() if id(sa) not in held]

    def other_inbound(self, mobile: Mobile) -> dict[int, SecurityAssociation]:
        """The MN's inbound SAs besides its current one, oldest first: IKEv2's other pairs and
        the re-keyed ones in their grace period (the ``book``'s), all in the SAD."""
        lane = self.book.lane(mobile.ike_id)
        if lane is None:
            return {}
        sas = {spi: p.inbound for spi, p in lane.pairs.items() if p.inbound is not mobile.inbound}
        sas.update((spi, sa) for spi, (_at, sa) in lane.retired.items())
        return {spi: sa for spi, sa in sas.items() if self._by_spi.get(spi) is mobile}

    def sizes(self) -> dict[str, int]:
        """Entries per table (a soak test watches that none grows)."""
        return {"mobiles": len(self.mobiles), "sad": len(self.sad), "by_spi": len(self._by_spi),
                "by_home": len(self._by_home), "grace": len(self.book.retired),
                "timeline": len(self.timeline),
                "rrq_sources": sum(len(m.rrq_sources) for m in self.mobiles.values()),
                "pairs": len(self.book.pairs),
                **({f"ike_{k}": v for k, v in self._ikev2.endpoint.sizes().items()}
                   if self.ike is not None else {})}
