"""The mobile node's registration (RFC 5944 §3.6) as the effects of its registration machine
(``mipsec/mobility/registration.py``, ``TRANSITIONS``), sans-I/O.

``MobileNode`` takes these methods from ``MobileNodeRegistration``: a reply is checked and fed to
the machine (``_handle_reply``), whose effects (``_do_*``) send a request or send it again,
hold, confirm, leave the tunnel at home, negotiate or re-establish the SAs, check the GW's
liveness, pause or forget; ``_timed_out`` is the retransmission timer and ``_send_rrq`` builds
one request.  The theory of operation is in ``mipsec.node.mobile_node``'s docstring.
"""


from collections.abc import Callable

from mipsec.drops import DropReason
from mipsec.errors import Dropped, ParseError, SaExhausted, UsageError
from mipsec.ipsec.sa import SecurityAssociation
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.mobility.registration import (
    Do,
    RegEvent,
    RegState,
    reply_code_name,
)
from mipsec.node.actions import (
    Action,
    Log,
    RebindSa,
    ReestablishRequested,
    SendToNet,
    UseHomeLink,
)
from mipsec.node.config import MIP_PORT
from mipsec.node.mobile_node_ike import MobileNodeIke
from mipsec.node.packet import (
    build_udp_packet,
)
from mipsec.node.retransmit import RetransmitTimer
from mipsec.wire.mip import RegistrationReply, ReplyCode, build_registration_request

ACTIVE_RETRY_MAX_S = 2.0     # manual keys, application traffic waiting: retry at least this often
PROBE_TIMEOUT_S = 0.5        # IKEv2: no answer to the liveness check by then: re-establish
S = RegState


