"""IKE and ESP over real sockets, through the daemons' own parts (no tests here).

Shared by the strongSwan interoperability peer (tests/interop/strongswan/peer.py) and
tests/io/test_ike_sockets.py, so that they exercise the code the ``mipsec gw`` / ``mn`` daemons
run, not a runtime of their own:

* receiving: ``mipsec.io.transports.UdpReceiver`` on UDP 500 and 4500, which rebuild each
  datagram into a whole IPv4 + UDP packet (the daemons' "ike" and "ike-esp-udp" receivers);
* IKE: ``mipsec.node.ike.RoleIke``, the roles' glue: ``is_ike`` tells IKE (and NAT keepalives)
  from ESP in UDP, ``receive`` feeds the endpoint, ``run`` turns each ``SendDatagram`` into a
  complete IPv4 + UDP packet;
* sending: ``mipsec.io.transports.RawSender`` (the daemons' raw socket), IKE and ESP alike;
* child SAs: ``mipsec.ike.book.ChildSaBook``, the bookkeeping the MN and the GW use; outputs
  are carried out in order, so a re-key's new inbound SA exists before the answer leaves.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterable

from mipsec.constants import IKE_PORT, NAT_T_PORT
from mipsec.errors import ParseError
from mipsec.ike.book import Change, ChildSaBook
from mipsec.ike.config import IkeConfig
from mipsec.ike.events import SendDatagram
from mipsec.io import transports
from mipsec.node.ike import RoleIke
from mipsec.node.packet import peek_ipv4


class IkeSockets:
    def __init__(self, config: IkeConfig, address: str, *, book: ChildSaBook | None = None,
                 on_event: Callable[[object, list[Change]], None] | None = None,
                 on_esp: Callable[[bytes], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.ike = RoleIke(config)
        self.endpoint = self.ike.endpoint
        self.book = book if book is not None else ChildSaBook()
        self.on_event = on_event or (lambda event, changes: None)
        self.on_esp = on_esp or (lambda packet: None)
        self.clock = clock
        self.events: list = []
        self.sender = transports.RawSender()
        self.address = address
        self.receivers: list[transports.UdpReceiver] = []
        self._open(address)

    def _open(self, address: str) -> None:
        self.receivers = [transports.UdpReceiver(IKE_PORT, address, name="ike")]
        self.receivers.append(transports.UdpReceiver(NAT_T_PORT, address, name="ike-esp-udp",
                                                     udp_checksum=False))

    def close(self) -> None:
        for r in self.receivers:
            r.close()
        self.receivers = []
        self.sender.close()

    def rebind(self, address: str) -> None:
        """Our address moved (MOBIKE): the receivers move with it."""
        for r in self.receivers:
            r.close()
        self.address = address
        self._open(address)

    def now(self) -> float:
        return self.clock()

    def initiate(self, remote: tuple[str, int]) -> None:
        self.run(self.endpoint.initiate((self.address, IKE_PORT), remote, self.now()))

    def run(self, outputs: list) -> None:
        """Carry out the endpoint's (or an IKE SA's) outputs, in order."""
        for out in outputs:
            if out.__class__ is SendDatagram:
                for action in RoleIke.run([out])[0]:
                    self.sender.send(action.packet)
            else:
                self.events.append(out)
                self.on_event(out, self.book.apply(out, self.now()))

    def send_esp(self, packet: bytes) -> None:
        """An ESP packet ``SecurityAssociation.encapsulate`` made (raw or in UDP 4500)."""
        self.sender.send(packet)

    def get_timer(self) -> float | None:
        times = [t for t in (self.ike.get_timer(), self.book.get_timer()) if t is not None]
        return min(times) if times else None

    def poll(self, timeout: float, extra: Iterable = ()) -> list:
        """Wait at most ``timeout`` seconds (less if a timer is due); handle what arrived and
        what is due.  Returns those of ``extra`` (file objects / fds) that are readable."""
        t = self.get_timer()
        wait = timeout if t is None else max(0.0, min(timeout, t - self.now()))
        readable, _, _ = select.select(list(self.receivers) + list(extra), [], [], wait)
        for r in readable:
            if r in self.receivers:
                for packet in r.receive():
                    self._packet(packet)
        now = self.now()
        self.book.expire(now)
        t = self.ike.get_timer()
        if t is not None and now >= t:
            self.run(self.ike.handle_timer(now))
        return [r for r in readable if r not in self.receivers]

    def _packet(self, packet: bytes) -> None:
        proto, _src, _dst, ihl = peek_ipv4(packet)
        if RoleIke.is_ike(packet, proto, ihl):
            try:
                outputs = self.ike.receive(packet, self.now())
            except ParseError:
                return                           # bad UDP framing: nothing for the endpoint
            self.run(outputs)
        else:
            self.on_esp(packet)                  # ESP in UDP 4500 (RFC 3948)
