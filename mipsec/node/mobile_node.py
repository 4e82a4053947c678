"""The mobile node (MN) role, sans-I/O.

Theory of operation
-------------------
The MN has a permanent home address on its home network and, while away, a co-located care-of
address (CoA, RFC 5944 §1.5 "D bit") on a visited network.  Its traffic to and from the home
network runs through one ESP SA pair with the VPN gateway (GW):

* uplink (``receive_from_tun``): an application packet (home address -> CN) is reverse-tunnelled
  (RFC 3024): IP-in-IP from the CoA to the home agent (HA), then ESP from the CoA to the GW's
  outside address.  At home it leaves directly on the home link.
* downlink (``receive_from_net``): ESP for the CoA -> IP-in-IP from the HA -> the application
  packet, written to the TUN device.  A Registration Reply arrives inside the ESP as a plain UDP
  datagram HA:434 -> CoA:434 (the GW forwards the RRP it got in the HA's SIU); at home it arrives
  directly.

Registration (RFC 5944 §3.6) is the state machine below.  On a new CoA the MN re-points both
SAs in place (outbound source, inbound destination: keys, sequence numbers and replay windows
stay), then sends a Registration Request inside the ESP tunnel (not inside IP-in-IP: the GW must
see it and the HA answers through the GW).  Without a reply it retransmits after
``retransmit_initial_s``, doubling up to ``retransmit_max_s`` (RFC 5944 §3.6.3), each time with a
new identification (RFC 5944 §5.7: a timestamp must increase).  After ``max_attempts``
transmissions without an accepting reply it records ``reestablish-requested`` and returns a
``ReestablishRequested`` action: the SAs may be dead, someone (IKEv2) has to make new ones and
call ``install_sas``.  An accepted registration is renewed at ``renew_fraction`` of the granted
lifetime.  A 133 reply (identification mismatch) that authenticates resynchronises the
identification clock and the request is re-sent at once.  Returning home deregisters directly
with the HA (lifetime 0, care-of address = home address, RFC 5944 §3.6.1.1), outside the tunnel.

Being home is decided by the HA, not by an address: ``ReturnedHome`` (which the daemon derives only
from the configured home interface) starts the deregistration, but application traffic stays in
the tunnel (or is dropped) until the HA's authenticated reply arrives directly on the home link;
only then does the MN return ``UseHomeLink`` and send in the clear.  A home-prefix address on a
visited interface is logged and ignored: it cannot be a care-of address (the home network routes
it to the home link) and it proves nothing about where the MN is.

Make-before-break: when the event says the old address still works, the inbound SA accepts any
outer destination while the registration is pending and the MN itself admits only the old and
the new CoA; once the RRP is accepted the inbound SA is pinned to the new CoA.  So packets the GW
still sends to the old CoA are not lost.  Break-before-make pins the inbound SA to the new CoA at
once (nothing can arrive at the old one anyway).

Remote input never raises: every refusal is a ``DropReason`` counted in ``drops`` and changes no
state.
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import Any, Callable

from mipsec.drops import DropReason
from mipsec.errors import ConfigError, Dropped, ParseError, SaExhausted, UsageError
from mipsec.ipsec.sa import Direction, SecurityAssociation, UdpEncap
from mipsec.mip import ipip
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.node import timeline as tl
from mipsec.node.actions import (
    Action, CareOfAddressChanged, Log, RebindSa, ReestablishRequested, ReturnedHome, SendToNet,
    TimelineEvent, UseHomeLink, WriteToTun,
)
from mipsec.ike.constants import CHILD_SA_DELETE_GRACE_S
from mipsec.ike.config import (
    ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed, IkeSaDeleted, IkeSaEstablished,
    IkeSaFailed, IkeSaRekeyed, PeerAddressChanged, SendDatagram,
)
from mipsec.ike.sa import State as IkeState
from mipsec.node.config import MIP_PORT, EspSaConfig, MobileNodeConfig
from mipsec.node.ike import IKE_PORT, RoleIke
from mipsec.node.packet import (
    IPPROTO_ESP, IPPROTO_IPIP, IPPROTO_UDP, NAT_T_PORT, a2b, build_udp_packet, in_prefix,
    parse_prefix, parse_udp_packet, peek_ipv4, udp_ports,
)
from mipsec.wire.mip import (
    RegistrationReply, RegistrationRequest, ReplyCode, RequestFlags, build_registration_request,
)

UNSPECIFIED = "0.0.0.0"     # placeholder outer source of the outbound SA before the first CoA
IKE_RETRY_S = 5.0           # a failed / lost IKE SA is started again after this long


class RegState(enum.Enum):
    IDLE = "idle"                      # no care-of address, not known to be at home
    REGISTERING = "registering"        # an RRQ is outstanding (new CoA or renewal)
    REGISTERED = "registered"          # the HA accepted our current CoA
    DEREGISTERING = "deregistering"    # at home, deregistration outstanding
    AT_HOME = "at-home"                # deregistered, on the home link
    FAILED = "failed"                  # gave up; waiting for new SAs or a new address


class RegEvent(enum.Enum):
    MOVED = "moved"                    # CareOfAddressChanged with an address
    LOST_ADDRESS = "lost-address"      # CareOfAddressChanged(None)
    RETURNED_HOME = "returned-home"
    ACCEPTED = "accepted"              # an authenticated accepting RRP for the pending RRQ
    RETRANSMIT = "retransmit"          # timeout, 133 resync: send again
    GAVE_UP = "gave-up"                # max_attempts without acceptance
    RENEW_DUE = "renew-due"
    SAS_INSTALLED = "sas-installed"    # new SAs (IKEv2): register again


S, E = RegState, RegEvent
TRANSITIONS: dict[tuple[RegState, RegEvent], RegState] = {
    (S.IDLE, E.MOVED): S.REGISTERING,
    (S.IDLE, E.RETURNED_HOME): S.DEREGISTERING,
    (S.IDLE, E.LOST_ADDRESS): S.IDLE,
    (S.REGISTERING, E.MOVED): S.REGISTERING,
    (S.REGISTERING, E.ACCEPTED): S.REGISTERED,
    (S.REGISTERING, E.RETRANSMIT): S.REGISTERING,
    (S.REGISTERING, E.GAVE_UP): S.FAILED,
    (S.REGISTERING, E.RETURNED_HOME): S.DEREGISTERING,
    (S.REGISTERING, E.LOST_ADDRESS): S.IDLE,
    (S.REGISTERING, E.SAS_INSTALLED): S.REGISTERING,
    (S.REGISTERED, E.MOVED): S.REGISTERING,
    (S.REGISTERED, E.RENEW_DUE): S.REGISTERING,
    (S.REGISTERED, E.RETURNED_HOME): S.DEREGISTERING,
    (S.REGISTERED, E.LOST_ADDRESS): S.IDLE,
    (S.REGISTERED, E.SAS_INSTALLED): S.REGISTERING,
    (S.DEREGISTERING, E.ACCEPTED): S.AT_HOME,
    (S.DEREGISTERING, E.RETRANSMIT): S.DEREGISTERING,
    (S.DEREGISTERING, E.MOVED): S.REGISTERING,
    (S.DEREGISTERING, E.LOST_ADDRESS): S.DEREGISTERING,   # a visited address went: still home
    (S.DEREGISTERING, E.RETURNED_HOME): S.DEREGISTERING,
    (S.AT_HOME, E.MOVED): S.REGISTERING,
    (S.AT_HOME, E.RETURNED_HOME): S.AT_HOME,
    (S.AT_HOME, E.LOST_ADDRESS): S.AT_HOME,
    (S.FAILED, E.MOVED): S.REGISTERING,
    (S.FAILED, E.SAS_INSTALLED): S.REGISTERING,
    (S.FAILED, E.RETURNED_HOME): S.DEREGISTERING,
    (S.FAILED, E.LOST_ADDRESS): S.IDLE,
}
AWAY = frozenset({S.REGISTERING, S.REGISTERED, S.FAILED})


def make_sa(cfg: EspSaConfig, direction: Direction, *, local: str | None, remote: str | None,
            now: float = 0.0, random: Callable[[int], bytes] | None = None) -> SecurityAssociation:
    """An SA from its configuration (shared by MN and GW)."""
    kwargs: dict[str, Any] = {}
    if random is not None:
        kwargs["random"] = random
    return SecurityAssociation(
        spi=cfg.spi, direction=direction, encryption=cfg.encryption,
        encryption_key=cfg.encryption_key, integrity=cfg.integrity,
        integrity_key=cfg.integrity_key, local=local, remote=remote,
        udp_encap=UdpEncap(NAT_T_PORT, NAT_T_PORT) if cfg.udp_encap else None, now=now, **kwargs)


class MobileNode:
    """The MN role: see the module docstring; API in docs/design.md "Roles"."""

    def __init__(self, config: MobileNodeConfig, *, wallclock: Callable[[], float],
                 now: float = 0.0, random: Callable[[int], bytes] | None = None):
        self.config = config
        self.name = config.name
        self.wallclock = wallclock
        self.home_address = config.home_address
        self._home_b = a2b(config.home_address)
        self._ha = config.home_agent
        self._ha_b = a2b(config.home_agent)
        self._home_net = parse_prefix(config.home_prefix)
        self.msa = MobilitySecurityAssociation(config.msa.spi, config.msa.key, config.msa.algorithm)
        # IKEv2 (docs/ikev2.md "Integration"): no SAs until the first child SA is up
        self.ike: RoleIke | None = None
        self._ike_sa: Any = None                 # the IKE SA we use with the GW
        self._ike_retry_at: float | None = None
        self._inbound_sas: dict[int, SecurityAssociation] = {}   # IKE: re-keyed ones too
        self._pairs: dict[int, tuple[Any, SecurityAssociation, SecurityAssociation]] = {}
        # inbound SAs of re-keyed children after their Delete: spi -> forget at (in that order)
        self._grace: dict[int, float] = {}
        self.inbound: SecurityAssociation | None
        self.outbound: SecurityAssociation | None
        if config.ike is None:
            self.inbound = make_sa(config.esp_in, Direction.INBOUND, local=None,
                                   remote=config.gateway, now=now, random=random)
            self.outbound = make_sa(config.esp_out, Direction.OUTBOUND, local=UNSPECIFIED,
                                    remote=config.gateway, now=now, random=random)
        else:
            self.inbound = self.outbound = None
            ike = config.ike
            self.ike = RoleIke(ike.ike_config(
                psks={ike.remote_id: ike.psk}, mobike=config.handover_mode == "mobike",
                local_ts=("0.0.0.0/0",), remote_ts=(config.home_prefix,),
                initiator_of=ike.remote_id), random=random)
        self.state = RegState.IDLE
        self.care_of: str | None = None
        self._care_of_b: bytes | None = None
        self.interface: str | None = None
        self._home_link: str | None = None            # where ReturnedHome said the home link is
        self._old_care_of_b: bytes | None = None      # make-before-break: still accepted
        self._awaiting_first_downlink = False
        # the outstanding request
        self._pending_id: int | None = None
        self._pending_dereg = False
        self._attempts = 0
        self._deadline: float | None = None
        # the accepted registration
        self.lifetime_granted: int | None = None
        self.registered_until: float | None = None
        self._renew_at: float | None = None
        self.drops: Counter[DropReason] = Counter()
        self.timeline: list[TimelineEvent] = []
        self.counters: Counter[str] = Counter()

    # --- state machine ---------------------------------------------------------------------
    def _transition(self, event: RegEvent) -> RegState:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise UsageError(f"MN {self.name}: {event.value} is not allowed in state {self.state.value}")
        self.state = new
        return new

    def _record(self, now: float, kind: str, **detail: Any) -> None:
        tl.record(self.timeline, now, self.name, kind, home_address=self.home_address, **detail)

    def _drop(self, reason: DropReason) -> list[Action]:
        self.drops[reason] += 1
        return []

    # --- the data path ---------------------------------------------------------------------
    def receive_from_tun(self, packet: bytes, now: float) -> list[Action]:
        """An application packet from the home address: reverse-tunnel it (or send it at home)."""
        try:
            peek_ipv4(packet)
        except ParseError as exc:
            return self._drop(exc.reason)
        if self.state is S.AT_HOME:
            return [SendToNet(packet, self._home_link)]
        # away, and also on the home link until the HA's authenticated reply confirms it: in
        # the tunnel or not at all (never in the clear on an unconfirmed guess)
        if self.care_of is None or self.outbound is None:
            return self._drop(DropReason.NO_SA)
        try:
            tunnelled = ipip.encapsulate(packet, self.care_of, self._ha)
            return [SendToNet(self.outbound.encapsulate(tunnelled, now), self.interface)]
        except Dropped as exc:
            return self._drop(exc.reason)
        except SaExhausted:
            return self._drop(DropReason.SA_EXHAUSTED)
        except ValueError:                               # too large to tunnel
            return self._drop(DropReason.MALFORMED)

    def receive_from_net(self, packet: bytes, now: float) -> list[Action]:
        """ESP for our CoA, or (at home) the HA's direct Registration Reply."""
        try:
            proto, src, dst, ihl = peek_ipv4(packet)
        except ParseError as exc:
            return self._drop(exc.reason)
        if self.ike is not None and RoleIke.is_ike(packet, proto, ihl):
            return self._ike_packet(packet, now)
        if proto == IPPROTO_UDP:
            ports = udp_ports(packet, ihl)
            if ports is None:
                return self._drop(DropReason.TRUNCATED)
            if ports[1] != NAT_T_PORT:
                return self._direct(packet, src, now)
        elif proto != IPPROTO_ESP:
            return self._drop(DropReason.WRONG_PROTOCOL)
        if self._old_care_of_b is not None and dst != self._care_of_b and dst != self._old_care_of_b:
            # make-before-break: the SA takes any destination, we only the old and the new CoA
            return self._drop(DropReason.OUTER_DESTINATION_MISMATCH)
        sa = self.inbound
        if self._inbound_sas:
            # IKEv2: the old SA of a re-key still receives until its Delete (RFC 7296 §2.8)
            at = ihl + 8 if proto == IPPROTO_UDP else ihl
            sa = self._inbound_sas.get(int.from_bytes(packet[at:at + 4], "big"), sa)
        if sa is None:
            return self._drop(DropReason.NO_SA)
        try:
            inner = sa.decapsulate(packet, now)
            iproto, isrc, idst, iihl = peek_ipv4(inner)
            if iproto == IPPROTO_IPIP:
                outer_src, _outer_dst, innermost = ipip.decapsulate(inner)
                if isrc != self._ha_b:
                    return self._drop(DropReason.IPIP_UNKNOWN_TUNNEL)
                peek_ipv4(innermost)
                if self._awaiting_first_downlink and dst == self._care_of_b:
                    self._awaiting_first_downlink = False
                    self._record(now, "first-downlink-at-new-coa", care_of=self.care_of)
                self.counters["downlink"] += 1
                return [WriteToTun(innermost)]
            if iproto == IPPROTO_UDP:
                _s, _d, sport, dport, payload = parse_udp_packet(inner)
                if isrc == self._ha_b and sport == MIP_PORT and dport == MIP_PORT:
                    return self._handle_reply(payload, now, via="tunnel")
                return self._drop(DropReason.MIP_NOT_FOR_US)
            return self._drop(DropReason.WRONG_PROTOCOL)
        except Dropped as exc:
            return self._drop(exc.reason)
        except ParseError as exc:
            return self._drop(exc.reason)

    def _direct(self, packet: bytes, src: bytes, now: float) -> list[Action]:
        try:
            _s, _d, sport, dport, payload = parse_udp_packet(packet)
        except ParseError as exc:
            return self._drop(exc.reason)
        if src != self._ha_b or sport != MIP_PORT or dport != MIP_PORT:
            return self._drop(DropReason.MIP_NOT_FOR_US)
        return self._handle_reply(payload, now, via="direct")

    # --- registration ------------------------------------------------------------------------
    def _handle_reply(self, data: bytes, now: float, via: str) -> list[Action]:
        if self._pending_id is None:
            return self._drop(DropReason.MIP_UNEXPECTED_REPLY)
        try:
            reply = self.msa.verify(data)
        except ParseError as exc:
            return self._drop(exc.reason)
        if not isinstance(reply, RegistrationReply):
            return self._drop(DropReason.MALFORMED)
        if (not self.msa.reply_matches(self._pending_id, reply)
                or reply.home_address != self.home_address or reply.home_agent != self._ha):
            return self._drop(DropReason.MIP_UNEXPECTED_REPLY)
        if self.state is S.DEREGISTERING and via != "direct":
            # the deregistration is answered on the home link, never through the tunnel
            return self._drop(DropReason.MIP_UNEXPECTED_REPLY)
        code = reply.code
        self._record(now, "rrp-received", code=int(code), lifetime=reply.lifetime, via=via)
        if code in (ReplyCode.ACCEPTED, ReplyCode.ACCEPTED_NO_SIMULTANEOUS_BINDINGS):
            return self._accepted(reply, now)
        if code == ReplyCode.HA_IDENTIFICATION_MISMATCH:
            # RFC 5944 §5.7: adopt the HA's clock from the authenticated reply and try again now
            self.msa.adopt_reply(self._pending_id, reply, self.wallclock())
            self._record(now, "registration-failed", code=int(code), action="resynchronised")
            return self._attempt(now, RegEvent.RETRANSMIT)
        # any other denial: keep the back-off schedule; give up after max_attempts
        self._record(now, "registration-failed", code=int(code))
        return []

    def _accepted(self, reply: RegistrationReply, now: float) -> list[Action]:
        actions: list[Action] = []
        self._pending_id = None
        self._deadline = None
        self._attempts = 0
        if self._pending_dereg:
            # RFC 5944 §3.6.1.1: the HA's authenticated direct reply is the proof we are home;
            # only now does traffic leave the tunnel
            self._transition(RegEvent.ACCEPTED)
            self.lifetime_granted = self.registered_until = self._renew_at = None
            self.care_of = self._care_of_b = self._old_care_of_b = None
            self.interface = self._home_link
            self._record(now, "deregistered", interface=self._home_link)
            return [Log("info", f"at home on {self._home_link}: the home agent confirmed the "
                                f"deregistration of {self.home_address}"),
                    UseHomeLink(self._home_link)]
        self._transition(RegEvent.ACCEPTED)
        self.lifetime_granted = reply.lifetime
        self.registered_until = now + reply.lifetime
        # a zero lifetime (never granted by our HA to a request with one) must not spin renewals
        self._renew_at = (now + reply.lifetime * self.config.renew_fraction) if reply.lifetime else None
        if self._old_care_of_b is not None and self.inbound is not None:
            # make-before-break done: from now on only the new CoA
            self._old_care_of_b = None
            for sa in self._inbound_sas.values():
                if sa is not self.inbound:
                    sa.rebind(local=self.care_of)
            self.inbound.rebind(local=self.care_of)
            actions.append(RebindSa(self.inbound.spi, self.care_of, self.inbound.remote))
        return actions

    def _attempt(self, now: float, event: RegEvent) -> list[Action]:
        """Send (or re-send) the pending RRQ, or give up after ``max_attempts``."""
        cfg = self.config
        if self._attempts >= cfg.max_attempts and self.state is not S.DEREGISTERING:
            self._transition(RegEvent.GAVE_UP)
            attempts, self._attempts = self._attempts, 0
            self._pending_id = None
            self._deadline = None
            self._record(now, "registration-failed", attempts=attempts, reason="no accepting reply")
            if self.state is S.AT_HOME:
                return []
            self._record(now, "reestablish-requested", attempts=attempts)
            actions: list[Action] = [
                Log("warning", f"registration of {self.home_address} via {self.care_of} failed "
                               f"{attempts} times: the tunnel must be re-established"),
                ReestablishRequested(self.home_address, self.care_of, attempts)]
            if self.ike is not None and self.care_of is not None:
                actions += self._ike_reestablish(now)
            return actions
        self._transition(event)
        self._attempts += 1
        timeout = min(cfg.retransmit_initial_s * (2 ** (self._attempts - 1)), cfg.retransmit_max_s)
        self._deadline = now + timeout
        return [self._send_rrq(now)]

    def _send_rrq(self, now: float) -> SendToNet | Log:
        ident = self.msa.new_identification(self.wallclock())
        self._pending_id = ident
        if self._pending_dereg:
            # RFC 5944 §3.6.1.1: at home, lifetime 0 and care-of address = home address
            rrq = RegistrationRequest(home_address=self.home_address, home_agent=self._ha,
                                      care_of_address=self.home_address, identification=ident,
                                      lifetime=0)
        else:
            rrq = RegistrationRequest(home_address=self.home_address, home_agent=self._ha,
                                      care_of_address=self.care_of, identification=ident,
                                      lifetime=self.config.lifetime_s,
                                      flags=RequestFlags.D | RequestFlags.T)
        data = self.msa.sign(build_registration_request(rrq))
        self._record(now, "rrq-sent", attempt=self._attempts, care_of=rrq.care_of_address,
                     lifetime=rrq.lifetime, identification=ident)
        if self._pending_dereg:
            return SendToNet(build_udp_packet(self._home_b, self._ha_b, MIP_PORT, MIP_PORT, data),
                             self._home_link)
        inner = build_udp_packet(self._care_of_b, self._ha_b, MIP_PORT, MIP_PORT, data)
        if self.outbound is None:        # IKEv2: the SAs are gone (deleted); the retry will tell
            self.drops[DropReason.NO_SA] += 1
            return Log("debug", "registration request not sent: no SA with the GW")
        try:
            return SendToNet(self.outbound.encapsulate(inner, now), self.interface)
        except (Dropped, SaExhausted) as exc:
            self.drops[getattr(exc, "reason", DropReason.SA_EXHAUSTED)] += 1
            return Log("debug", f"registration request not sent: {exc}")

    # --- events and timers ---------------------------------------------------------------------
    def handle_event(self, event: object, now: float) -> list[Action]:
        if isinstance(event, CareOfAddressChanged):
            return self._care_of_changed(event, now)
        if isinstance(event, ReturnedHome):
            return self._returned_home(event, now)
        raise UsageError(f"MN {self.name}: unknown event {event!r}")

    def _care_of_changed(self, event: CareOfAddressChanged, now: float) -> list[Action]:
        coa = event.care_of_address
        if coa is None:
            self._record(now, "coa-changed", old=self.care_of, new=None)
            if self.state is S.DEREGISTERING:
                return []        # on the home link already; the tunnel's CoA simply went
            self._transition(RegEvent.LOST_ADDRESS)
            self.care_of = self._care_of_b = self._old_care_of_b = None
            self._pending_id = self._deadline = self._renew_at = None
            self._attempts = 0
            return []
        coa_b = a2b(coa)
        if in_prefix(coa_b, *self._home_net):
            # A home-prefix address is no proof of being home (any DHCP server can hand one
            # out) and cannot be a care-of address (the home network routes it to the home
            # link): ignored.  Only ReturnedHome, from the home interface, starts going home.
            self._record(now, "home-prefix-address-ignored", address=coa,
                         interface=event.interface)
            return [Log("warning", f"address {coa} on {event.interface} is inside the home "
                                   f"prefix {self.config.home_prefix}: not a care-of address, "
                                   f"and not the home link; ignored")]
        if coa == self.care_of and self.state in AWAY:
            return []            # the same address reported again
        old = self.care_of if self.state in AWAY or self.state is S.IDLE else None
        self.care_of, self._care_of_b, self.interface = coa, coa_b, event.interface
        self._record(now, "coa-changed", old=old, new=coa, make_before_break=event.make_before_break)
        keep_old = event.make_before_break and old is not None and old != coa
        self._old_care_of_b = a2b(old) if keep_old else None
        self._awaiting_first_downlink = True
        self._pending_dereg = False
        self._attempts = 0
        self._renew_at = None
        if self.outbound is None:
            # IKEv2 and no SA pair yet: negotiate from this CoA; register once the child is up
            self._pending_id = self._deadline = None
            if self.state is not S.REGISTERING:
                self._transition(RegEvent.MOVED)
            return self._ike_start(now)
        self.outbound.rebind(local=coa)
        self.inbound.rebind(local=None if keep_old else coa)
        actions: list[Action] = [RebindSa(self.outbound.spi, coa, self.outbound.remote),
                                 RebindSa(self.inbound.spi, self.inbound.local, self.inbound.remote)]
        for sa in self._inbound_sas.values():
            if sa is not self.inbound:
                sa.rebind(local=None if keep_old else coa)
        self._record(now, "sa-repointed", care_of=coa, inbound_spi=self.inbound.spi,
                     outbound_spi=self.outbound.spi, inbound_local=self.inbound.local or "*")
        if self.ike is not None:
            actions += self._ike_moved(coa, now)
        actions += self._attempt(now, RegEvent.MOVED)
        return actions

    def _returned_home(self, event: ReturnedHome, now: float) -> list[Action]:
        if self.state is S.AT_HOME:
            return []
        self._record(now, "returned-home", old=self.care_of, interface=event.interface)
        # the care-of address and the SAs stay: traffic keeps using the tunnel until the HA
        # confirms (``_accepted``)
        self._home_link = event.interface
        self._awaiting_first_downlink = False
        self._pending_dereg = True
        self._attempts = 0
        self._renew_at = None
        return self._attempt(now, RegEvent.RETURNED_HOME)

    def get_timer(self) -> float | None:
        times = [t for t in (self._deadline, self._renew_at, self._ike_retry_at) if t is not None]
        if self._grace:
            times.append(next(iter(self._grace.values())))
        if self.ike is not None:
            t = self.ike.get_timer()
            if t is not None:
                times.append(t)
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self._grace:
            spi, at = next(iter(self._grace.items()))
            if now < at:
                break
            del self._grace[spi]
            self._inbound_sas.pop(spi, None)        # its SPI is unknown from now on
        if self.ike is not None:
            t = self.ike.get_timer()
            if t is not None and now >= t:
                actions += self._ike_outputs(self.ike.handle_timer(now), now)
            if self._ike_retry_at is not None and now >= self._ike_retry_at:
                self._ike_retry_at = None
                if self.care_of is not None and self.state in AWAY:
                    actions += self._ike_start(now)
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            if self._attempts < self.config.max_attempts:
                self._record(now, "rrq-retransmitted", attempt=self._attempts + 1)
            actions += self._attempt(now, RegEvent.RETRANSMIT)
        if self._renew_at is not None and now >= self._renew_at and self.state is S.REGISTERED:
            self._renew_at = None
            self._attempts = 0
            actions += self._attempt(now, RegEvent.RENEW_DUE)
        return actions

    # --- hooks ---------------------------------------------------------------------------------
    def install_sas(self, inbound: SecurityAssociation, outbound: SecurityAssociation,
                    now: float = 0.0) -> list[Action]:
        """Replace the ESP SA pair (from IKEv2) and, when away, register again through it."""
        if inbound.direction is not Direction.INBOUND or outbound.direction is not Direction.OUTBOUND:
            raise UsageError("install_sas(inbound, outbound): directions swapped")
        self.inbound, self.outbound = inbound, outbound
        actions: list[Action] = []
        if self.care_of is not None:
            self._old_care_of_b = None
            inbound.rebind(local=self.care_of)
            outbound.rebind(local=self.care_of)
            actions += [RebindSa(outbound.spi, self.care_of, outbound.remote),
                        RebindSa(inbound.spi, self.care_of, inbound.remote)]
        self._record(now, "sas-installed", inbound_spi=inbound.spi, outbound_spi=outbound.spi)
        if self.state in AWAY and self.care_of is not None:
            self._attempts = 0
            self._pending_dereg = False
            actions += self._attempt(now, RegEvent.SAS_INSTALLED)
        return actions

    # --- IKEv2 (docs/ikev2.md "Integration") ---------------------------------------------------
    def _ike_packet(self, packet: bytes, now: float) -> list[Action]:
        outputs, reason = self.ike.receive(packet, now)
        if reason is not None:
            return self._drop(reason)
        return self._ike_outputs(outputs, now)

    def _ike_outputs(self, outputs: list, now: float) -> list[Action]:
        """Datagrams -> SendToNet (from our interface), events -> SA changes, in order."""
        actions: list[Action] = []
        for out in outputs:
            if out.__class__ is SendDatagram:
                actions += RoleIke.run([out], self.interface)[0]
                continue
            try:
                actions += self._ike_event(out, now)
            except (ConfigError, UsageError) as exc:
                # a child the GW negotiated that we cannot install: counted, never raised
                self.drops[DropReason.IKE_CHILD_UNUSABLE] += 1
                actions.append(Log("warning", f"IKE child SA not installed: {exc}"))
                child = out.child if out.__class__ is ChildSaEstablished else (
                    out.new if out.__class__ is ChildSaRekeyed else None)
                if child is not None and child.spi_in in out.ike_sa.children:
                    actions += RoleIke.run(out.ike_sa.delete_child(child.spi_in, now),
                                           self.interface)[0]
        return actions

    def _ike_alive(self) -> Any:
        sa = self._ike_sa
        return sa if sa is not None and sa.state != IkeState.CLOSED else None

    def _ike_start(self, now: float) -> list[Action]:
        """Negotiate from the current CoA: follow with the IKE SA we have (still setting up, or
        up but without children), else start one."""
        sa = self._ike_alive()
        local = (self.care_of, IKE_PORT)
        if sa is not None and (sa.children or sa.state != IkeState.ESTABLISHED):
            sa.follow_addresses(local=(self.care_of, sa.local[1]))
            return []
        self.ike.note(now, f"initiate from {self.care_of}")
        self._record(now, "ike-initiated", care_of=self.care_of, gateway=self.config.gateway)
        out = self.ike.endpoint.initiate(local, (self.config.gateway, IKE_PORT), now)
        self._ike_sa = self._newest_ike_sa()
        return self._ike_outputs(out, now)

    def _ike_reestablish(self, now: float) -> list[Action]:
        """After ``max_attempts`` failed registrations: a new IKE SA and child SAs from the
        current CoA (INITIAL_CONTACT makes the GW drop the old ones), then register again."""
        self.ike.note(now, f"re-establish from {self.care_of}")
        self._record(now, "ike-reestablish", care_of=self.care_of)
        self._ike_sa = None                   # its deletion below must not start another
        out = self.ike.endpoint.reestablish((self.care_of, IKE_PORT),
                                            (self.config.gateway, IKE_PORT), now)
        new = self._newest_ike_sa()
        actions = self._ike_outputs(out, now)
        self._ike_sa = new
        return actions

    def _newest_ike_sa(self) -> Any:
        live = [sa for sa in self.ike.endpoint.ike_sas if sa.state != IkeState.CLOSED]
        return max(live, key=lambda sa: sa.created) if live else None

    def _ike_moved(self, coa: str, now: float) -> list[Action]:
        """The CoA changed: MOBIKE mode tells the GW by UPDATE_SA_ADDRESSES (RFC 4555 §3.5);
        SIU mode just sends from there (the GW learns the CoA from the HA's SIU)."""
        sa = self._ike_alive()
        if sa is None:
            return []
        if (self.config.handover_mode == "mobike" and sa.is_established and sa.peer_mobike
                and sa.config.mobike):
            self._record(now, "mobike-update-sent", care_of=coa)
            return self._ike_outputs(sa.update_addresses((coa, sa.local[1]), now), now)
        sa.follow_addresses(local=(coa, sa.local[1]))
        return []

    def _ike_event(self, ev: Any, now: float) -> list[Action]:
        cls = ev.__class__
        if cls is IkeSaEstablished:
            self.ike.note(now, f"IKE SA {ev.ike_sa.name} up with {ev.peer_id}")
            self._record(now, "ike-established", peer=ev.peer_id, remote=ev.remote[0])
            self._ike_sa = ev.ike_sa
            return []
        if cls is ChildSaEstablished:
            sin, sout = self._child_sas(ev.child, now)
            self.ike.note(now, f"child {ev.child.spi_in:08x}/{ev.child.spi_out:08x} up")
            return self.install_sas(sin, sout, now)
        if cls is ChildSaRekeyed:
            sin, sout = self._child_sas(ev.new, now)
            self.ike.note(now, f"child re-keyed -> {ev.new.spi_in:08x}/{ev.new.spi_out:08x}",
                          rekey=True)
            return self._swap_sas(sin, sout, now, ev.send_on_new)
        if cls is ChildSaDeleted:
            return self._child_deleted(ev.child.spi_in, now)
        if cls is IkeSaRekeyed:
            if ev.new is not None and ev.old is self._ike_sa:
                self._ike_sa = ev.new
            self.ike.note(now, "IKE SA re-keyed", rekey=True)
            self._record(now, "ike-rekeyed", care_of=self.care_of,
                         local=ev.new.local[0] if ev.new is not None else None)
            return []
        if cls is IkeSaDeleted or cls is IkeSaFailed:
            self.ike.note(now, f"IKE SA {ev.ike_sa.name} ended: {ev.reason}")
            self._record(now, "ike-ended", reason=ev.reason)
            if ev.ike_sa is self._ike_sa:
                self._ike_sa = None
                if self.care_of is not None and self.state in AWAY:
                    self._ike_retry_at = now + (IKE_RETRY_S if cls is IkeSaFailed else 0.0)
            return [Log("info", f"IKE SA with the GW ended: {ev.reason}")]
        if cls is PeerAddressChanged:
            return []        # our own MOBIKE update completed: the SAs moved already
        return []

    def _child_sas(self, child: Any, now: float) -> tuple[SecurityAssociation, SecurityAssociation]:
        sin, sout = child.make_sas(now=now)
        self._pairs[child.spi_in] = (child, sin, sout)
        self._inbound_sas[sin.spi] = sin
        return sin, sout

    def _swap_sas(self, inbound: SecurityAssociation, outbound: SecurityAssociation,
                  now: float, send_on_new: bool = True) -> list[Action]:
        """A re-key, at the current CoA; the GW's binding does not change, so there is nothing
        to register.  The new inbound SA receives at once (the old one until its Delete and a
        grace period after it).  We send on the new outbound SA at once if we initiated the
        re-key (the GW installed the pair before it answered); if we answered, only once the
        GW deletes the old pair (``_child_deleted``): it installs the new one on our answer."""
        old_in = self.inbound
        self.inbound = inbound
        if send_on_new or self.outbound is None:
            self.outbound = outbound
        actions: list[Action] = []
        if self.care_of is not None:
            inbound.rebind(local=None if self._old_care_of_b is not None else self.care_of)
            outbound.rebind(local=self.care_of)
            actions += [RebindSa(outbound.spi, self.care_of, outbound.remote),
                        RebindSa(inbound.spi, inbound.local, inbound.remote)]
        self._record(now, "sas-rekeyed", inbound_spi=inbound.spi, outbound_spi=outbound.spi,
                     old_inbound_spi=old_in.spi if old_in is not None else None,
                     care_of=self.care_of, send_on_new=send_on_new)
        return actions

    def _child_deleted(self, spi_in: int, now: float) -> list[Action]:
        entry = self._pairs.pop(spi_in, None)
        if entry is None:
            return []
        _child, sin, sout = entry
        replaced = self.inbound is not sin             # a re-key put a newer pair in its place
        actions: list[Action] = []
        if self.inbound is sin or self.outbound is sout:
            newest = next(reversed(self._pairs.values()), None)
            if newest is None:
                self.inbound = self.outbound = None
            else:
                if self.outbound is not newest[2] and self.care_of is not None:
                    # a re-key we answered: the GW has the new pair now (it deletes the old
                    # one after installing), send on it from where we are
                    newest[2].rebind(local=self.care_of)
                    actions.append(RebindSa(newest[2].spi, self.care_of, newest[2].remote))
                self.inbound, self.outbound = newest[1], newest[2]
        if replaced and self._pairs:
            # ESP the GW sent on it may still be queued behind the Delete: it keeps
            # decrypting for a grace period (handle_timer forgets it)
            self._grace.setdefault(sin.spi, now + CHILD_SA_DELETE_GRACE_S)
        else:
            self._inbound_sas.pop(sin.spi, None)
        if not self._pairs:
            # no child left (its IKE SA ended): the ones in their grace period go too
            for spi in self._grace:
                self._inbound_sas.pop(spi, None)
            self._grace.clear()
        self._record(now, "sas-deleted", inbound_spi=sin.spi, outbound_spi=sout.spi)
        return actions

    def status(self) -> dict[str, Any]:
        return {
            "role": "mn", "name": self.name, "state": self.state.value,
            "home_address": self.home_address, "home_agent": self._ha,
            "gateway": self.config.gateway, "care_of": self.care_of,
            "registration": {"lifetime_granted": self.lifetime_granted,
                             "registered_until": self.registered_until,
                             "attempts": self._attempts, "pending": self._pending_id is not None},
            "sas": {"inbound": self.inbound.describe() if self.inbound is not None else None,
                    "outbound": self.outbound.describe() if self.outbound is not None else None},
            "handover_mode": self.config.handover_mode,
            **({"ike": self.ike.status()} if self.ike is not None else {}),
            "drops": {str(k): v for k, v in self.drops.items()},
            "timeline": tl.as_dicts(self.timeline[-32:]),
            "sizes": {"inbound_sas": len(self._inbound_sas), "pairs": len(self._pairs),
                      "grace": len(self._grace), "timeline": len(self.timeline),
                      **({f"ike_{k}": v for k, v in self.ike.endpoint.sizes().items()}
                         if self.ike is not None else {})},
        }
