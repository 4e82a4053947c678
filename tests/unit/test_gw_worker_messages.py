"""The control <-> worker messages of a GW with worker processes: every message type survives
the codec unchanged, and anything else (truncated, unknown, extra bytes) is a ParseError."""

from __future__ import annotations

import random

import pytest

from mipsec.errors import Dropped, ParseError
from mipsec.ipsec.sa import Direction, Lifetime, SecurityAssociation, UdpEncap
from mipsec.ipsec.selector import Selector
from mipsec.node import gw_worker_messages as wm
from mipsec.node.gateway_worker import sa_from_spec, sa_spec

SPEC = wm.SaSpec(spi=0x1234, direction="outbound", encryption="ENCR_AES_GCM_16",
                 encryption_key="00" * 20, integrity=None, integrity_key="", local="172.16.0.1",
                 remote="172.16.1.10", esn=False, replay_window=1024, udp_local_port=4500,
                 udp_remote_port=31000, selector=("10.1.0.0/24", None, 17, None, (1, 2)),
                 lifetime=(10.0, 20.0, None, 1000), created=1.5, sequence=7, replay_top=0)

MESSAGES = [
    wm.InstallPair("10.1.0.100", "10.1.0.2", ("10.1.0.0/24",), False, SPEC, SPEC),
    wm.AddInbound("10.1.0.100", SPEC), wm.SetOutbound("10.1.0.100", SPEC),
    wm.RemoveInbound(0xFFFFFFFF), wm.RemoveMobile("10.1.0.100"),
    wm.Bind("10.1.0.100", "bound", "172.16.1.10", "172.16.1.10", None),
    wm.Bind("10.1.0.100", "fresh", None, "0.0.0.0", 4500),
    wm.Owner("10.1.0.100", 1), wm.Owner("10.1.0.100", -1),
    wm.SendInner("10.1.0.100", b"\x45" + bytes(40)),
    wm.SendInner("10.1.0.100", b"", "172.16.2.10", 4501),
    wm.RrqSeen(0x1234, "172.16.1.10", None, bytes(range(60))),
    wm.RrqSeen(0x1234, "172.16.1.10", 4500, b""),
    wm.Report(1, {"drops": {"no-sa": 2}, "inbound_spis": ["0x00001234"]}),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert wm.decode(wm.encode(msg)) == msg


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_truncated_records_are_parse_errors(msg):
    record = wm.encode(msg)
    carries = hasattr(msg, "packet")
    for cut in range(len(record)):
        if carries and cut >= len(record) - len(msg.packet):
            continue           # a shorter packet is another valid message
        with pytest.raises(ParseError):
            wm.decode(record[:cut])


def test_unknown_type_trailing_bytes_and_wrong_fields_are_parse_errors():
    record = wm.encode(wm.RemoveInbound(5))
    with pytest.raises(ParseError):
        wm.decode(bytes([99]) + record[1:])
    with pytest.raises(ParseError):
        wm.decode(record + b"x")
    with pytest.raises(ParseError):            # RemoveMobile's fields under RemoveInbound's type
        wm.decode(bytes([wm.RemoveInbound.TYPE]) + wm.encode(wm.RemoveMobile("a"))[1:])
    with pytest.raises(ParseError):
        wm.decode(record[:3] + b"[" + record[4:])
    rng = random.Random(3)
    for _ in range(500):                       # random records: ParseError or a message
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        try:
            wm.decode(junk)
        except ParseError:
            pass


def test_an_sa_rebuilt_from_its_spec_continues_where_the_original_is():
    """The worker's copy: same keys (it decrypts what the original encrypts), the sequence
    number and the replay top carried over, selector and lifetime too."""
    key = bytes(range(20))
    out = SecurityAssociation(spi=0x2000, direction=Direction.OUTBOUND, encryption="ENCR_AES_GCM_16",
                              encryption_key=key, local="172.16.0.1", remote="172.16.1.10",
                              udp_encap=UdpEncap(4500, 4501), selector=Selector("10.1.0.0/24"),
                              lifetime=Lifetime(hard_seconds=100.0), now=3.0)
    inbound = SecurityAssociation(spi=0x2000, direction=Direction.INBOUND,
                                  encryption="ENCR_AES_GCM_16", encryption_key=key,
                                  local="172.16.1.10", remote=None,
                                  udp_encap=UdpEncap(4501, 4500))
    inner = bytes.fromhex("4500001c0000000040110000") + bytes([10, 1, 0, 5, 10, 1, 0, 6]) + \
        bytes(8)
    out.encapsulate(inner, 4.0)
    copy = sa_from_spec(wm.decode(wm.encode(wm.SetOutbound("h", sa_spec(out)))).sa)
    assert copy.sequence == 1 and copy.udp_encap == out.udp_encap
    assert copy.selector == out.selector and copy.lifetime == out.lifetime
    assert copy.created == 3.0 and copy.remote == out.remote
    packet = copy.encapsulate(inner, 4.0)
    assert int.from_bytes(packet[32:36], "big") == 2          # after the original's 1
    assert inbound.decapsulate(packet, 4.0)[:20] == inner[:20]
    with pytest.raises(Dropped):          # the original's next number, 2, is a replay now
        inbound.decapsulate(out.encapsulate(inner, 4.0), 4.0)
    twin = sa_from_spec(sa_spec(inbound))
    assert twin.replay.top == inbound.replay.top == 2
