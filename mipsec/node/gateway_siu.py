"""The VPN gateway's Security Information Update processing (docs/protocol.md §2.2), sans-I/O.

``VpnGateway`` takes these methods from ``GatewaySiu``: an SIU from the inside interface is
authenticated and checked for freshness (``_siu``), then checked against the MN it names and fed
to that MN's binding machine (``_apply_siu``: ``mipsec/mobility/gw_binding.py``), whose effect
is carried out here: re-point the outbound SA (``_repoint``) BEFORE the embedded Registration
Reply is encrypted and sent through it (``_forward_rrp``); a REJECT's reply is one packet with a
rewritten outer header, the SA is never re-bound to send it (``_redirect``).  Every
authenticated, non-replayed SIU is answered with an ACK reporting where the SA points.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING, Any

from mipsec.constants import UNSPECIFIED_ADDRESS
from mipsec.drops import DropReason
from mipsec.errors import Dropped, ParseError, SaExhausted
from mipsec.ipsec.sa import SecurityAssociation, UdpEncap
from mipsec.mip import ipip
from mipsec.mip.constants import SIU_PORT
from mipsec.mip.siu import SiuSigner, SiuVerifier
from mipsec.mobility.gw_binding import Effect
from mipsec.node import timeline as tl
from mipsec.node.actions import Action, Log, RebindSa, SendToNet, TimelineEvent
from mipsec.node.config import MIP_PORT
from mipsec.node.packet import a2b, b2a, build_udp_packet, parse_udp_packet
from mipsec.wire.ipv4 import checksum
from mipsec.wire.mip import parse_registration_reply
from mipsec.wire.siu import Siu, SiuFlags, SiuType

if TYPE_CHECKING:
    from collections.abc import Callable

    from mipsec.node.gateway import Mobile
    from mipsec.node.ike import RoleIke

UNBOUND_ADDRESS = UNSPECIFIED_ADDRESS    # an SIU's "no care-of address"


def _redirect(outer: bytes, address: bytes, port: int | None) -> bytes:
    """The same ESP packet (20-byte outer header, as ``encapsulate`` builds it) to another
    destination address (and UDP port: ESP in UDP carries checksum 0, RFC 3948 §2.1)."""
    header = bytearray(outer[:20])
    header[16:20] = address
    header[10:12] = b"\0\0"
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    if port is None:
        return bytes(header) + outer[20:]
    return bytes(header) + outer[20:22] + port.to_bytes(2, "big") + outer[24:]


def _points_at(sa: SecurityAssociation) -> tuple[str | None, int | None]:
    """Where an outbound SA sends: (address, UDP port or None) as ``rrq_source`` gives it."""
    return sa.remote, (sa.udp_encap.remote_port if sa.udp_encap is not None else None)


class GatewaySiu:
    """The SIU half of ``VpnGateway`` (see the module docstring); the attributes below are the
    GW's, set by ``VpnGateway.__init__``."""

    name: str
    mobiles: dict[str, Mobile]
    timeline: list[TimelineEvent]
    drops: Counter[DropReason]
    verifier: SiuVerifier
    epoch: int
    wallclock: Callable[[], float]
    _epoch_floor: int
    _ack_signers: dict[str, SiuSigner]
    _inside_b: bytes
    _own_addresses: frozenset[str]
    ike: RoleIke | None

    if TYPE_CHECKING:      # VpnGateway's own method, used here
        def _drop(self, reason: DropReason) -> list[Action]: ...

    def _refuse(self, now: float, reason: DropReason, **detail: Any) -> list[Action]:
        tl.record(self.timeline, now, self.name, "siu-refused", reason=str(reason), **detail)
        self.drops[reason] += 1
        return [Log("debug", f"SIU refused: {reason} {detail}")]

    def _siu(self, packet: bytes, now: float) -> list[Action]:
        try:
            src, _dst, _sport, _dport, payload = parse_udp_packet(packet)
            siu = self.verifier.authenticate(b2a(src), payload)
        except ParseError as exc:
            # framing, sender or HMAC: not authenticated: only counted, no timeline, no log
            return self._drop(exc.reason)
        reason = self.verifier.freshness(siu, self.epoch, self._epoch_floor)
        if reason is DropReason.SIU_REPLAYED:
            return self._drop(reason)      # anyone on the home link can repeat one: only counted
        # the sequence number is spent now, also by an SIU refused below: each recorded SIU
        # earns at most one ACK
        self.verifier.accept(siu)
        before = self.mobiles.get(siu.home_address)
        mobile_was_fresh = before is not None and before.unconfirmed
        if reason is not None:
            # SIU_STALE_EPOCH: from before our restart, or the HA has not learnt our epoch yet;
            # the ACK below tells it (docs/protocol.md §2.3)
            actions = self._refuse(now, reason, home_address=siu.home_address,
                                   epoch=siu.gateway_epoch)
        else:
            actions = self._apply_siu(siu, now)
        mobile = self.mobiles.get(siu.home_address)
        if (mobile is not None and mobile.home_agent == siu.sender
                and (mobile.names_spi(siu.gateway_spi) or mobile_was_fresh
                     or reason is not None)
                and siu.type != SiuType.ACK):
            # ACK what we did with it (also a refusal: R tells the HA where we are, and the
            # epoch what to echo), naming the SPI of the SA that serves the MN now: the HA
            # learns it from here (docs/protocol.md §2.2, "SPIs negotiated by IKEv2")
            ack = self._ack_signers[siu.sender].build_ack(
                dataclasses.replace(siu, gateway_spi=mobile.outbound.spi),
                sa_remote=mobile.care_of, wallclock=self.wallclock(), epoch=self.epoch,
                stale_epoch=reason is DropReason.SIU_STALE_EPOCH)
            actions.append(SendToNet(build_udp_packet(self._inside_b, a2b(siu.sender), SIU_PORT,
                                                      SIU_PORT, ack)))
        return actions

    def _apply_siu(self, siu: Siu, now: float) -> list[Action]:
        mobile = self.mobiles.get(siu.home_address)
        if mobile is None:
            return self._refuse(now, DropReason.SIU_UNKNOWN_MOBILE, home_address=siu.home_address)
        if mobile.home_agent != siu.sender:
            return self._refuse(now, DropReason.SIU_UNKNOWN_SENDER, home_address=siu.home_address,
                                sender=siu.sender)
        if not (mobile.names_spi(siu.gateway_spi) or mobile.unconfirmed):
            # a fresh pair (new SAs, no SIU yet) takes any SPI, as it takes any old
            # CoA: the HA cannot know the SPI the GW just negotiated
            return self._refuse(now, DropReason.SIU_UNKNOWN_SA, home_address=siu.home_address,
                                spi=siu.gateway_spi)
        old = None if siu.old_care_of == UNBOUND_ADDRESS else siu.old_care_of
        new = None if siu.new_care_of == UNBOUND_ADDRESS else siu.new_care_of
        current = mobile.care_of
        if mobile.outdated(siu.sequence):
            return self._refuse(now, DropReason.SIU_STALE_CARE_OF,
                                home_address=mobile.home_address, current=current, old=old,
                                new=new, outdated=True)
        event = mobile.classify(siu.type, old, new)
        if event is None:
            return self._refuse(now, DropReason.MALFORMED, home_address=mobile.home_address,
                                type=int(siu.type))
        if new is not None and (ipip.unusable_care_of(new, self._own_addresses)
                                or mobile.allows(a2b(new))):
            # never point an SA (or send a reply) at 0/8, loopback, multicast, broadcast,
            # 240/4, ourselves or the home side (the MN's allowed destinations)
            return self._refuse(now, DropReason.MIP_BAD_CARE_OF,
                                home_address=mobile.home_address, current=current, new=new)
        if siu.flags & SiuFlags.FORWARD_RRP and siu.rrp and not self._rrp_fits(siu):
            # docs/protocol.md §2.2: the embedded reply must be a Registration Reply for this
            # SIU's MN from its HA (defence in depth: the MN checks it again), before any move
            return self._refuse(now, DropReason.SIU_RRP_MISMATCH,
                                home_address=mobile.home_address)
        if not mobile.permits(event):
            # the compare-and-swap failed: the SIU's Old CoA is not our binding
            return self._refuse(now, DropReason.SIU_STALE_CARE_OF,
                                home_address=mobile.home_address, current=current, old=old,
                                new=new)
        effect = mobile.table[(mobile.state, event)][1]
        target: tuple[str, int | None] | None = None
        if new is not None:
            target = mobile.rrq_source(new, now)
            if target is None and (effect is Effect.REPOINT or effect is Effect.REJECT):
                # no authenticated registration of this MN for New CoA came from there: an MN
                # may not aim its downlink (or a reply) at a third party (docs/security.md)
                return self._refuse(now, DropReason.SIU_CARE_OF_MISMATCH,
                                    home_address=mobile.home_address, current=current, new=new)
        mobile.fire(event)
        mobile.siu_sequence = siu.sequence
        rrp = siu.rrp if siu.flags & SiuFlags.FORWARD_RRP else b""
        actions: list[Action] = []
        if effect is Effect.REPOINT:
            # an UPDATE names a New CoA, and the check above refused it without a registration
            assert new is not None and target is not None
            actions += self._repoint(mobile, new, target, now, sequence=siu.sequence)
            mobile.mobike_moved = False
        elif effect is Effect.CONFIRM:
            if new is not None and target is not None and target != _points_at(mobile.outbound):
                # the same CoA from a new NAT mapping: the SA follows the registration
                actions += self._repoint(mobile, new, target, now, sequence=siu.sequence)
            if mobile.mobike_moved:
                mobile.mobike_moved = False
                tl.record(self.timeline, now, self.name, "gw-siu-confirms-mobike",
                          home_address=mobile.home_address, care_of=new, sequence=siu.sequence)
        elif effect is Effect.RETIRE:
            if rrp:
                actions += self._forward_rrp(mobile, rrp, now)
            rrp = b""
            mobile.care_of = None
            mobile.mobike_moved = False
            tl.record(self.timeline, now, self.name, "gw-binding-retired",
                      home_address=mobile.home_address, old=current, spi=mobile.outbound.spi)
        elif effect is Effect.REJECT:
            # docs/protocol.md: no compare, no change: the (rejecting) RRP once to New CoA
            if rrp:
                # a REJECT names a New CoA, and the check above refused it without a registration
                assert new is not None and target is not None
                actions += self._forward_rrp(mobile, rrp, now, to=(new, target))
            rrp = b""
        elif effect is Effect.NOTHING:
            rrp = b""
        if rrp:
            actions += self._forward_rrp(mobile, rrp, now)
        return actions

    def _repoint(self, mobile: Mobile, new: str, target: tuple[str, int | None], now: float,
                 **detail: Any) -> list[Action]:
        """Bind the MN to ``new`` (the care-of address the HA bound) and point its outbound SA
        at ``target``: where the registration for it came from (address, and with UDP
        encapsulation the port; the address differs from ``new`` only behind a NAT)."""
        old = mobile.care_of
        sa = mobile.outbound
        address, port = target
        if port is not None and sa.udp_encap is not None:
            sa.rebind(remote=address, udp_encap=UdpEncap(sa.udp_encap.local_port, port))
        else:
            sa.rebind(remote=address)
        mobile.care_of = new
        if mobile.ike_id is not None and self.ike is not None:
            # the IKE SA follows the binding: re-keys and liveness checks go there
            self.ike.endpoint.follow_addresses(mobile.ike_id, remote=address)
        via = {} if address == new and (port is None or sa.udp_encap is None) else {
            "via": f"{address}:{port}" if sa.udp_encap is not None else address}
        tl.record(self.timeline, now, self.name, "gw-sa-repointed",
                  home_address=mobile.home_address, old=old, new=new, spi=sa.spi, **via, **detail)
        return [RebindSa(sa.spi, sa.local, address)]

    @staticmethod
    def _rrp_fits(siu: Siu) -> bool:
        """Is the SIU's RRP a Registration Reply (RFC 5944 §3.4, type 3) whose home address is
        the SIU's and whose home agent is the SIU's sender?  Its MN-HA authenticator is the
        MN's to check, not ours."""
        try:
            reply = parse_registration_reply(siu.rrp)
        except ParseError:
            return False
        return reply.home_address == siu.home_address and reply.home_agent == siu.sender

    def _forward_rrp(self, mobile: Mobile, rrp: bytes, now: float,
                     to: tuple[str, tuple[str, int | None]] | None = None) -> list[Action]:
        """Encrypt the HA's Registration Reply to the bound CoA (UDP HA:434 -> CoA:434).

        ``to`` (a REJECT SIU): (care-of address, (outer address, UDP port or None)) to send
        this one packet to, with the SA's keys and sequence numbers; the SA itself is not
        touched (the outer header of the one packet is rewritten: ESP does not cover it).
        """
        care_of = to[0] if to is not None else mobile.care_of
        if care_of is None:
            return self._drop(DropReason.NO_SA)      # no outer binding to send it to
        inner = build_udp_packet(a2b(mobile.home_agent), a2b(care_of), MIP_PORT, MIP_PORT, rrp)
        sent = self._send_on_sa(mobile, inner, now, to[1] if to is not None else None)
        if sent:
            tl.record(self.timeline, now, self.name, "rrp-forwarded",
                      home_address=mobile.home_address, care_of=care_of,
                      **({"rejected": True} if to is not None else {}))
        return sent

    def _send_on_sa(self, mobile: Mobile, inner: bytes, now: float,
                    to: tuple[str, int | None] | None = None) -> list[Action]:
        """``inner`` encrypted with the MN's outbound SA (``to``: this one packet to that
        address and UDP port instead); [] when the SA refused it (counted).  A GW with worker
        processes asks the worker that holds the SA instead (``mipsec.node.gateway_worker``)."""
        try:
            outer = mobile.outbound.encapsulate(inner, now)
        except Dropped as exc:
            return self._drop(exc.reason)
        except SaExhausted:
            return self._drop(DropReason.SA_EXHAUSTED)
        if to is not None:
            address, port = to
            outer = _redirect(outer, a2b(address), port if mobile.outbound.udp_encap else None)
        return [SendToNet(outer)]
