"""A UDP stream source and sink for tests and demos (the correspondent node, CN).

Each datagram carries a magic, a stream id, a sequence number and the sender's ``now``; the
receiver records (sequence, sent time, arrival time).  From both ends ``stream_report`` computes
what a handover did to the stream: packets lost, duplicated, reordered, and the longest
interruption (the largest gap between two consecutive arrivals).

The same class runs on the CN (its "net" is the home network) and as the application behind the
MN's TUN device (its packets go into ``MobileNode.receive_from_tun``).  It follows the role API
(``receive_from_net``, ``handle_timer``, ``get_timer``, ``drops``, ``timeline``, ``status``).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from mipsec.drops import DropReason
from mipsec.errors import ParseError
from mipsec.node.actions import Action, SendToNet, TimelineEvent
from mipsec.node.packet import a2b, build_udp_packet, parse_udp_packet

STREAM_PORT = 9000
STREAM_MAGIC = b"MIPS"
_PAYLOAD = struct.Struct("!4sIId")      # magic, stream id, sequence, sent time (s)


@dataclass(frozen=True)
class StreamReport:
    sent: int
    received: int
    lost: int
    duplicates: int
    reordered: int
    longest_interruption_s: float
    interruption_from: float | None      # arrival time of the last packet before the gap
    interruption_to: float | None        # arrival time of the first packet after it

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Correspondent:
    def __init__(self, name: str, address: str, port: int = STREAM_PORT):
        self.name = name
        self.address = address
        self.port = port
        self._src = a2b(address)
        self.drops: Counter[DropReason] = Counter()
        self.timeline: list[TimelineEvent] = []
        # sending
        self._peer: bytes | None = None
        self._peer_port = STREAM_PORT
        self._interval = 0.0
        self._next: float | None = None
        self._stop: float | None = None
        self._remaining: int | None = None
        self._size = 0
        self.stream_id = 1
        self.sent = 0
        # receiving: (stream id, seq, sent time, arrival time)
        self.arrivals: list[tuple[int, int, float, float]] = []

    # --- sending -----------------------------------------------------------------------------
    def start_stream(self, peer: str, *, interval_s: float, start: float, count: int | None = None,
                     stop: float | None = None, peer_port: int = STREAM_PORT, size: int = 64,
                     stream_id: int = 1) -> None:
        """Send one datagram every ``interval_s`` from ``start`` until ``count`` or ``stop``."""
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._peer, self._peer_port = a2b(peer), peer_port
        self._interval, self._next, self._stop = interval_s, start, stop
        self._remaining, self._size, self.stream_id = count, max(size, _PAYLOAD.size), stream_id

    def get_timer(self) -> float | None:
        return self._next

    def handle_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        peer = self._peer
        while peer is not None and self._next is not None and self._next <= now:
            if (self._stop is not None and self._next > self._stop) or self._remaining == 0:
                self._next = None
                break
            payload = _PAYLOAD.pack(STREAM_MAGIC, self.stream_id, self.sent, self._next)
            payload += b"\0" * (self._size - len(payload))
            actions.append(SendToNet(build_udp_packet(self._src, peer, self.port,
                                                      self._peer_port, payload,
                                                      with_checksum=False)))
            self.sent += 1
            if self._remaining is not None:
                self._remaining -= 1
            self._next += self._interval
        return actions

    # --- receiving ---------------------------------------------------------------------------
    def receive_from_net(self, packet: bytes, now: float) -> list[Action]:
        try:
            _src, dst, _sport, dport, payload = parse_udp_packet(packet, verify_checksum=False)
            if dst != self._src or dport != self.port:
                raise ParseError("not our stream address/port", DropReason.MIP_NOT_FOR_US)
            if len(payload) < _PAYLOAD.size:
                raise ParseError("short stream payload", DropReason.TRUNCATED)
            magic, stream_id, seq, sent_time = _PAYLOAD.unpack_from(payload)
            if magic != STREAM_MAGIC:
                raise ParseError("not a stream datagram", DropReason.MALFORMED)
        except ParseError as exc:
            self.drops[exc.reason] += 1
            return []
        self.arrivals.append((stream_id, seq, sent_time, now))
        return []

    receive_from_tun = receive_from_net

    def handle_event(self, event: object, now: float) -> list[Action]:
        return []

    # --- reporting ---------------------------------------------------------------------------
    def report(self, sent: int, *, since: float | None = None, until: float | None = None
               ) -> StreamReport:
        """What arrived here out of the ``sent`` datagrams of the peer's stream.

        ``since``/``until`` restrict the interruption search to arrivals in that window.
        """
        seen: set[int] = set()
        duplicates = reordered = 0
        highest = -1
        for _sid, seq, _st, _at in self.arrivals:
            if seq in seen:
                duplicates += 1
                continue
            seen.add(seq)
            if seq < highest:
                reordered += 1
            highest = max(highest, seq)
        times = [a[3] for a in self.arrivals
                 if (since is None or a[3] >= since) and (until is None or a[3] <= until)]
        gap, start, end = 0.0, None, None
        for before, after in pairwise(times):
            if after - before > gap:
                gap, start, end = after - before, before, after
        return StreamReport(sent=sent, received=len(seen), lost=sent - len(seen),
                            duplicates=duplicates, reordered=reordered,
                            longest_interruption_s=gap, interruption_from=start,
                            interruption_to=end)

    def status(self) -> dict[str, Any]:
        return {"role": "correspondent", "name": self.name, "address": self.address,
                "sent": self.sent, "received": len(self.arrivals),
                "drops": {str(k): v for k, v in self.drops.items()}}


def stream_report(sender: Correspondent, receiver: Correspondent, **window: Any) -> StreamReport:
    """The receiver's view of the sender's stream."""
    return receiver.report(sender.sent, **window)
