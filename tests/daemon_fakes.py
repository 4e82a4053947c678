"""Three real ``Daemon`` objects (HA, GW, MN) around the real roles on in-memory TUN and net
fakes, and ``pump``, which runs their loops and carries packets between them by destination
address: the daemon glue without root, shared by the daemon, log and metrics tests."""

from __future__ import annotations

import socket

from mipsec.io.daemon import Daemon
from mipsec.io.transports import FakeNet
from mipsec.io.tun import FakeTun


def start_daemons(configs) -> dict:
    """Start one daemon per configuration of ``configs`` (name -> config, "ha", "gw", "mn")."""
    out = {}
    for name in ("ha", "gw", "mn"):
        cfg = configs[name]
        net = FakeNet(name)
        # the GW's SIU socket on its inside interface: its datagrams go to receive_siu
        inside = [FakeNet("gw-inside", role_entry="receive_siu")] if name == "gw" else []
        d = Daemon(cfg, tun=FakeTun(cfg.daemon.tun), sender=net, receivers=[net, *inside],
                   manage_kernel=False)
        d.start()
        out[name] = d
    return out


def close_daemons(daemons: dict) -> None:
    for d in daemons.values():
        d.close()
        d.sender.close()


def pump(daemons: dict, rounds: int = 40) -> None:
    """Run every loop and carry packets between them by destination address, until nothing
    moves (at most ``rounds`` rounds)."""
    gw = daemons["gw"].cfg.node
    where = {gw.outside_address: "gw", gw.inside_address: "gw",
             daemons["ha"].cfg.node.address: "ha"}
    for _ in range(rounds):
        moved = False
        for name, d in daemons.items():
            d.loop.run_once(max_wait=0.0)
            packets = [p for p, _ in d.sender.sent]
            d.sender.sent.clear()
            if name == "gw":                       # the GW's tun side is the home network
                packets += d.tun.written
                d.tun.written.clear()
            for packet in packets:
                dst = socket.inet_ntoa(packet[16:20])
                if dst == gw.inside_address:          # from the home side: the SIU socket
                    daemons["gw"].receivers[1].inject(packet)
                else:
                    daemons[where.get(dst, "mn")].sender.inject(packet)
                moved = True
        if not moved:
            break
