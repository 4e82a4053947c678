"""The home agent (HA) role, sans-I/O.

Theory of operation
-------------------
The HA owns the bindings home address -> care-of address (CoA) of its mobile nodes (MNs).

Registration (the patent's Figure 4, RFC 5944 §3.8).  A Registration Request (UDP to port 434 on
our address) is checked in this order; any failure means NO reply, NO state change, and a counted
reason:

1. it parses (RFC 5944 §1.9 extension rules): the parser's reason;
2. it carries an MN-HA authentication extension (MIP_NO_AUTH) whose SPI names a mobility
   security association we have (MIP_UNKNOWN_SPI) and whose authenticator verifies
   (MIP_AUTH_FAILED);
3. it is addressed to us as home agent (MIP_UNKNOWN_HOME_AGENT);
4. the home address is one of ours (MIP_UNKNOWN_HOME_ADDRESS) and belongs to the MN of that MSA
   (MIP_HOME_ADDRESS_NOT_OWNED: an MN may not register another MN's address);
5. its care-of address can be a tunnel endpoint (``ipip.unusable_care_of``: not 0/8, 127/8,
   224/4, 240/4, broadcast, our address or a GW's; nor another address on the home prefix:
   MIP_BAD_CARE_OF), unless it deregisters (lifetime 0 or CoA = home address).
   RFC 5944 §3.4 has no code that fits (134 "poorly formed Request" at best) and a reply to
   such a CoA cannot be delivered (through the GW it would travel in an SIU that the GW must
   refuse): so NO reply, like the failures above; the MN retransmits and gives up as for a
   lost reply.  Without this check an RRQ with CoA 0.0.0.0 started an endless SIU/ACK loop.

Refusals of requests that do not authenticate (parse errors, MIP_NO_AUTH, MIP_UNKNOWN_SPI,
MIP_AUTH_FAILED) are only counted: anyone can send them, so they must not fill the timeline or
the log.  Refusals of authenticated requests are also recorded ("rrq-rejected").

Identification (RFC 5944 §5.7) is checked only after authentication.  A request that fails it
(replayed: MIP_REPLAYED; clock skew: MIP_IDENTIFICATION_MISMATCH) changes no binding, but —
unlike the failures above, and as RFC 5944 §3.8.3.1 requires for an authenticated request — is
answered with code 133 carrying our time, so an MN with a wrong clock can resynchronise.  At
home that reply goes directly; through the GW it travels in a REJECT SIU (docs/protocol.md): the
GW sends the reply once to the request's CoA and moves nothing.  This is our reading of the
issue's "invalid RRQ, no reply": it applies to requests that do not authenticate or do not
belong to their sender; a replayed request costs the GW one encrypted 133 reply to an address
the MN once used, which the MN discards (it matches no pending request).

A valid request updates the binding (lifetime = min(requested, ``max_lifetime_s``)); lifetime 0
or CoA = home address deregisters (RFC 5944 §3.8.2).  Then:

* "came through the GW": decided from configuration, not from the packet's path: the request's
  IP source is NOT on the home prefix.  The only way into the home network from outside is the
  GW's ESP tunnel (the GW drops everything else), so a source outside the home prefix arrived
  through it.  We send the Registration Reply inside a signed SIU to that MN's GW, naming the
  GW's outbound SA (its SPI), the old CoA the GW should have (compare-and-swap) and the new one.
* a source on the home prefix is the MN at home: the reply goes directly to it, and for a
  deregistration an SIU DEREGISTER (without the reply) tells the GW to retire the binding.
* a source that is a configured GW's inside address: the GW forwarded it (a GW forwards
  requests from its inside address, ``mipsec.node.gateway``).  That is how the HA learns which GW
  of a pool holds the MN's SAs: an accepted request through another GW than the MN's current one
  makes that GW the MN's GW (SIUs, ACKs, the downlink route of ``BindingChanged.gateway``); the
  SA it names is then unknown (SPI 0) until that GW's ACK tells it.  A refused request is
  answered through the GW it came by and moves nothing.

The "old CoA" of an SIU is where the GW's SA points as far as we know: what the GW's last ACK
reported (docs/protocol.md §2.1 step 5), else the CoA the binding had before its latest change
(``Binding.gw_old``, also for a refresh from the same CoA).  So a retransmitted request after a
lost SIU repeats the same move (the GW applies it then), and after a lost reply the GW sees a
repeat (new = current) and only forwards the reply.  The GW ACKs every SIU it authenticated,
also one it refused as stale, reporting its SA's destination; when the ACK of our latest SIU
reports something other than our binding (a lost SIU before a second move, a lost ACK), we send
a correcting SIU from what the GW has to what we have, with the reply the refused SIU carried.
If the ACK of that correction still disagrees, the GW refused it too (e.g. a CoA it cannot use):
we send no further correction (one per SIU we originated), so no SIU/ACK loop is possible; the
MN's next registration starts afresh.
Binding expiry (a timer) removes the binding and sends an SIU DEREGISTER.

An SIU whose ACK has not arrived after ``siu_retransmit_s`` (home-link scale, 50 ms) is sent
again, the wait doubling, at most ``siu_retransmit_tries`` times: a lost SIU or ACK costs one
such timeout instead of the MN's registration retransmission (1 s).  A resend is a fresh SIU
(new sequence number, same move, same reply), which the GW applies idempotently.

SIU sequence numbers come from blocks reserved in the binding store (``siu-seq/<GW>``, a
high-water mark moved by compare-and-swap): before the first SIU of a block the role returns a
``ReserveSiuSequence`` ahead of it, and the runtime makes it durable first (like a binding).  At
``restore`` the numbering continues above the stored mark (and above the wall-clock start,
``ntp_from_unix``), so neither a restarted HA nor a standby that took over from another one
sends a number the GW has seen; when the compare-and-swap finds another HA's reservation
(``SiuSequenceNotReserved``), the role jumps above it and the SIU goes out with its next resend.

Persistence (``mipsec.store``): every accepted registration, deregistration and expiry returns
a ``PersistBinding`` ahead of the actions it allows (the reply, the SIU carrying it); the
runtime makes it durable first and drops what follows if it cannot.  ``restore`` starts an HA
from the store after a restart.

Data: packets for a bound home address (intercepted, ``receive_from_tun``) are tunnelled IP-in-IP
(RFC 2003) to the CoA; reverse-tunnelled packets (``receive_from_net``, IP-in-IP to us) are
accepted only from the bound CoA of their inner source (RFC 3024 §4.2; for
``REVERSE_TUNNEL_GRACE_S`` after a move also from the previous CoA, so packets already in
flight on the old path are not lost) and forwarded into the home network (``WriteToTun``).

Binding state machine per home address (``BINDING_TRANSITIONS``, which drives ``_event``):
NONE --accept(lifetime>0)--> BOUND (bind) --accept--> BOUND (bind: a move or a refresh);
BOUND --deregister / expire--> NONE (unbind); NONE --deregister--> NONE (nothing to change, the
reply still goes); NONE --restore--> BOUND (from the binding store at start); any refusal
--> unchanged (refusals never reach the machine).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.mip import ipip
from mipsec.mip.constants import SIU_PORT
from mipsec.mip.security import MobilitySecurityAssociation, ntp_from_unix
from mipsec.mip.siu import SiuSigner, SiuVerifier
from mipsec.mobility.ha_binding import (  # noqa: F401  (re-exported: the role's vocabulary)
    BINDING_TRANSITIONS,
    REVERSE_TUNNEL_GRACE_S,
    Binding,
    BindingEffect,
    BindingEvent,
    BindingState,
    HaBindings,
)
from mipsec.mobility.siu_exchange import SiuExchange
from mipsec.node import timeline as tl
from mipsec.node.actions import (
    Action,
    BindingChanged,
    Log,
    SendToNet,
    TimelineEvent,
    WriteToTun,
)
from mipsec.node.config import MIP_PORT, HomeAgentConfig, HomeAgentMobile
from mipsec.node.home_agent_siu import HomeAgentSiu
from mipsec.node.home_agent_store import HomeAgentStore
from mipsec.node.packet import (
    IPPROTO_IPIP,
    IPPROTO_UDP,
    a2b,
    b2a,
    build_udp_packet,
    in_prefix,
    parse_prefix,
    parse_udp_packet,
    peek_ipv4,
)
from mipsec.store.record import BindingRecord
from mipsec.wire.mip import (
    MSG_REGISTRATION_REQUEST,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    build_registration_reply,
    parse_registration_request,
)
from mipsec.wire.siu import SiuType


class HomeAgent(HomeAgentStore, HomeAgentSiu):
    """The HA role: see the module docstring; API in docs/design.md "Roles".  The SIU exchange
    with the GWs (``_siu``, ``_siu_ack``) is in ``mipsec.node.home_agent_siu``, the binding
    store (``_persist``, ``_reserve``, ``restore``, ``handle_event``) in
    ``mipsec.node.home_agent_store``."""

    def __init__(self, config: HomeAgentConfig, *, wallclock: Callable[[], float]):
        self.config = config
        self.name = config.name
        self.address = config.address
        self._address_b = a2b(config.address)
        self._home_net = parse_prefix(config.home_prefix)
        self.wallclock = wallclock
        self._mobiles: dict[str, HomeAgentMobile] = {}
        self._msa_by_spi: dict[int, tuple[MobilitySecurityAssociation, str]] = {}
        for m in config.mobiles:
            self._mobiles[m.home_address] = m
            self._msa_by_spi[m.msa.spi] = (
                MobilitySecurityAssociation(m.msa.spi, m.msa.key, m.msa.algorithm), m.home_address)
        first = max(1, ntp_from_unix(wallclock()))
        self._signers = {g.address: SiuSigner(config.address, g.key, g.key_id, first_sequence=first)
                         for g in config.gateways}
        # per GW: the end of the SIU numbers reserved in the store (exclusive; nothing reserved
        # yet: the first SIU reserves a block) and the mark the store holds as far as we know
        self._seq_end: dict[str, int] = {g.address: first for g in config.gateways}
        self._seq_stored: dict[str, bytes | None] = {g.address: None for g in config.gateways}
        # the binding machine and its state (bindings, expiry heap, retired CoAs)
        self.machine = HaBindings(f"HA {config.name}")
        self.bindings = self.machine.bindings
        # SIU ACKs from the GWs (docs/protocol.md §2.1 step 5): where each GW's SA points
        # (an ACK echoes one of our sequence numbers: one below our first is from an earlier run)
        self._ack_verifier = SiuVerifier({g.address: (g.key_id, g.key) for g in config.gateways},
                                         floor=first)
        # the SIU exchange: what each GW has (its ACKs), its epoch, our last SIUs and resends
        self.siu = SiuExchange()
        # home -> the care-of address our binding store holds as far as we know (absent:
        # unknown, e.g. after a failed write: the next write is unconditional)
        self._stored: dict[str, str | None] = {}
        # addresses that can never be a CoA besides the unusable ranges: ours and the GWs'
        self._gateway_addresses = frozenset(g.address for g in config.gateways)
        self._own_addresses = frozenset(
            [config.address] + [g.address for g in config.gateways]
            + [g.outside_address for g in config.gateways if g.outside_address])
        self.drops: Counter[DropReason] = Counter()
        self.timeline: list[TimelineEvent] = tl.Timeline(tl.limit_for(len(config.mobiles) + 1))
        self.counters: Counter[str] = Counter()

    def _drop(self, reason: DropReason) -> list[Action]:
        self.drops[reason] += 1
        return []

    def _record(self, now: float, kind: str, **detail: Any) -> None:
        tl.record(self.timeline, now, self.name, kind, **detail)

    def binding_state(self, home_address: str) -> BindingState:
        return self.machine.state(home_address)

    def _event(self, home: str, event: BindingEvent, now: float, **ctx: Any) -> list[Action]:
        """The binding machine: look (state, event) up in BINDING_TRANSITIONS, carry out the
        effect it names, and return what the effect asks of the runtime (BindingChanged)."""
        new, effect = self.machine.fire(home, event)
        actions = self._effects[effect](self, home, now, **ctx)
        if self.binding_state(home) is not new:
            raise AssertionError(f"HA: {effect.value} left {home} {self.binding_state(home)}")
        return actions

    def _effect_bind(self, home: str, now: float, **request: Any) -> list[Action]:
        gateway = self._pool_gateway(home)
        changed = self.machine.bind(home, now, self.wallclock(), gateway=gateway, **request)
        return [BindingChanged(home, request["care_of"], gateway)] if changed else []

    def _effect_restore(self, home: str, now: float, *, record: BindingRecord) -> list[Action]:
        gateway = self._pool_gateway(home)
        self.machine.restore(home, now, self.wallclock(), record, gateway=gateway)
        return [BindingChanged(home, record.care_of_address, gateway)]

    def _pool_gateway(self, home: str) -> str | None:
        """With several GWs, the inside address of the one serving ``home`` (the runtime routes
        its care-of address there); with one GW, None: routing needs nothing per MN."""
        return self._mobiles[home].gateway if len(self._gateway_addresses) > 1 else None

    def _effect_unbind(self, home: str, now: float) -> list[Action]:
        self.machine.unbind(home, now)
        return [BindingChanged(home, None)]

    def _effect_nothing(self, home: str, now: float) -> list[Action]:
        return []

    # each effect: (role, home address, now, **what the event carried) -> actions
    _effects: dict[BindingEffect, Callable[..., list[Action]]] = {
        BindingEffect.BIND: _effect_bind, BindingEffect.RESTORE: _effect_restore,
        BindingEffect.UNBIND: _effect_unbind, BindingEffect.NOTHING: _effect_nothing}

    # --- from the network: registrations and reverse-tunnelled packets ---------------------------
    def receive_from_net(self, packet: bytes, now: float) -> list[Action]:
        try:
            proto, src, dst, ihl = peek_ipv4(packet, verify_checksum=True)
            if dst != self._address_b:
                return self._drop(DropReason.MIP_NOT_FOR_US)
            if proto == IPPROTO_UDP:
                src, _dst, sport, dport, payload = parse_udp_packet(packet)
                if dport == SIU_PORT:
                    return self._siu_ack(src, payload, now)
                if dport != MIP_PORT:
                    return self._drop(DropReason.MIP_NOT_FOR_US)
                return self._registration(src, sport, payload, now)
            if proto == IPPROTO_IPIP:
                return self._reverse_tunnel(packet, now)
            return self._drop(DropReason.WRONG_PROTOCOL)
        except ParseError as exc:
            return self._drop(exc.reason)

    def _reverse_tunnel(self, packet: bytes, now: float) -> list[Action]:
        outer_src, _outer_dst, inner = ipip.decapsulate(packet)
        inner_src = ipip.inner_source(inner)
        binding = self.bindings.get(inner_src)
        reason = ipip.check_reverse_tunnel(outer_src, inner_src, binding)
        if ((reason is DropReason.REVERSE_TUNNEL_SOURCE_MISMATCH and binding is not None)
                or (reason is DropReason.IPIP_UNKNOWN_TUNNEL and binding is None)):
            if self.machine.in_grace(inner_src, outer_src, now):     # the previous CoA, just now
                reason = None
        if reason is None and binding is not None and not binding.via_gateway:
            # only the GW forwards packets with a care-of source onto the home link, and only
            # after ESP authenticated them (docs/security.md §3.1)
            reason = DropReason.REVERSE_TUNNEL_NOT_VIA_GATEWAY
        if reason is not None:
            return self._drop(reason)
        self.counters["reverse-tunnelled"] += 1
        return [WriteToTun(inner)]

    def _registration(self, src: bytes, sport: int, data: bytes, now: float) -> list[Action]:
        if data[:1] != bytes((MSG_REGISTRATION_REQUEST,)):
            return self._drop(DropReason.MALFORMED)
        rrq = parse_registration_request(data)
        auth = rrq.mn_ha_auth
        # not authenticated (yet): anyone can send these, so they are only counted (no
        # timeline event, no log: a flood must not push a real handover out of the timeline)
        if auth is None:
            return self._drop(DropReason.MIP_NO_AUTH)
        entry = self._msa_by_spi.get(auth.spi)
        if entry is None:
            return self._drop(DropReason.MIP_UNKNOWN_SPI)
        msa, owner = entry
        try:
            msa.verify(data)
        except ParseError as exc:
            return self._drop(exc.reason)
        if rrq.home_agent != self.address:
            return self._reject(now, rrq, DropReason.MIP_UNKNOWN_HOME_AGENT)
        mobile = self._mobiles.get(rrq.home_address)
        if mobile is None:
            return self._reject(now, rrq, DropReason.MIP_UNKNOWN_HOME_ADDRESS)
        if owner != rrq.home_address:
            return self._reject(now, rrq, DropReason.MIP_HOME_ADDRESS_NOT_OWNED, owner=owner)
        if (rrq.lifetime != 0 and rrq.care_of_address != rrq.home_address
                and (ipip.unusable_care_of(rrq.care_of_address, self._own_addresses)
                     or in_prefix(a2b(rrq.care_of_address), *self._home_net))):
            # no tunnel endpoint (0/8, loopback, multicast, broadcast, 240/4, ours, a GW's, or
            # another address of the home network, which an MN away never has): refused before
            # identification, nothing moves, and no reply (see module doc)
            return self._reject(now, rrq, DropReason.MIP_BAD_CARE_OF)
        via = b2a(src)
        through = via if via in self._gateway_addresses else None
        via_gateway = through is not None or not in_prefix(src, *self._home_net)
        if through is not None and through != mobile.gateway:
            # answered through the GW it came by; made the MN's GW only if accepted (_accept)
            mobile = dataclasses.replace(mobile, gateway=through, gateway_spi=0)
        try:
            msa.check_identification(rrq.identification, self.wallclock())
        except ParseError as exc:
            # RFC 5944 §3.8.3.1: authenticated but stale: code 133 with our time, no state change
            return self._deny(now, rrq, msa, mobile, src, sport, via_gateway,
                              ReplyCode.HA_IDENTIFICATION_MISMATCH, exc.reason)
        deregister = rrq.lifetime == 0 or rrq.care_of_address == rrq.home_address
        if rrq.flags & (RequestFlags.M | RequestFlags.G):
            # RFC 5944 §3.8.3: we tunnel IP-in-IP only (RFC 2003): 139, nothing moves
            return self._deny(now, rrq, msa, mobile, src, sport, via_gateway,
                              ReplyCode.HA_REQUESTED_ENCAPSULATION_UNAVAILABLE,
                              DropReason.MIP_ENCAPSULATION_UNAVAILABLE)
        if not deregister and not rrq.flags & RequestFlags.D:
            # RFC 5944 §3.6.1.1/§3.8: there is no foreign agent in this design, so the care-of
            # address must be co-located (D set: the MN decapsulates): 134, nothing moves
            return self._deny(now, rrq, msa, mobile, src, sport, via_gateway,
                              ReplyCode.HA_POORLY_FORMED_REQUEST,
                              DropReason.MIP_NOT_CO_LOCATED)
        msa.accept_identification(rrq.identification)
        if mobile is not self._mobiles[rrq.home_address]:
            self._gateway_changed(mobile, now)
        return self._accept(rrq, msa, mobile, src, sport, via_gateway, now)

    def _gateway_changed(self, mobile: HomeAgentMobile, now: float) -> None:
        """An accepted request came through another GW of the pool: it holds the MN's SAs now."""
        home = mobile.home_address
        old = self._mobiles[home].gateway
        self._mobiles[home] = mobile
        # what the old GW's ACKs said is no longer about the SA that serves the MN
        self.siu.gateway_changed(home)
        self.counters["gateway-changed"] += 1
        self._record(now, "gateway-learnt", home_address=home, old=old, new=mobile.gateway)

    def _deny(self, now: float, rrq: RegistrationRequest, msa: MobilitySecurityAssociation,
              mobile: HomeAgentMobile, src: bytes, sport: int, via_gateway: bool,
              code: ReplyCode, reason: DropReason) -> list[Action]:
        """An authenticated request refused with a reply (RFC 5944 §3.8.3.1): no binding
        changes.  At home the reply goes directly; through the GW it travels in a REJECT SIU
        (docs/protocol.md): the GW sends it once to the request's CoA and moves nothing."""
        logs = self._reject(now, rrq, reason, code=int(code))
        reply = RegistrationReply(
            code=code, home_address=rrq.home_address, home_agent=self.address, lifetime=0,
            identification=msa.reply_identification(
                rrq.identification, self.wallclock(),
                accepted=code != ReplyCode.HA_IDENTIFICATION_MISMATCH))
        data_out = msa.sign(build_registration_reply(reply))
        if via_gateway:
            binding = self.bindings.get(rrq.home_address)
            return logs + self._siu(now, SiuType.REJECT, mobile,
                                    binding.care_of_address if binding is not None else None,
                                    rrq.care_of_address, 0, data_out)
        return logs + [SendToNet(build_udp_packet(self._address_b, src, MIP_PORT, sport, data_out))]

    def _reject(self, now: float, rrq: RegistrationRequest, reason: DropReason,
                **detail: Any) -> list[Action]:
        self._record(now, "rrq-rejected", home_address=rrq.home_address, reason=str(reason),
                     care_of=rrq.care_of_address, **detail)
        self.drops[reason] += 1
        return [Log("debug", f"registration of {rrq.home_address} refused: {reason}")]

    def _accept(self, rrq: RegistrationRequest, msa: MobilitySecurityAssociation,
                mobile: HomeAgentMobile, src: bytes, sport: int, via_gateway: bool,
                now: float) -> list[Action]:
        home = rrq.home_address
        deregister = rrq.lifetime == 0 or rrq.care_of_address == home
        lifetime = 0 if deregister else min(rrq.lifetime, self.config.max_lifetime_s)
        # RFC 5944 §3.8.3: one binding per MN (a new one replaces the old); a request for
        # simultaneous bindings (S) is accepted with code 1 saying so
        code = (ReplyCode.ACCEPTED_NO_SIMULTANEOUS_BINDINGS
                if rrq.flags & RequestFlags.S and not deregister else ReplyCode.ACCEPTED)
        reply = RegistrationReply(
            code=code, home_address=home, home_agent=self.address,
            lifetime=lifetime,
            identification=msa.reply_identification(rrq.identification, self.wallclock(),
                                                    accepted=True))
        rrp = msa.sign(build_registration_reply(reply))
        binding = self.bindings.get(home)
        if deregister:
            old = binding.care_of_address if binding is not None else None
            actions = self._event(home, BindingEvent.DEREGISTER, now)
            self._record(now, "rrq-accepted", home_address=home, care_of=None, lifetime=0,
                         deregistration=True, via_gateway=via_gateway)
            self._record(now, "binding-deregistered", home_address=home, old=old)
            actions.insert(0, self._persist(home, None))
            gw_has = self.siu.gw_has(home, old)
            if via_gateway:
                actions += self._siu(now, SiuType.DEREGISTER, mobile, gw_has, None, 0, rrp)
            else:
                actions.append(SendToNet(build_udp_packet(self._address_b, src, MIP_PORT, sport, rrp)))
                if gw_has is not None:
                    actions += self._siu(now, SiuType.DEREGISTER, mobile, gw_has, None, 0, b"")
            return actions
        coa = rrq.care_of_address
        actions = self._event(home, BindingEvent.ACCEPT, now, care_of=coa, lifetime=lifetime,
                              identification=rrq.identification, via_gateway=via_gateway)
        binding = self.bindings[home]
        # durable before anything below (the reply, the SIU carrying it) is carried out
        actions.insert(0, self._persist(home, binding))
        self._record(now, "rrq-accepted", home_address=home, care_of=coa, lifetime=lifetime,
                     via_gateway=via_gateway)
        if via_gateway:
            actions += self._siu(now, SiuType.UPDATE, mobile,
                                 self.siu.gw_has(home, binding.gw_old), coa, lifetime, rrp)
        else:
            actions.append(SendToNet(build_udp_packet(self._address_b, src, MIP_PORT, sport, rrp)))
        return actions

    # --- intercepted packets for home addresses ---------------------------------------------
    def receive_from_tun(self, packet: bytes, now: float) -> list[Action]:
        outer = self.tun_fast_path(packet, now)
        return [SendToNet(outer)] if outer is not None else []

    def tun_fast_path(self, packet: bytes, now: float) -> bytes | None:
        """``receive_from_tun`` without an action object (the event loop's data path): the
        IP-in-IP packet to send, or None when the packet is dropped (counted)."""
        try:
            peek_ipv4(packet)
        except ParseError as exc:
            self._drop(exc.reason)
            return None
        binding = self.bindings.get(b2a(packet[16:20]))
        if binding is None or binding.care_of_address is None:
            self._drop(DropReason.IPIP_NO_BINDING)
            return None
        try:
            outer = ipip.encapsulate_packed(packet, self._address_b,
                                            ipip.packed(binding.care_of_address))
        except ValueError:
            self._drop(DropReason.MALFORMED)
            return None
        self.counters["tunnelled"] += 1
        return outer

    # --- hooks ---------------------------------------------------------------------------------
    def set_gateway_spi(self, home_address: str, gateway_spi: int) -> None:
        """The GW's outbound SA for this MN changed (new SAs from IKEv2): name it in SIUs."""
        mobile = self._mobiles.get(home_address)
        if mobile is None:
            raise UsageError(f"HA {self.name}: {home_address} is not one of our mobile nodes")
        self._mobiles[home_address] = dataclasses.replace(mobile, gateway_spi=gateway_spi)

    # --- timers: binding expiry ------------------------------------------------------------------
    def get_timer(self) -> float | None:
        deadlines = [d for d in (self.siu.next_deadline(), self.machine.next_expiry())
                     if d is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for home, last, resends in self.siu.due(now):
            if resends >= self.config.siu_retransmit_tries:
                self.siu.give_up(home)
                self._record(now, "siu-unacknowledged", home_address=home,
                             sequence=last.sequence)
                continue
            self.counters["siu-retransmitted"] += 1
            self._record(now, "siu-retransmitted", home_address=home, attempt=resends + 1)
            actions += self._siu(now, last.type, self._mobiles[home], last.old, last.new,
                                 last.lifetime, last.rrp, last.correction, resends=resends + 1)
        for binding in self.machine.expired(now):
            home = binding.home_address
            changed = self._event(home, BindingEvent.EXPIRE, now)
            self._record(now, "binding-expired", home_address=home, care_of=binding.care_of_address)
            # an expired record is dead on disk too (its absolute expiry is stored): a failed
            # delete must not keep the routes and the GW's binding
            actions.append(dataclasses.replace(self._persist(home, None), required=False))
            actions += changed
            gw_has = self.siu.gw_has(home, binding.care_of_address)
            if binding.via_gateway and gw_has is not None:
                actions += self._siu(now, SiuType.DEREGISTER, self._mobiles[home],
                                     gw_has, None, 0, b"")
        return actions

    def esp_sas(self) -> list[Any]:
        """The HA holds no ESP SA (``Role``)."""
        return []

    def status(self, now: float | None = None) -> dict[str, Any]:
        return {
            "role": "ha", "name": self.name, "address": self.address,
            "home_prefix": self.config.home_prefix,
            "bindings": {h: b.as_dict(now) for h, b in self.bindings.items()},
            "siu_next_sequence": {g: s.next_sequence for g, s in self._signers.items()},
            "siu_reserved_until": dict(self._seq_end),
            "drops": {str(k): v for k, v in self.drops.items()},
            "timeline": tl.as_dicts(self.timeline[-32:]),
        }