class MobileNodeRegistration(MobileNodeIke):
    """The registration half of ``MobileNode`` (see the module docstring); the attributes below
    are the MN's, set by ``MobileNode.__init__``."""

    wallclock: Callable[[], float]
    home_address: str
    msa: MobilitySecurityAssociation
    rtt: RetransmitTimer
    _home_b: bytes
    _ha: str
    _ha_b: bytes
    _care_of_b: bytes | None
    _ike_retry_at: float | None
    _why: str
    _gw_silent: bool
    _last_out: float
    _probe_started: float | None
    _probe_for_registration: bool
    _inbound_sas: dict[int, SecurityAssociation]

    def _handle_reply(self, data: bytes, now: float, via: str) -> list[Action]:
        if self.reg.pending_id is None:
            return self._drop(DropReason.MIP_UNEXPECTED_REPLY)
        try:
            reply = self.msa.verify(data)
        except ParseError as exc:
            return self._drop(exc.reason)
        if not isinstance(reply, RegistrationReply):
            return self._drop(DropReason.MALFORMED)
        # any transmission of the outstanding request: each has its own identification, so the
        # reply names the one it answers (and gives an unambiguous round-trip sample)
        ident = self.reg.answered_by(self.msa, reply)
        if ident is None or reply.home_address != self.home_address or reply.home_agent != self._ha:
            return self._drop(DropReason.MIP_UNEXPECTED_REPLY)
        if self.state is S.DEREGISTERING and via != "direct":
            # the deregistration is answered on the home link, never through the tunnel
            return self._drop(DropReason.MIP_UNEXPECTED_REPLY)
        code = reply.code
        self._record(now, "rrp-received", code=int(code), lifetime=reply.lifetime, via=via)
        self.reg.replied = True
        if code in (ReplyCode.ACCEPTED, ReplyCode.ACCEPTED_NO_SIMULTANEOUS_BINDINGS):
            sent_at = self.reg.sent.get(ident)
            if sent_at is not None:
                self.rtt.sample(now - sent_at)
            self.reg.accepted_reply = reply
            return self._event(RegEvent.ACCEPTED, now)
        if code == ReplyCode.HA_IDENTIFICATION_MISMATCH:
            # RFC 5944 §5.7: adopt the HA's clock from the authenticated reply and try again now
            self.msa.adopt_reply(ident, reply, self.wallclock())
            self._record(now, "registration-failed", code=int(code), action="resynchronised")
            return self._event(RegEvent.RESYNC, now)
        self._record(now, "registration-failed", code=int(code))
        self.reg.refused = int(code)
        return self._event(RegEvent.DENIED, now)

    def _event(self, event: RegEvent, now: float) -> list[Action]:
        """The machine takes the transition the table names; we do what it names."""
        return self._effects[self.reg.fire(event)](self, now)

    def _do_nothing(self, now: float) -> list[Action]:
        return []

    def _do_send_new(self, now: float) -> list[Action]:
        self.reg.new_request()
        return self._do_send_again(now)

    def _do_send_again(self, now: float) -> list[Action]:
        self.reg.attempts += 1
        timeout = self.rtt.timeout(self.reg.attempts)
        if self.ike is None and now - self._last_out <= 2 * ACTIVE_RETRY_MAX_S:
            # manual keys and an application waiting on the tunnel: a restarted GW or a path
            # that came back is found within ACTIVE_RETRY_MAX_S (one small request each time;
            # IKEv2 finds a restarted GW by its liveness check instead)
            timeout = min(timeout, ACTIVE_RETRY_MAX_S)
        self.reg.deadline = now + timeout
        return [self._send_rrq(now)]

    def _do_hold(self, now: float) -> list[Action]:
        """An authenticated refusal: the path works and the HA said no.  Say so clearly (once
        per code) and keep to the back-off; re-establishing the tunnel would not help."""
        code = self.reg.refused
        if code == self.reg.refusal_logged:
            return []
        self.reg.refusal_logged = code
        return [Log("warning", f"home agent {self._ha} refused the registration of "
                               f"{self.home_address}: code {code} ({reply_code_name(code)}); "
                               f"asking again in {(self.reg.deadline or now) - now:.1f} s, backing off "
                               f"up to "
                               f"{self.config.retransmit_max_s:g} s")]

    def _do_confirm(self, now: float) -> list[Action]:
        reply = self.reg.accepted_reply
        actions: list[Action] = []
        if self.reg.refusal_logged is not None or self.reg.attempts > self.config.max_attempts:
            actions.append(Log("info", f"registered via {self.care_of} after "
                                       f"{self.reg.attempts} requests"))
        if reply is None:
            raise UsageError(f"MN {self.name}: registration confirmed without an accepted reply")
        self.reg.confirm(reply, now, self.config.renew_fraction, care_of=self.care_of)
        self._ike_backoff_s = 0.0
        if self.reg.old_care_of_b is not None and self.inbound is not None:
            # make-before-break done: from now on only the new CoA
            self.reg.old_care_of_b = None
            for sa in self._inbound_sas.values():
                if sa is not self.inbound:
                    sa.rebind(local=self.care_of)
            self.inbound.rebind(local=self.care_of)
            actions.append(RebindSa(self.inbound.spi, self.care_of, self.inbound.remote))
        return actions

    def _do_leave_tunnel(self, now: float) -> list[Action]:
        # RFC 5944 §3.6.1.1: the HA's authenticated direct reply is the proof we are home;
        # only now does traffic leave the tunnel
        self.reg.clear()
        self.reg.forget_registration()
        self.care_of = self._care_of_b = self.reg.old_care_of_b = None
        self.reg.gw_points_at = None
        self.interface = self.reg.home_link
        self._record(now, "deregistered", interface=self.reg.home_link)
        actions: list[Action] = [Log("info", f"at home on {self.reg.home_link}: the home agent "
                                             f"confirmed the deregistration of {self.home_address}"),
                                 UseHomeLink(self.reg.home_link)]
        return actions + self._ike_at_home(now)

    def _do_negotiate(self, now: float) -> list[Action]:
        self.reg.clear()
        self.reg.renew_at = None
        self._ike_backoff_s = 0.0
        return self._ike_start(now)

    def _do_start_ike(self, now: float) -> list[Action]:
        return self._ike_start(now)

    def _do_check_gw(self, now: float) -> list[Action]:
        """A round of requests unanswered through SAs that point here: the next request, and
        beside it an IKE liveness check of the GW (RFC 7296 §2.4).  Silent: the GW lost our
        SAs, re-establish; answering: the HA's reply is what is missing (``_probe_expired``)."""
        actions = self._do_send_again(now)
        sa = self._ike_alive()
        if sa is None:
            return actions
        self._probe_for_registration = True
        if self._probe_deadline is None:
            self._record(now, "liveness-check", via="ike", attempts=self.reg.attempts,
                         reason="registration unanswered")
            self._probe_started = now
            self._probe_deadline = now + max(PROBE_TIMEOUT_S, 2 * self.rtt.rto)
            actions += self._ike_outputs(self._ikev2.endpoint.check_liveness(sa.ike_id, now), now)
        return actions

    def _registration_unanswered(self, now: float) -> list[Action]:
        """The GW answered a liveness check but the HA's reply never came through it: say so
        once per care-of address; the back-off (capped) goes on, nothing is re-established."""
        self._record(now, "registration-unanswered", care_of=self.care_of,
                     attempts=self.reg.attempts, gateway_alive=True)
        if self.reg.unanswered_logged == self.care_of:
            return []
        self.reg.unanswered_logged = self.care_of
        return [Log("warning", f"the GW {self.gateway} answers through the tunnel from "
                               f"{self.care_of}, but {self.reg.attempts} registration requests "
                               f"for {self.home_address} got no reply from the home agent "
                               f"{self._ha}: it is down or refuses them, or its SIU path to the "
                               f"GW is down; the tunnel stays (the GW bound it here), asking "
                               f"again, backing off up to {self.config.retransmit_max_s:g} s")]

    def _do_reestablish(self, now: float) -> list[Action]:
        attempts = self.reg.attempts
        self.reg.stop_sending()
        why, self._why = self._why, ""
        silent, self._gw_silent = self._gw_silent, False
        if not why:
            self._record(now, "registration-failed", attempts=attempts, reason="no reply")
            why = (f"no reply to {attempts} registration requests for {self.home_address} via "
                   f"{self.care_of}: the GW or the HA may be down or have lost our SAs")
        self._record(now, "reestablish-requested", attempts=attempts, reason=why)
        return [Log("warning", f"{why}; re-establishing the tunnel with IKEv2 and registering "
                               f"again, backing off up to {self.config.retransmit_max_s:g} s"),
                ReestablishRequested(self.home_address, self.care_of, attempts),
                *(self._next_gateway(now, "it did not answer a liveness check") if silent
                  else []),
                *self._ike_reestablish(now)]

    def _do_retry_ike(self, now: float) -> list[Action]:
        self.reg.stop_sending()
        self._ike_retry_at = now + self._ike_backoff_s
        self._ike_backoff_s = min(self.config.retransmit_max_s,
                                  max(self.config.retransmit_initial_s, 2 * self._ike_backoff_s))
        return []

    def _do_pause(self, now: float) -> list[Action]:
        self.reg.stop_sending()
        self._ike_retry_at = self._liveness_at = self._probe_deadline = None
        self._probe_for_registration = False
        return [Log("info", f"care-of address {self.care_of} gone: nothing is sent until an "
                            f"address can reach the GW again (the registration stands)")]

    def _do_forget(self, now: float) -> list[Action]:
        self.reg.clear()
        self.care_of = self._care_of_b = self.reg.old_care_of_b = None
        self.reg.renew_at = self._ike_retry_at = None
        self._liveness_at = self._probe_deadline = None
        self._probe_for_registration = False
        self.reg.gw_points_at = None
        return []

    _effects: dict[Do, Callable[..., list[Action]]] = {
        Do.NOTHING: _do_nothing, Do.SEND_NEW: _do_send_new, Do.SEND_AGAIN: _do_send_again,
        Do.HOLD: _do_hold, Do.CONFIRM: _do_confirm, Do.LEAVE_TUNNEL: _do_leave_tunnel,
        Do.NEGOTIATE: _do_negotiate, Do.START_IKE: _do_start_ike, Do.REESTABLISH: _do_reestablish,
        Do.RETRY_IKE: _do_retry_ike, Do.FORGET: _do_forget, Do.PAUSE: _do_pause,
        Do.CHECK_GW: _do_check_gw,
    }

    def _timed_out(self, now: float) -> list[Action]:
        """The retransmission timer ran out: send again.  IKEv2: a new tunnel, or a liveness
        check beside the request (``Registration.no_reply_event``).  An authenticated refusal
        in the round means the tunnel works: neither."""
        self.reg.deadline = None
        if self.ike is not None and self.care_of is not None:
            event = self.reg.no_reply_event(self.care_of, self.config.max_attempts)
            if event is RegEvent.NO_REPLY_ROUND:
                return self._event(event, now)
            if event is RegEvent.NO_REPLY_HERE:
                self._record(now, "rrq-retransmitted", attempt=self.reg.attempts + 1)
                return self._event(event, now)
        round_over = self.reg.round_over(self.config.max_attempts)
        if round_over and self.state is S.REGISTERING and not self.reg.replied:
            actions: list[Action] = []
            if self.ike is None and self.reg.attempts == self.config.max_attempts:
                # manual keys: nothing to re-establish; say it once, keep asking for ever
                self._record(now, "registration-failed", attempts=self.reg.attempts,
                             reason="no reply")
                self._record(now, "reestablish-requested", attempts=self.reg.attempts)
                actions += [Log("warning", f"no reply to {self.reg.attempts} registration requests "
                                           f"for {self.home_address} via {self.care_of}: the GW "
                                           f"or the HA may be down; asking again, backing off "
                                           f"up to {self.config.retransmit_max_s:g} s"),
                            ReestablishRequested(self.home_address, self.care_of,
                                                 self.reg.attempts)]
            self._record(now, "rrq-retransmitted", attempt=self.reg.attempts + 1)
            return actions + self._event(RegEvent.TIMED_OUT, now)
        if round_over:
            self.reg.replied = False
        self._record(now, "rrq-retransmitted", attempt=self.reg.attempts + 1)
        return self._event(RegEvent.TIMED_OUT, now)

    def _send_rrq(self, now: float) -> SendToNet | Log:
        ident = self.msa.new_identification(self.wallclock())
        self.reg.note_sent(ident, now)
        dereg = self.state is S.DEREGISTERING
        rrq = self.reg.request(home_address=self.home_address, home_agent=self._ha,
                               care_of=self.care_of, ident=ident, lifetime=self.config.lifetime_s)
        data = self.msa.sign(build_registration_request(rrq))
        self._record(now, "rrq-sent", attempt=self.reg.attempts, care_of=rrq.care_of_address,
                     lifetime=rrq.lifetime, identification=ident)
        if dereg:
            return SendToNet(build_udp_packet(self._home_b, self._ha_b, MIP_PORT, MIP_PORT, data),
                             self.reg.home_link)
        if self._care_of_b is None:      # never: away means a care-of address
            raise UsageError(f"MN {self.name}: a registration request away without a care-of "
                             f"address")
        inner = build_udp_packet(self._care_of_b, self._ha_b, MIP_PORT, MIP_PORT, data)
        if self.outbound is None:        # IKEv2: the SAs are gone (deleted); the retry will tell
            self.drops[DropReason.NO_SA] += 1
            return Log("debug", "registration request not sent: no SA with the GW")
        try:
            return SendToNet(self.outbound.encapsulate(inner, now), self.interface)
        except (Dropped, SaExhausted) as exc:
            self.drops[getattr(exc, "reason", DropReason.SA_EXHAUSTED)] += 1
            return Log("debug", f"registration request not sent: {exc}")
