"""The home agent's side of the Security Information Update exchange with its GWs
(docs/protocol.md §2.1), sans-I/O.

``HomeAgent`` takes these methods from ``HomeAgentSiu``: ``_siu`` builds, numbers and signs one
SIU (reserving the next block of SIU numbers in the binding store first when the reserved ones
run out, ``HomeAgent._reserve``) and arms its resend; ``_siu_ack`` takes a GW's ACK, learns the
SA that serves the MN, and answers a disagreement with a correcting SIU.  What each GW has, its
epoch and our last SIUs are kept in ``mipsec.mobility.siu_exchange.SiuExchange``; the theory of
operation is in ``mipsec.node.home_agent``'s docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mipsec.constants import UNSPECIFIED_ADDRESS
from mipsec.drops import DropReason
from mipsec.mip.constants import SIU_PORT
from mipsec.mip.siu import SiuSigner, SiuVerifier
from mipsec.mobility.ha_binding import Binding
from mipsec.mobility.siu_exchange import AckOutcome, SentSiu, SiuExchange
from mipsec.node.actions import Action, ReserveSiuSequence, SendToNet
from mipsec.node.config import HomeAgentConfig, HomeAgentMobile
from mipsec.node.packet import a2b, b2a, build_udp_packet
from mipsec.wire.siu import SiuFlags, SiuType

UNBOUND_ADDRESS = UNSPECIFIED_ADDRESS    # an SIU's "no care-of address"


class HomeAgentSiu:
    """The SIU half of ``HomeAgent`` (see the module docstring); the attributes below are the
    HA's, set by ``HomeAgent.__init__``."""

    config: HomeAgentConfig
    wallclock: Callable[[], float]
    bindings: dict[str, Binding]
    siu: SiuExchange
    _mobiles: dict[str, HomeAgentMobile]
    _ack_verifier: SiuVerifier
    _signers: dict[str, SiuSigner]
    _seq_end: dict[str, int]
    _address_b: bytes

    if TYPE_CHECKING:      # HomeAgent's own methods, used here
        def _drop(self, reason: DropReason) -> list[Action]: ...

        def _record(self, now: float, kind: str, **detail: Any) -> None: ...

        def _reserve(self, gateway: str, first: int) -> ReserveSiuSequence: ...

    def _siu_ack(self, src: bytes, data: bytes, now: float) -> list[Action]:
        """An ACK from a GW: remember its binding; if it is not ours, send a correcting SIU."""
        siu = self._ack_verifier.verify(b2a(src), data)
        if siu.type != SiuType.ACK:
            return self._drop(DropReason.MALFORMED)
        home = siu.home_address
        mobile = self._mobiles.get(home)
        if mobile is None or mobile.gateway != siu.sender:
            return self._drop(DropReason.SIU_UNKNOWN_MOBILE)
        reported = None if siu.new_care_of == UNBOUND_ADDRESS else siu.new_care_of
        if siu.gateway_spi and siu.gateway_spi != mobile.gateway_spi:
            # docs/protocol.md §2.2: the ACK names the SA that serves the MN now (IKEv2 re-keys
            # and re-establishment change it): name that one from now on
            mobile = self._mobiles[home] = dataclasses.replace(mobile, gateway_spi=siu.gateway_spi)
            self._record(now, "gateway-spi-learned", home_address=home, spi=siu.gateway_spi)
        binding = self.bindings.get(home)
        want = binding.care_of_address if binding is not None else None
        # E: our SIU carried an epoch the GW refused (it restarted): nothing was applied; send
        # it again, as a correction, with the epoch just learnt
        outcome = self.siu.acknowledged(home, siu.sender, reported, siu.gateway_epoch,
                                        siu.sequence, want,
                                        bool(siu.flags & SiuFlags.STALE_EPOCH))
        if outcome is AckOutcome.OLDER or outcome is AckOutcome.AGREES:
            return []
        if outcome is AckOutcome.CORRECTION_REFUSED:
            # the GW refused our correction too (e.g. it cannot use that CoA): no SIU/ACK loop
            self._record(now, "siu-correction-refused", home_address=home, gw_has=reported,
                         want=want, sequence=siu.sequence)
            return []
        if binding is None or want is None:
            return self._siu(now, SiuType.DEREGISTER, mobile, reported, None, 0, b"",
                             correction=True)
        last = self.siu.last[home]
        rrp = last.rrp if last.type == SiuType.UPDATE and last.new == want else b""
        return self._siu(now, SiuType.UPDATE, mobile, reported, want, binding.lifetime, rrp,
                         correction=True)

    def _siu(self, now: float, type: SiuType, mobile: HomeAgentMobile, old: str | None,
             new: str | None, lifetime: int, rrp: bytes, correction: bool = False,
             resends: int = 0) -> list[Action]:
        """Build, number and sign one SIU; until its ACK arrives it is resent on a short timer
        (``siu_retransmit_s``, doubling, ``siu_retransmit_tries`` times): a lost SIU costs one
        such timeout, not the MN's registration retransmission.  A resend is a fresh SIU (a new
        sequence number, the same content), so the GW's replay check accepts it and applies it
        idempotently (a move it already made is a repeat: it only forwards the reply again)."""
        signer = self._signers[mobile.gateway]
        actions: list[Action] = []
        if signer.next_sequence >= self._seq_end[mobile.gateway]:
            actions.append(self._reserve(mobile.gateway, signer.next_sequence))
        sequence = signer.next_sequence
        spi = self.siu.spi_to_name(mobile.home_address, mobile.gateway_spi)
        self.siu.sent(mobile.home_address, SentSiu(sequence, type, old, new, lifetime, rrp,
                                                   correction),
                      now, self.config.siu_retransmit_s, resends)
        epoch = self.siu.epoch(mobile.gateway)
        data = signer.build(type, home_address=mobile.home_address,
                            old_care_of=old or UNBOUND_ADDRESS, new_care_of=new or UNBOUND_ADDRESS,
                            gateway_spi=spi, lifetime=lifetime, rrp=rrp,
                            wallclock=self.wallclock(), forward_rrp=bool(rrp),
                            gateway_epoch=epoch)
        self._record(now, "siu-sent", home_address=mobile.home_address, type=type.name.lower(),
                     old=old, new=new, gateway=mobile.gateway, sequence=sequence,
                     **({"correction": True} if correction else {}))
        actions.append(SendToNet(build_udp_packet(self._address_b, a2b(mobile.gateway), SIU_PORT,
                                                  SIU_PORT, data)))
        return actions
