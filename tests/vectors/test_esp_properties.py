"""Hypothesis properties of the SA: any inner packet through any transform comes back intact,
any delivery order inside the window is accepted once, and arbitrary or mutated input only
ever raises ``Dropped`` (never another exception) and never moves the window unless the packet
is genuine."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.errors import Dropped
from mipsec.ipsec.sa import Direction, SecurityAssociation, UdpEncap
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4

TRANSFORMS = [
    ("ENCR_AES_CBC", 16, "AUTH_HMAC_SHA1_96", 20),
    ("ENCR_AES_CBC", 24, "AUTH_HMAC_SHA2_384_192", 48),
    ("ENCR_AES_CBC", 32, "AUTH_HMAC_SHA2_256_128", 32),
    ("ENCR_AES_GCM_16", 20, None, 0),
    ("ENCR_AES_GCM_16", 36, None, 0),
    ("ENCR_CHACHA20_POLY1305", 36, None, 0),
    ("ENCR_NULL", 0, "AUTH_HMAC_SHA2_512_256", 64),
]

configs = st.tuples(st.sampled_from(TRANSFORMS), st.booleans(), st.booleans())
addresses = st.integers(0, 2**32 - 1).map(lambda v: ".".join(str(b) for b in v.to_bytes(4, "big")))
inner_packets = st.builds(
    lambda src, dst, proto, tos, ident, df, ttl, payload: build_ipv4(
        Ipv4Header(src, dst, proto, tos=tos, identification=ident, dont_fragment=df, ttl=ttl),
        payload),
    addresses, addresses, st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF),
    st.booleans(), st.integers(1, 255), st.binary(max_size=1500))


def make_pair(config):
    (enc, ek, integ, ik), esn, udp = config
    keys = dict(encryption=enc, encryption_key=os.urandom(ek), integrity=integ,
                integrity_key=os.urandom(ik), esn=esn, udp_encap=UdpEncap() if udp else None)
    out = SecurityAssociation(spi=0x4242, direction=Direction.OUTBOUND, local="172.16.2.10",
                              remote="172.16.0.1", **keys)
    inb = SecurityAssociation(spi=0x4242, direction=Direction.INBOUND, local="172.16.0.1",
                              remote=None, replay_window=64, **keys)
    return out, inb


SETTINGS = settings(max_examples=examples(150), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(configs, st.lists(inner_packets, min_size=1, max_size=4))
def test_round_trip(config, packets):
    out, inb = make_pair(config)
    for packet in packets:
        assert inb.decapsulate(out.encapsulate(packet)) == packet
    assert inb.counters.packets == len(packets)
    assert inb.counters.octets == sum(map(len, packets))


@SETTINGS
@given(configs, st.permutations(range(12)), st.integers(0, 2**32 - 20))
def test_any_order_within_the_window_is_accepted_exactly_once(config, order, start):
    out, inb = make_pair(config)
    out.sequence = start                    # continue an SA that has been in use
    if start:
        inb.replay.update(start)
    body = build_ipv4(Ipv4Header("10.1.0.10", "10.1.0.100", 17), b"p")
    packets = [out.encapsulate(body) for _ in range(12)]
    for i in order:
        assert inb.decapsulate(packets[i]) == body
    for p in packets:
        try:
            inb.decapsulate(p)
            raise AssertionError("a replay was accepted")
        except Dropped as drop:
            assert drop.reason.value == "replayed"


@SETTINGS
@given(configs, st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_drop(config, junk):
    _, inb = make_pair(config)
    try:
        inb.decapsulate(junk)
    except Dropped:
        pass
    else:
        raise AssertionError("random bytes authenticated")
    assert inb.replay.snapshot() == (0, 0) and inb.counters.packets == 0


@SETTINGS
@given(configs, inner_packets, st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)),
                                        min_size=1, max_size=4), st.integers(0, 10_000))
def test_mutations_only_ever_drop_or_return_the_same_inner_packet(config, packet, flips, cut):
    out, inb = make_pair(config)
    genuine = out.encapsulate(packet)
    bad = bytearray(genuine)
    for where, mask in flips:
        bad[where % len(bad)] ^= mask
    if cut % 3 == 0:
        bad = bad[: cut % len(bad)]
    try:
        result = inb.decapsulate(bytes(bad))
    except Dropped:
        assert inb.replay.top == 0
        assert inb.decapsulate(genuine) == packet
    else:
        # only unprotected outer fields (TOS, identification, TTL, UDP source port...) changed
        assert result == packet
