"""A small UDP runtime for ``mipsec.ike.endpoint.IkeEndpoint`` on ports 500 and 4500.

It owns the two sockets and the clock and nothing else: every datagram goes to the sans-I/O
endpoint, every ``SendDatagram`` it returns goes out of the socket bound to its local port, and
one timer is re-armed from ``get_timer()``.  Port 4500 is shared with UDP-encapsulated ESP
(RFC 3948): ESP datagrams (first four octets not zero) are handed to ``on_esp`` as the whole
outer IPv4 packet rebuilt from the UDP header and addresses, which is what
``SecurityAssociation.decapsulate`` takes; ``send_esp`` does the reverse for the packets
``SecurityAssociation.encapsulate`` makes.

Used by the strongSwan interoperability tests and meant for the daemons::

    adapter = IkeUdpAdapter(IkeEndpoint(config), "10.99.0.2", on_event=..., on_esp=...)
    adapter.initiate(("10.99.0.1", 500))
    while True:
        adapter.poll(1.0)
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterable

from mipsec.ike.constants import IKE_PORT, NAT_T_PORT
from mipsec.ike.endpoint import IkeEndpoint, classify_udp
from mipsec.ike.events import SendDatagram
from mipsec.wire.ipv4 import Ipv4Header, UdpHeader, build_ipv4, build_udp

Address = tuple[str, int]


class IkeUdpAdapter:
    def __init__(self, endpoint: IkeEndpoint, address: str, *,
                 on_event: Callable[[object], None] | None = None,
                 on_esp: Callable[[bytes], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.endpoint = endpoint
        self.address = address
        self.ports = (IKE_PORT, NAT_T_PORT)    # the core's marker rule assumes these two
        self.on_event = on_event or (lambda event: None)
        self.on_esp = on_esp or (lambda packet: None)
        self.clock = clock
        self.events: list = []
        self._socks: dict[int, socket.socket] = {}
        self._bind(address)

    def _bind(self, address: str) -> None:
        try:
            for p in self.ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, p))
                s.setblocking(False)
                self._socks[p] = s
        except OSError:
            self.close()
            raise

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()

    def __enter__(self) -> IkeUdpAdapter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rebind(self, address: str) -> None:
        """Move both sockets to a new local address (the MN got a new care-of address)."""
        self.close()
        self.address = address
        self._bind(address)

    # --- driving -----------------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock()

    def initiate(self, remote: Address):
        self._carry_out(self.endpoint.initiate((self.address, self.ports[0]), remote, self.now()))

    def run(self, outputs: list) -> None:
        """Carry out outputs the caller got from the endpoint or an IKE SA directly."""
        self._carry_out(outputs)

    def poll(self, timeout: float, extra: Iterable = ()) -> list:
        """Wait at most ``timeout`` seconds (less if a timer is due); handle what arrived and
        what is due.  Returns those of ``extra`` (file objects / fds) that are readable."""
        now = self.now()
        t = self.endpoint.get_timer()
        wait = timeout if t is None else max(0.0, min(timeout, t - now))
        socks = list(self._socks.values())
        readable, _, _ = select.select(socks + list(extra), [], [], wait)
        for s in readable:
            if s in socks:
                self._read(s)
        now = self.now()
        t = self.endpoint.get_timer()
        if t is not None and now >= t:
            self._carry_out(self.endpoint.handle_timer(now))
        return [r for r in readable if r not in socks]

    def _read(self, sock: socket.socket) -> None:
        local_port = sock.getsockname()[1]
        while True:
            try:
                data, remote = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return                                  # e.g. ICMP port unreachable: ignore
            if local_port != self.ports[0] and classify_udp(data) == "esp":
                self.on_esp(build_ipv4(
                    Ipv4Header(remote[0], self.address, 17),
                    build_udp(UdpHeader(remote[1], local_port), data)))
                continue
            self._carry_out(self.endpoint.receive_datagram(
                data, (self.address, local_port), (remote[0], remote[1]), self.now()))

    def _carry_out(self, outputs: list) -> None:
        for o in outputs:
            if isinstance(o, SendDatagram):
                sock = self._socks.get(o.local[1])
                if sock is None:
                    continue
                try:
                    sock.sendto(o.data, o.remote)
                except OSError:
                    pass                                # unreachable now; IKE retransmits
            else:
                self.events.append(o)
                self.on_event(o)

    def send_esp(self, outer_ipv4: bytes) -> None:
        """Send a UDP-encapsulated ESP packet made by ``SecurityAssociation.encapsulate`` from
        our port 4500 socket (the NAT mapping IKE keeps alive is the one ESP must use)."""
        ihl = (outer_ipv4[0] & 0x0F) * 4
        dst = socket.inet_ntoa(outer_ipv4[16:20])
        dport = int.from_bytes(outer_ipv4[ihl + 2:ihl + 4], "big")
        sport = int.from_bytes(outer_ipv4[ihl:ihl + 2], "big")
        sock = self._socks.get(sport) or self._socks[self.ports[1]]
        sock.sendto(outer_ipv4[ihl + 8:], (dst, dport))
