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
see it and the HA answers through the GW).  Without a reply it retransmits after a timeout
measured from its registration round trips (``mipsec/node/retransmit.py``, RFC 6298 style),
doubling up to ``retransmit_max_s`` (RFC 5944 §3.6.3), each time with a new identification
(RFC 5944 §5.7: a timestamp must increase), for ever: no state is terminal while the
configuration is valid.  Manual keys: after ``max_attempts`` unanswered transmissions it
records ``reestablish-requested`` and returns a ``ReestablishRequested`` action once, and goes
on asking.  IKEv2 ("no reply through this tunnel", ``mipsec/mobility/registration.py``): after
``IKE_FALLBACK_ATTEMPTS`` unanswered through SAs the GW may still point at an old CoA it makes
new ones itself from the current CoA (``install_sas``; the GW binds them there at IKE time) and
registers through them, its back-off going on; through SAs that point here, each round of
``max_attempts`` only checks the GW (IKE liveness): silent, re-establish; answering, the HA's
reply is what is missing, logged once per CoA and backed off from (capped), no re-IKE loop.
An authenticated refusal is logged once and backed off from; it proves the tunnel works, so
nothing is re-established.  An accepted registration is renewed at ``renew_fraction`` of the granted
lifetime.  A 133 reply (identification mismatch) that authenticates resynchronises the
identification clock and the request is re-sent at once.  Returning home deregisters directly
with the HA (lifetime 0, care-of address = home address, RFC 5944 §3.6.1.1), outside the tunnel.

Being home is decided by the HA, not by an address: ``ReturnedHome`` (which the daemon derives only
from the configured home interface) starts the deregistration, but application traffic stays in
the tunnel (or is dropped) until the HA's authenticated reply arrives directly on the home link;
only then does the MN return ``UseHomeLink`` and send in the clear.  A home-prefix address on a
visited interface is logged and ignored: it cannot be a care-of address (the home network routes
it to the home link) and it proves nothing about where the MN is.

Several GWs (``gateways``, IKEv2 only): the MN uses one GW at a time, the first of its ordered
list to begin with.  When that GW is gone (its liveness check unanswered: PEER_SILENT, also after
a round of unanswered registrations; or an IKE SA with it that could not be set up: IkeSaFailed)
it abandons its IKE SAs with that GW and negotiates with the next GW in the list (after the last:
the first again), then registers through it (a re-establishment for another reason, e.g. the
SIU path down after a move, stays with the same GW); the HA learns the new GW from the path of that request.
It goes back to its first GW by one deliberate rule only: a new start from scratch, i.e. when it
leaves home again (its IKE SAs ended at home) or the daemon restarts.  Never on a timer: an MN
that moved to the next GW stays there while that GW answers, so a flapping GW does not drag its
MNs back and forth.  With one GW all of this is the single-GW behaviour above.

Make-before-break: when the event says the old address still works, the inbound SA accepts any
outer destination while the registration is pending and the MN itself admits only the old and
the new CoA; once the RRP is accepted the inbound SA is pinned to the new CoA.  So packets the GW
still sends to the old CoA are not lost.  Break-before-make pins the inbound SA to the new CoA at
once (nothing can arrive at the old one anyway).

Remote input never raises: every refusal is a ``DropReason`` counted in ``drops`` and changes no
state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from mipsec.constants import UNSPECIFIED_ADDRESS
from mipsec.drops import DropReason
from mipsec.errors import ConfigError, UsageError
from mipsec.ike.book import ChildSaBook
from mipsec.ipsec.sa import Direction, SecurityAssociation, UdpEncap
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.mobility.registration import (
    AWAY,
    RegEvent,
    Registration,
    RegState,
    reply_code_name,
)
from mipsec.node import timeline as tl
from mipsec.node.actions import (
    Action,
    CareOfAddressChanged,
    Log,
    RebindSa,
    ReturnedHome,
    TimelineEvent,
)
from mipsec.node.config import EspSaConfig, MobileNodeConfig
from mipsec.node.ike import RoleIke
from mipsec.node.mobile_node_data import LIVENESS_IDLE_S, MobileNodeData
from mipsec.node.mobile_node_registration import (  # noqa: F401  (ACTIVE_RETRY_MAX_S re-exported)
    ACTIVE_RETRY_MAX_S,
    PROBE_TIMEOUT_S,
    MobileNodeRegistration,
)
from mipsec.node.packet import (
    NAT_T_PORT,
    a2b,
    in_prefix,
    parse_prefix,
)
from mipsec.node.retransmit import RetransmitTimer

