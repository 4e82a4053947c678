"""The MN's registration retransmission timer, from measured round trips (RFC 6298 style).

RFC 5944 §3.6.3 leaves the Registration Request's retransmission timer to the implementation
("the mobile node SHOULD ... back off"); a fixed first timeout of 1 s costs a whole second for
every lost message on a path whose round trip is a few milliseconds.  So the MN measures its
registration round trips and computes the timeout as TCP does (RFC 6298 §2):

* first sample R: ``srtt = R``, ``rttvar = R / 2``;
* later samples: ``rttvar = 3/4 rttvar + 1/4 |srtt - R|``, ``srtt = 7/8 srtt + 1/8 R``;
* ``rto = srtt + max(G, 4 rttvar)``, clamped to [``floor_s``, ``cap_s``];
* before any sample, ``initial_s``.

Each timeout doubles the timer, up to ``cap_s`` (RFC 6298 §5.5); a new request starts again from
``rto``.  RFC 6298 §2.4's one-second floor is for TCP over any path; ours is configurable and well
under a second, because a spurious retransmission here costs one small request (with a new
identification, RFC 5944 §5.7), not a congestion collapse.  Karn's problem (RFC 6298 §3) does not
arise: every transmission carries its own identification, so a reply names the one it answers.
Pure arithmetic, no clock: times are arguments.
"""

from __future__ import annotations

ALPHA = 1 / 8                 # RFC 6298 §2.3
BETA = 1 / 4
GRANULARITY_S = 0.001         # G: the event loop's timer resolution is about a millisecond


class RetransmitTimer:
    def __init__(self, *, initial_s: float, floor_s: float, cap_s: float):
        if not 0 < floor_s <= cap_s or not floor_s <= initial_s <= cap_s:
            raise ValueError("need 0 < floor_s <= initial_s <= cap_s")
        self.initial_s = initial_s
        self.floor_s = floor_s
        self.cap_s = cap_s
        self.srtt: float | None = None
        self.rttvar: float | None = None
        self.samples = 0

    @property
    def rto(self) -> float:
        if self.srtt is None or self.rttvar is None:
            return self.initial_s
        rto = self.srtt + max(GRANULARITY_S, 4 * self.rttvar)
        return min(self.cap_s, max(self.floor_s, rto))

    def sample(self, rtt_s: float) -> None:
        """One measured round trip (request sent -> its reply received)."""
        if rtt_s < 0:
            return
        if self.srtt is None or self.rttvar is None:
            self.srtt, self.rttvar = rtt_s, rtt_s / 2
        else:
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt_s)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt_s
        self.samples += 1

    def timeout(self, transmissions: int) -> float:
        """How long to wait after the ``transmissions``-th sending of one request (1 = first)."""
        return min(self.cap_s, self.rto * (2 ** min(max(0, transmissions - 1), 32)))

    def status(self) -> dict[str, float | int | None]:
        return {"rto_s": round(self.rto, 6), "srtt_s": self.srtt, "rttvar_s": self.rttvar,
                "samples": self.samples, "cap_s": self.cap_s, "floor_s": self.floor_s}
