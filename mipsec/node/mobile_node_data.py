"""The mobile node's ESP data path (docs/design.md "Roles"), sans-I/O.

``MobileNode`` takes these methods from ``MobileNodeData``: the uplink (``receive_from_tun``:
an application packet reverse-tunnelled, RFC 3024, IP-in-IP from the care-of address to the HA
inside ESP to the GW; at home it leaves directly), the downlink (``receive_from_net``: ESP for
the CoA -> the HA's IP-in-IP -> the application packet; a Registration Reply inside the ESP or,
at home, directly from the HA; IKE handed to the IKEv2 integration), and their fast paths for
the event loop, which give the same bytes, drops and counters for any input.  The inbound SA
is the current one, or (IKEv2) any the shared child SA book still holds for the packet's SPI:
the old SA of a re-key receives until its Delete and a grace period after it (RFC 7296 §2.8).
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import TYPE_CHECKING

from mipsec.drops import DropReason
from mipsec.errors import Dropped, ParseError, SaExhausted
from mipsec.ipsec.sa import SecurityAssociation
from mipsec.mip import ipip
from mipsec.mobility.registration import Registration, RegState
from mipsec.node.actions import Action, SendToNet, WriteToTun
from mipsec.node.config import MIP_PORT
from mipsec.node.ike import RoleIke
from mipsec.node.packet import (
    IPPROTO_ESP,
    IPPROTO_IPIP,
    IPPROTO_UDP,
    NAT_T_PORT,
    parse_udp_packet,
    peek_ipv4,
    udp_ports,
)

LIVENESS_IDLE_S = 1.0        # sending, nothing received for this long: is the GW still there?

# the data path's fixed offsets (RFC 791 header, RFC 4303 SPI, RFC 3948 UDP port)
_unpack_total_frag = struct.Struct("!H2xH").unpack_from   # total length, flags + offset
_unpack_total = struct.Struct("!H").unpack_from
_unpack_header_words = struct.Struct("!10H").unpack_from  # an option-less header: RFC 1071
_unpack_spi = struct.Struct("!I").unpack_from
_NAT_T_PORT_B = NAT_T_PORT.to_bytes(2, "big")
S = RegState


class MobileNodeData:
    """The data path of ``MobileNode`` (see the module docstring); the attributes below are
    the MN's, set by ``MobileNode.__init__``."""

    ike: RoleIke | None
    reg: Registration
    care_of: str | None
    interface: str | None
    inbound: SecurityAssociation | None
    outbound: SecurityAssociation | None
    drops: Counter[DropReason]
    counters: Counter[str]
    _ha: str
    _ha_b: bytes
    _care_of_b: bytes | None
    _inbound_sas: dict[int, SecurityAssociation]
    _awaiting_first_downlink: bool
    _last_out: float
    _liveness_at: float | None
    _liveness_interval: float
    _probe_deadline: float | None
    _probe_for_registration: bool

    if TYPE_CHECKING:      # MobileNode's own members, used here
        @property
        def state(self) -> RegState: ...
        def _record(self, now: float, kind: str, **detail: object) -> None: ...
        def _drop(self, reason: DropReason) -> list[Action]: ...
        def _ike_packet(self, packet: bytes, now: float) -> list[Action]: ...
        def _handle_reply(self, data: bytes, now: float, via: str) -> list[Action]: ...
    def receive_from_tun(self, packet: bytes, now: float) -> list[Action]:
        """An application packet from the home address: reverse-tunnel it (or send it at home)."""
        try:
            peek_ipv4(packet)
        except ParseError as exc:
            return self._drop(exc.reason)
        if self.state is S.AT_HOME:
            return [SendToNet(packet, self.reg.home_link)]
        # away, and also on the home link until the HA's authenticated reply confirms it: in
        # the tunnel or not at all (never in the clear on an unconfirmed guess)
        if self.care_of is None or self.outbound is None or self.state is S.DETACHED:
            return self._drop(DropReason.NO_SA)
        try:
            tunnelled = ipip.encapsulate(packet, self.care_of, self._ha)
            out: list[Action] = [SendToNet(self.outbound.encapsulate(tunnelled, now),
                                           self.interface)]
            self._last_out = now
            if self._liveness_at is None and self.state is S.REGISTERED:
                self._liveness_at = now + self._liveness_interval
            return out
        except Dropped as exc:
            return self._drop(exc.reason)
        except SaExhausted:
            return self._drop(DropReason.SA_EXHAUSTED)
        except ValueError:                               # too large to tunnel
            return self._drop(DropReason.MALFORMED)

    @property
    def data_interface(self) -> str | None:
        """The interface the packets of ``tun_fast_path`` leave on (None: by routing)."""
        return self.interface

    def tun_fast_path(self, packet: bytes, now: float) -> bytes | list[Action] | None:
        """``receive_from_tun`` for the event loop's data path: the ESP packet to send on
        ``data_interface`` (bytes), None when the packet was dropped (counted), or that method's
        actions.  Only an option-less, unfragmented, whole application packet while away with
        an SA is handled here; anything else (at home, no SA, a header ``peek_ipv4`` refuses)
        goes through ``receive_from_tun``, so the result is the same for any input."""
        n = len(packet)
        if n < 20 or packet[0] != 0x45 or self.state is S.AT_HOME:
            return self.receive_from_tun(packet, now)
        total, frag = _unpack_total_frag(packet, 2)
        sa = self.outbound
        if (total != n or frag & 0x3FFF or self.care_of is None or sa is None
                or self.state is S.DETACHED):
            return self.receive_from_tun(packet, now)
        try:
            out = sa.encapsulate(ipip.encapsulate(packet, self.care_of, self._ha), now)
        except Dropped as exc:
            self.drops[exc.reason] += 1
            return None
        except SaExhausted:
            self.drops[DropReason.SA_EXHAUSTED] += 1
            return None
        except ValueError:                               # too large to tunnel
            self.drops[DropReason.MALFORMED] += 1
            return None
        self._last_out = now
        if self._liveness_at is None and self.state is S.REGISTERED:
            self._liveness_at = now + self._liveness_interval
        return out

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
        old_coa = self.reg.old_care_of_b
        if old_coa is not None and dst != self._care_of_b and dst != old_coa:
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
        except Dropped as exc:
            return self._drop(exc.reason)
        except ParseError as exc:
            return self._drop(exc.reason)
        self._gw_alive()
        return self._authenticated(inner, dst, now)

    def _gw_alive(self) -> None:
        """Authenticated ESP from the GW: it is alive and has our SAs (a check after
        unanswered requests waits for IKE's answer: it tells what is missing)."""
        self._liveness_at = None
        if not self._probe_for_registration:
            self._probe_deadline = None

    def _authenticated(self, inner: bytes, dst: bytes, now: float) -> list[Action]:
        """What the GW sent us in ESP (to our CoA ``dst``): the HA's IP-in-IP, or its reply."""
        try:
            iproto, isrc, idst, iihl = peek_ipv4(inner)
            if iproto == IPPROTO_IPIP:
                outer_src, _outer_dst, innermost = ipip.decapsulate(inner)
                if isrc != self._ha_b:
                    return self._drop(DropReason.IPIP_UNKNOWN_TUNNEL)
                peek_ipv4(innermost)
                return self._downlink(innermost, dst, now)
            if iproto == IPPROTO_UDP:
                _s, _d, sport, dport, payload = parse_udp_packet(inner)
                if isrc == self._ha_b and sport == MIP_PORT and dport == MIP_PORT:
                    return self._handle_reply(payload, now, via="tunnel")
                return self._drop(DropReason.MIP_NOT_FOR_US)
            return self._drop(DropReason.WRONG_PROTOCOL)
        except ParseError as exc:
            return self._drop(exc.reason)

    def _downlink(self, innermost: bytes, dst: bytes, now: float) -> list[Action]:
        if self._awaiting_first_downlink and dst == self._care_of_b:
            self._awaiting_first_downlink = False
            self._record(now, "first-downlink-at-new-coa", care_of=self.care_of)
        self.counters["downlink"] += 1
        self._liveness_interval = LIVENESS_IDLE_S    # two-way traffic: check soon again
        return [WriteToTun(innermost)]

    def net_fast_path(self, packet: bytes, now: float) -> bytes | list[Action] | None:
        """``receive_from_net`` for the event loop's data path: the packet for the TUN (bytes),
        None when it was dropped (counted as there), or that method's actions.

        Handled here without parsing again what the SA checks: raw ESP (or ESP in UDP, not
        IKE) in an option-less, unfragmented, whole outer header, whose payload is the HA's
        IP-in-IP with a 20-byte header around an option-less datagram.  Before decryption
        anything else goes through ``receive_from_net``, after it through the same
        ``_authenticated`` it uses, so the bytes, drops and counters are the same for any
        input.  Of the IP-in-IP header ``decapsulate`` checked version, IHL and total length;
        left are its checksum and fragment bits, its source (the HA), and the innermost
        header's version, IHL, total length and fragment bits (``ipip.decapsulate``,
        ``peek_ipv4``)."""
        n = len(packet)
        if n < 32 or packet[0] != 0x45:
            return self.receive_from_net(packet, now)
        total, frag = _unpack_total_frag(packet, 2)
        proto = packet[9]
        if total != n or frag & 0x3FFF:
            return self.receive_from_net(packet, now)
        if proto == IPPROTO_ESP:
            at = 20
        elif (proto == IPPROTO_UDP and packet[22:24] == _NAT_T_PORT_B
              and (self.ike is None or not RoleIke.is_ike(packet, proto, 20))):
            at = 28
        else:
            return self.receive_from_net(packet, now)
        dst = packet[16:20]
        old_coa = self.reg.old_care_of_b
        if old_coa is not None and dst != self._care_of_b and dst != old_coa:
            return self.receive_from_net(packet, now)
        sa = self.inbound
        if self._inbound_sas:
            sa = self._inbound_sas.get(_unpack_spi(packet, at)[0], sa)
        if sa is None:
            return self.receive_from_net(packet, now)
        try:
            inner = sa.decapsulate(packet, now)
        except Dropped as exc:
            self.drops[exc.reason] += 1
            return None
        except ParseError as exc:
            self.drops[exc.reason] += 1
            return None
        self._gw_alive()
        m = len(inner)
        if (m < 40 or inner[0] != 0x45 or inner[9] != IPPROTO_IPIP or inner[20] != 0x45
                or inner[6] & 0x3F or inner[7] or inner[26] & 0x3F or inner[27]
                or _unpack_total(inner, 22)[0] != m - 20
                or sum(_unpack_header_words(inner)) % 0xFFFF):
            return self._authenticated(inner, dst, now)
        if inner[12:16] != self._ha_b:
            self.drops[DropReason.IPIP_UNKNOWN_TUNNEL] += 1
            return None
        if self._awaiting_first_downlink:
            return self._downlink(inner[20:], dst, now)
        self.counters["downlink"] += 1
        self._liveness_interval = LIVENESS_IDLE_S
        return inner[20:]

    def _direct(self, packet: bytes, src: bytes, now: float) -> list[Action]:
        try:
            _s, _d, sport, dport, payload = parse_udp_packet(packet)
        except ParseError as exc:
            return self._drop(exc.reason)
        if src != self._ha_b or sport != MIP_PORT or dport != MIP_PORT:
            return self._drop(DropReason.MIP_NOT_FOR_US)
        return self._handle_reply(payload, now, via="direct")
