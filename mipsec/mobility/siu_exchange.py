"""The home agent's side of the SIU exchange with its VPN gateways (the patent's Fig. 4, last
step, made reliable).

Theory of operation
-------------------
Every change of a binding that came through a GW is reported to it in a Security Information
Update (SIU) naming the CoA the GW's SA should have now (Old CoA: the compare value of the GW's
compare-and-swap) and the new one.  The GW acknowledges every authenticated SIU, reporting where
its SA really points and its epoch (docs/protocol.md §2.1 steps 5-6, §2.3).  ``SiuExchange``
holds everything the HA knows about that exchange, per home address: the GW's last reported CoA,
the last SIU sent and whether it was acknowledged, the resend timer; per GW: its epoch.  The
role (``mipsec/node/home_agent.py``) builds, signs and sends the SIUs; this object decides what
the next one names and whether an ACK calls for a correction.
"""

from __future__ import annotations

import dataclasses
import enum

from mipsec.wire.siu import SiuType


@dataclasses.dataclass(frozen=True)
class SentSiu:
    """One SIU as sent (a resend repeats its content with a new sequence number)."""
    sequence: int
    type: SiuType
    old: str | None
    new: str | None
    lifetime: int
    rrp: bytes
    correction: bool


class AckOutcome(enum.Enum):
    OLDER = "older"                    # the ACK of an earlier SIU: the latest one's will follow
    AGREES = "agrees"                  # the GW has what our binding says: done
    CORRECTION_REFUSED = "correction-refused"   # it refused our correction too: stop (no loop)
    CORRECT = "correct"                # send a correcting SIU from what it has to what we have


class SiuExchange:
    """The HA's SIU state towards its GWs (see the module docstring)."""

    __slots__ = ("gw_epoch", "gw_care_of", "last", "acked", "resend")

    def __init__(self) -> None:
        self.gw_epoch: dict[str, int] = {}             # GW -> its epoch from its latest ACK
        self.gw_care_of: dict[str, str | None] = {}    # home -> where the GW's last ACK says
        self.last: dict[str, SentSiu] = {}             # home -> our latest SIU
        self.acked: dict[str, int] = {}                # home -> sequence of the GW's latest ACK
        self.resend: dict[str, tuple[float, int]] = {}   # home -> (deadline, resends so far)

    def gw_has(self, home: str, fallback: str | None) -> str | None:
        """Where we believe the GW's SA for ``home`` points: its last ACK, else ``fallback``
        (the binding's previous CoA: right unless an SIU was lost before a second move)."""
        return self.gw_care_of[home] if home in self.gw_care_of else fallback

    def epoch(self, gateway: str) -> int:
        """The epoch our SIUs to ``gateway`` echo (0 before its first ACK)."""
        return self.gw_epoch.get(gateway, 0)

    def spi_to_name(self, home: str, configured: int) -> int:
        """The Gateway SA Identifier of our next SIU for ``home``: the SPI we know, or 0 ("the
        SA that serves this home address") when our last SIU went unanswered (lost, or the GW
        no longer knows that SPI: a restarted GW)."""
        last = self.last.get(home)
        if last is not None and self.acked.get(home) != last.sequence:
            return 0
        return configured

    def sent(self, home: str, siu: SentSiu, now: float, retransmit_s: float,
             resends: int) -> None:
        """``siu`` left; until its ACK it is resent after ``retransmit_s`` doubled per resend
        (``retransmit_s`` 0: never)."""
        self.last[home] = siu
        if retransmit_s > 0:
            self.resend[home] = (now + retransmit_s * (2 ** resends), resends)
        else:
            self.resend.pop(home, None)

    def acknowledged(self, home: str, gateway: str, reported: str | None, epoch: int,
                     sequence: int, want: str | None, refused_epoch: bool) -> AckOutcome:
        """An authenticated ACK from ``gateway``: its SA for ``home`` points at ``reported``;
        ``want`` is our binding's CoA; ``refused_epoch``: the SIU was refused for its epoch."""
        self.gw_care_of[home] = reported
        self.gw_epoch[gateway] = epoch
        self.acked[home] = sequence
        last = self.last.get(home)
        if last is None or last.sequence != sequence:
            return AckOutcome.OLDER
        self.resend.pop(home, None)
        if reported == want and not refused_epoch:
            return AckOutcome.AGREES
        if last.correction:
            # one correction per SIU we originated, never a correction of a correction
            return AckOutcome.CORRECTION_REFUSED
        return AckOutcome.CORRECT

    def next_deadline(self) -> float | None:
        return min((d for d, _n in self.resend.values()), default=None)

    def due(self, now: float) -> list[tuple[str, SentSiu, int]]:
        """(home, the SIU to resend, resends so far) for every resend timer that ran out."""
        return [(home, self.last[home], resends)
                for home, (deadline, resends) in list(self.resend.items()) if deadline <= now]

    def give_up(self, home: str) -> None:
        self.resend.pop(home, None)

    def gateway_changed(self, home: str) -> None:
        """A GW pool: ``home`` registered through another GW, which holds its SAs now.  What the
        old GW's ACKs said (its binding, the SIU it acknowledged, the resend timer of an SIU
        sent to it) is not about that GW's SA: forget it (the new GW's SA was bound by IKE and
        takes the HA's first SIU whatever its Old CoA)."""
        self.gw_care_of.pop(home, None)
        self.acked.pop(home, None)
        self.last.pop(home, None)
        self.resend.pop(home, None)