UNSPECIFIED = UNSPECIFIED_ADDRESS   # the outbound SA's outer source before the first CoA
LIVENESS_MAX_S = 30.0        # the check's interval doubles up to this while the GW answers
S = RegState


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


class MobileNode(MobileNodeRegistration, MobileNodeData):
    """The MN role: see the module docstring; API in docs/design.md "Roles".  The registration
    machine's effects are in ``mipsec.node.mobile_node_registration``, the IKEv2 integration in
    ``mipsec.node.mobile_node_ike``, the ESP data path in ``mipsec.node.mobile_node_data``."""

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
        self._ike_id: bytes | None = None        # the IKE SA we use with the GW (its ike_id)
        self.gateways = config.gateway_list      # in order of preference (docs/scaling.md)
        self._gw_index = 0                       # the one in use: self.gateways[self._gw_index]
        self._ike_retry_at: float | None = None
        # IKEv2's child SA pairs (the bookkeeping shared with the GW); the data path reads
        # every inbound SA, a re-keyed one in its grace period too, by SPI
        self.book = ChildSaBook(follow_moves=False)
        self._inbound_sas = self.book.inbound
        self.inbound: SecurityAssociation | None
        self.outbound: SecurityAssociation | None
        if config.ike is None:
            if config.esp_in is None or config.esp_out is None:
                raise ConfigError(f"MN {config.name}: manual keys need esp_in and esp_out")
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
        self.reg = Registration(f"MN {config.name}")   # the registration machine, its state
        self.care_of: str | None = None
        self._care_of_b: bytes | None = None
        self.interface: str | None = None
        self._awaiting_first_downlink = False
        self.rtt = RetransmitTimer(initial_s=config.retransmit_initial_s,
                                   floor_s=min(config.retransmit_min_s, config.retransmit_initial_s),
                                   cap_s=config.retransmit_max_s)
        self._ike_backoff_s = 0.0           # before the next IKE SA after one failed
        self._why = ""                      # why the tunnel is being re-established
        self._gw_silent = False             # ... because the GW did not answer (PEER_SILENT)
        # liveness: traffic sent and nothing received for a while -> check the GW
        self._liveness_at: float | None = None
        self._last_out = -1e9                # last application packet into the tunnel
        self._liveness_interval = LIVENESS_IDLE_S
        self._probe_started: float | None = None
        self._probe_deadline: float | None = None
        self._probe_for_registration = False  # the running check follows unanswered requests
        self.drops: Counter[DropReason] = Counter()
        self.timeline: list[TimelineEvent] = tl.Timeline(tl.limit_for(1))
        self.counters: Counter[str] = Counter()

    @property
    def state(self) -> RegState:
        return self.reg.state

    @state.setter
    def state(self, state: RegState) -> None:
        self.reg.state = state

    def _record(self, now: float, kind: str, **detail: Any) -> None:
        tl.record(self.timeline, now, self.name, kind, home_address=self.home_address, **detail)

    def _drop(self, reason: DropReason) -> list[Action]:
        self.drops[reason] += 1
        return []

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
            return self._event(RegEvent.LOST_ADDRESS, now)
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
        if coa != self.care_of:
            self.reg.gw_points_at = None     # until IKE binds a pair here or the HA accepts coa
        self.care_of, self._care_of_b, self.interface = coa, coa_b, event.interface
        self._record(now, "coa-changed", old=old, new=coa, make_before_break=event.make_before_break)
        keep_old = event.make_before_break and old is not None and old != coa
        self.reg.old_care_of_b = a2b(old) if keep_old and old is not None else None
        self._awaiting_first_downlink = True
        if self.outbound is None or self.inbound is None:
            # IKEv2 and no SA pair yet: negotiate from this CoA; register once the child is up
            return self._event(RegEvent.MOVED_WITHOUT_SAS, now)
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
        resumed = self.state is S.DETACHED
        actions += self._event(RegEvent.MOVED, now)
        ike = self._ike_alive()
        if resumed and ike is not None and ike.established:
            # back after a time without an address: the GW may have given our IKE SA up
            # meanwhile; check it beside the registration, re-establish at once if silent
            self._probe_started = now
            self._probe_deadline = now + max(PROBE_TIMEOUT_S, 2 * self.rtt.rto)
            actions += self._ike_outputs(self._ikev2.endpoint.check_liveness(ike.ike_id, now),
                                         now)
        return actions

    def _returned_home(self, event: ReturnedHome, now: float) -> list[Action]:
        if self.state is S.AT_HOME:
            return []
        self._record(now, "returned-home", old=self.care_of, interface=event.interface)
        # the care-of address and the SAs stay: traffic keeps using the tunnel until the HA
        # confirms (Do.LEAVE_TUNNEL)
        self.reg.home_link = event.interface
        self._awaiting_first_downlink = False
        return self._event(RegEvent.RETURNED_HOME, now)

    def get_timer(self) -> float | None:
        times = [t for t in (self.reg.deadline, self.reg.renew_at, self._ike_retry_at,
                             self._liveness_at, self._probe_deadline) if t is not None]
        grace = self.book.get_timer()
        if grace is not None:
            times.append(grace)
        if self.ike is not None and self.state in AWAY:
            # IKE speaks only from a care-of address we have: not on the home link, not
            # without an address (its timers wait until we are away again)
            t = self._ikev2.get_timer()
            if t is not None:
                times.append(t)
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        self.book.expire(now)                       # retired inbound SAs: their SPIs unknown
        if self.ike is not None and self.state in AWAY:
            t = self._ikev2.get_timer()
            if t is not None and now >= t:
                actions += self._ike_outputs(self._ikev2.handle_timer(now), now)
            if self._ike_retry_at is not None and now >= self._ike_retry_at:
                self._ike_retry_at = None
                if self.state is S.AWAITING_SAS:
                    actions += self._event(RegEvent.IKE_RETRY_DUE, now)
        if self.reg.deadline is not None and now >= self.reg.deadline:
            actions += self._timed_out(now)
        renew_at = self.reg.renew_at
        if renew_at is not None and now >= renew_at and self.state is S.REGISTERED:
            self.reg.renew_at = None
            actions += self._event(RegEvent.RENEW_DUE, now)
        if self._liveness_at is not None and now >= self._liveness_at:
            self._liveness_at = None
            if self.state is S.REGISTERED:
                actions += self._liveness_check(now)
        if self._probe_deadline is not None and now >= self._probe_deadline:
            self._probe_deadline = None
            actions += self._probe_expired(now)
        return actions

    def _liveness_check(self, now: float) -> list[Action]:
        """We have been sending for a while and received nothing: a GW that restarted would
        drop our ESP silently.  IKEv2: an empty INFORMATIONAL (RFC 7296 §2.4), re-establish if
        no answer comes within ``PROBE_TIMEOUT_S``; manual keys: register again (the reply
        comes through the GW, and the HA's SIU re-binds a GW that lost the binding)."""
        interval = self._liveness_interval
        self._liveness_interval = min(LIVENESS_MAX_S, 2 * interval)
        sa = self._ike_alive()
        self._record(now, "liveness-check", silent_s=interval,
                     via="ike" if sa is not None else "registration")
        if sa is None:
            if self.ike is not None:
                return []              # IKEv2 with no IKE SA: AWAITING_SAS takes care of it
            return self._event(RegEvent.LIVENESS_DUE, now)
        self._probe_started = now
        self._probe_deadline = now + max(PROBE_TIMEOUT_S, 2 * self.rtt.rto)
        return self._ike_outputs(self._ikev2.endpoint.check_liveness(sa.ike_id, now), now)

    def _probe_expired(self, now: float) -> list[Action]:
        sa = self._ike_alive()
        started, self._probe_started = self._probe_started, None
        for_registration, self._probe_for_registration = self._probe_for_registration, False
        if sa is not None and started is not None and sa.last_heard >= started:
            if for_registration and self.state is S.REGISTERING:
                return self._registration_unanswered(now)
            return []                  # it answered: alive (the interval grew)
        if self.state not in (S.REGISTERED, S.REGISTERING) or self.care_of is None:
            return []
        self._why = (f"the GW did not answer a liveness check within "
                     f"{now - (started or now):.1f} s while our traffic got no reply "
                     f"(a GW restart loses our SAs)")
        self._gw_silent = True             # a GW pool: the next GW of the list (_do_reestablish)
        return self._event(RegEvent.PEER_SILENT, now)

    # --- hooks ---------------------------------------------------------------------------------
    def install_sas(self, inbound: SecurityAssociation, outbound: SecurityAssociation,
                    now: float = 0.0) -> list[Action]:
        """Replace the ESP SA pair (from IKEv2) and, when away, register again through it."""
        if inbound.direction is not Direction.INBOUND or outbound.direction is not Direction.OUTBOUND:
            raise UsageError("install_sas(inbound, outbound): directions swapped")
        self.inbound, self.outbound = inbound, outbound
        actions: list[Action] = []
        if self.care_of is not None:
            self.reg.old_care_of_b = None
            inbound.rebind(local=self.care_of)
            outbound.rebind(local=self.care_of)
            actions += [RebindSa(outbound.spi, self.care_of, outbound.remote),
                        RebindSa(inbound.spi, self.care_of, inbound.remote)]
        # the GW binds a pair IKE installs to where its IKE_AUTH came from (``_ike_event`` names
        # that address); a pair installed otherwise points wherever the GW was told
        self.reg.gw_points_at = None
        self._record(now, "sas-installed", inbound_spi=inbound.spi, outbound_spi=outbound.spi)
        if self.state in AWAY and self.care_of is not None:
            actions += self._event(RegEvent.SAS_INSTALLED, now)
        return actions

    def esp_sas(self) -> list[SecurityAssociation]:
        """Every ESP SA we hold: the current pair and every IKE child pair (``Role``)."""
        sas = [sa for sa in (self.inbound, self.outbound) if sa is not None]
        return sas + [sa for sa in self.book.sas() if all(sa is not s for s in sas)]

    def waiting_for(self) -> str:
        """What the MN is waiting for, in words (``mipsec status``)."""
        st = self.state
        if st is S.IDLE:
            return "a care-of address on a visited interface, or the home link"
        if st is S.DETACHED:
            return (f"a care-of address that can reach the GW (the last one, {self.care_of}, "
                    f"went; the registration stands)")
        if st is S.AWAITING_SAS:
            if self._ike_retry_at is not None:
                return (f"the next IKE SA attempt with the GW {self.gateway} "
                        f"(backing off, at t={self._ike_retry_at:.3f})")
            return f"an IKE SA and child SA with the GW {self.gateway}"
        if st in (S.REGISTERING, S.DEREGISTERING):
            what = "deregistration" if st is S.DEREGISTERING else "registration"
            refused = (f"; last refused with code {self.reg.refused} "
                       f"({reply_code_name(self.reg.refused)})"
                       if self.reg.refused is not None else "")
            if self.reg.refused is None and self.reg.unanswered_logged == self.care_of:
                refused = ("; the GW answers, the home agent's reply does not come (down, "
                           "refusing, or its SIU path to the GW is down)")
            return (f"the home agent's reply to {what} request {self.reg.attempts} "
                    f"(next try at t={self.reg.deadline:.3f}){refused}"
                    if self.reg.deadline is not None else f"the home agent's {what} reply{refused}")
        if st is S.REGISTERED:
            return (f"the renewal at t={self.reg.renew_at:.3f}" if self.reg.renew_at is not None
                    else "nothing")
        return "nothing (at home)"

    def status(self) -> dict[str, Any]:
        return {
            "role": "mn", "name": self.name, "state": self.state.value,
            "waiting_for": self.waiting_for(),
            "home_address": self.home_address, "home_agent": self._ha,
            "gateway": self.gateway, "gateways": list(self.gateways), "care_of": self.care_of,
            "registration": {**self.reg.status(), "retransmit": self.rtt.status()},
            "sas": {"inbound": self.inbound.describe() if self.inbound is not None else None,
                    "outbound": self.outbound.describe() if self.outbound is not None else None},
            "handover_mode": self.config.handover_mode,
            **({"ike": self._ikev2.status()} if self.ike is not None else {}),
            "drops": {str(k): v for k, v in self.drops.items()},
            "timeline": tl.as_dicts(self.timeline[-32:]),
            "inbound_retiring": [f"0x{spi:08x}" for spi in self.book.retired],
            "sizes": {"inbound_sas": len(self._inbound_sas), "pairs": len(self.book.pairs),
                      "grace": len(self.book.retired), "timeline": len(self.timeline),
                      **({f"ike_{k}": v for k, v in self._ikev2.endpoint.sizes().items()}
                         if self.ike is not None else {})},
        }
