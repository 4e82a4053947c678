"""SecurityAssociation behaviour: framing, sequence numbers, exhaustion, lifetimes, rebind,
selectors, NAT-T recognition, counters, status output."""

from __future__ import annotations

import json
import os

import pytest

from mipsec.drops import DropReason
from mipsec.errors import ConfigError, Dropped, SaExhausted, UsageError
from mipsec.ipsec.constants import SEQ_MAX_32
from mipsec.ipsec.sa import Direction, Lifetime, SecurityAssociation, UdpEncap, esp_sa_uat_record
from mipsec.ipsec.selector import Selector
from mipsec.wire.esp import build_trailer
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4, checksum, parse_ipv4, parse_udp

GW, COA_A, COA_B = "172.16.0.1", "172.16.1.10", "172.16.2.10"
HOME, CN = "10.1.0.100", "10.1.0.10"

TRANSFORMS = {
    "cbc-sha1": ("ENCR_AES_CBC", 16, "AUTH_HMAC_SHA1_96", 20),
    "cbc256-sha512": ("ENCR_AES_CBC", 32, "AUTH_HMAC_SHA2_512_256", 64),
    "gcm128": ("ENCR_AES_GCM_16", 20, None, 0),
    "gcm256": ("ENCR_AES_GCM_16", 36, None, 0),
    "chacha": ("ENCR_CHACHA20_POLY1305", 36, None, 0),
    "null-sha256": ("ENCR_NULL", 0, "AUTH_HMAC_SHA2_256_128", 32),
}


def inner(payload: bytes = b"hello mipsec", src: str = HOME, dst: str = CN, *,
          df: bool = True, tos: int = 0) -> bytes:
    udp = (1234).to_bytes(2, "big") + (5678).to_bytes(2, "big") \
        + (8 + len(payload)).to_bytes(2, "big") + b"\x00\x00" + payload
    return build_ipv4(Ipv4Header(src, dst, 17, dont_fragment=df, tos=tos, ttl=63), udp)


def pair(name: str = "gcm128", *, esn: bool = False, udp: UdpEncap | None = None,
         in_remote: str | None = COA_A, **kw) -> tuple[SecurityAssociation, SecurityAssociation]:
    enc, ek, integ, ik = TRANSFORMS[name]
    keys = dict(encryption=enc, encryption_key=os.urandom(ek), integrity=integ,
                integrity_key=os.urandom(ik), esn=esn, udp_encap=udp)
    out = SecurityAssociation(spi=0x1001, direction=Direction.OUTBOUND, local=COA_A,
                              remote=GW, **keys, **kw.get("out", {}))
    inb = SecurityAssociation(spi=0x1001, direction=Direction.INBOUND, local=GW,
                              remote=in_remote, **keys, **kw.get("in_", {}))
    return out, inb


def drop_reason(sa: SecurityAssociation, packet: bytes, now: float = 0.0) -> DropReason:
    with pytest.raises(Dropped) as info:
        sa.decapsulate(packet, now)
    return info.value.reason


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize("udp", [None, UdpEncap()])
def test_round_trip_and_outer_header(name, esn, udp):
    out, inb = pair(name, esn=esn, udp=udp)
    for i in range(1, 4):
        packet = out.encapsulate(inner(b"x" * (i * 7), tos=0xB8))
        header, payload = parse_ipv4(packet)          # also checks the header checksum
        assert (header.source, header.destination, header.ttl) == (COA_A, GW, 64)
        assert header.dont_fragment and header.tos == 0xB8    # copied from the inner header
        if udp is None:
            assert header.protocol == 50
            esp = payload
        else:
            assert header.protocol == 17
            uh, esp = parse_udp(payload)
            assert (uh.source_port, uh.destination_port, uh.checksum) == (4500, 4500, 0)
        assert int.from_bytes(esp[:4], "big") == 0x1001
        assert int.from_bytes(esp[4:8], "big") == i               # RFC 4303 §3.3.3: from 1
        assert inb.decapsulate(packet) == inner(b"x" * (i * 7), tos=0xB8)
    assert out.counters.packets == inb.counters.packets == 3
    assert out.counters.octets == inb.counters.octets
    assert inb.counters.last_authenticated_source == COA_A


def test_df_is_copied_and_identification_counts():
    out, inb = pair()
    a = parse_ipv4(out.encapsulate(inner(df=False)))[0]
    b = parse_ipv4(out.encapsulate(inner(df=True)))[0]
    assert not a.dont_fragment and b.dont_fragment
    assert b.identification == (a.identification + 1) & 0xFFFF


def test_aead_iv_is_the_sequence_number():
    out, _ = pair("gcm128")
    esp = parse_ipv4(out.encapsulate(inner()))[1]
    assert esp[8:16] == (1).to_bytes(8, "big")
    out, _ = pair("chacha", esn=True)
    out.sequence = 0x1_2345_6788
    esp = parse_ipv4(out.encapsulate(inner()))[1]
    assert esp[4:8] == bytes.fromhex("23456789")                  # low half on the wire
    assert esp[8:16] == (0x1_2345_6789).to_bytes(8, "big")        # IV = 64-bit counter


# --- sequence number exhaustion (RFC 4303 §3.3.3) ---------------------------------------------
def test_32_bit_counter_refuses_to_wrap():
    out, inb = pair("cbc-sha1")
    out.sequence = SEQ_MAX_32 - 1
    last = out.encapsulate(inner())                      # 2**32 - 1 is the last number sent
    assert not out.needs_rekey
    with pytest.raises(SaExhausted):
        out.encapsulate(inner())
    assert out.needs_rekey and out.sequence == SEQ_MAX_32
    assert out.counters.drops == {DropReason.SA_EXHAUSTED: 1}
    with pytest.raises(SaExhausted):                     # and stays refused
        out.encapsulate(inner())
    inb.replay.update(SEQ_MAX_32 - 10)
    assert inb.decapsulate(last) == inner()


def test_esn_counter_goes_past_2_32_and_the_receiver_follows():
    out, inb = pair("cbc-sha1", esn=True)
    out.sequence = SEQ_MAX_32 - 2
    inb.replay.update(SEQ_MAX_32 - 3)                    # the receiver saw the earlier traffic
    packets = [out.encapsulate(inner(bytes([i]))) for i in range(5)]   # crosses 2**32
    for i in (0, 2, 1, 4, 3):                            # reordered across the wrap
        assert inb.decapsulate(packets[i]) == inner(bytes([i]))
    assert inb.replay.top == 2**32 + 2
    assert drop_reason(inb, packets[3]) is DropReason.REPLAYED


def test_esn_high_half_is_authenticated():
    """A receiver that guesses the wrong high half fails the ICV (RFC 4303 §2.2.1)."""
    out, inb = pair("gcm128", esn=True)
    out.sequence = 2**32 + 4
    packet = out.encapsulate(inner())
    assert drop_reason(inb, packet) is DropReason.ICV_MISMATCH   # receiver still in subspace 0
    assert inb.replay.top == 0


# --- lifetimes (RFC 4301 §4.4.2.1) --------------------------------------------------------------
def test_time_lifetimes_soft_then_hard_both_directions():
    life = Lifetime(soft_seconds=10, hard_seconds=20)
    out, inb = pair(out=dict(lifetime=life, now=100.0), in_=dict(lifetime=life, now=100.0))
    p = out.encapsulate(inner(), now=105.0)
    assert not out.needs_rekey
    p2 = out.encapsulate(inner(), now=110.0)
    assert out.needs_rekey and not out.expired
    assert inb.decapsulate(p, now=111.0) == inner()
    assert inb.needs_rekey and not inb.expired
    with pytest.raises(Dropped) as info:
        out.encapsulate(inner(), now=120.0)
    assert info.value.reason is DropReason.SA_EXPIRED and out.expired
    assert drop_reason(inb, p2, now=120.5) is DropReason.SA_EXPIRED
    assert inb.expired and inb.replay.top == 1
    assert inb.counters.drops == {DropReason.SA_EXPIRED: 1}


def test_byte_lifetimes():
    life = Lifetime(soft_bytes=100, hard_bytes=200)
    out, _ = pair(out=dict(lifetime=life))
    packet = inner(b"y" * 52)                               # 80 bytes
    out.encapsulate(packet)
    out.encapsulate(packet)                                 # 160 >= soft
    out.encapsulate(packet)                                 # checked before: 160 < 200, sent
    assert out.needs_rekey and out.counters.octets == 240
    with pytest.raises(Dropped):
        out.encapsulate(packet)
    assert out.expired


def test_poll_without_traffic():
    out, _ = pair(out=dict(lifetime=Lifetime(soft_seconds=5, hard_seconds=9)))
    out.poll(4.0)
    assert not out.needs_rekey
    out.poll(5.0)
    assert out.needs_rekey and not out.expired
    out.poll(9.0)
    assert out.expired and not out.counters.drops


@pytest.mark.parametrize("kw", [dict(soft_seconds=0), dict(hard_bytes=-1),
                                dict(soft_seconds=10, hard_seconds=5),
                                dict(soft_bytes=10, hard_bytes=5)])
def test_bad_lifetimes_are_config_errors(kw):
    with pytest.raises(ConfigError):
        Lifetime(**kw)


# --- rebind keeps keys, counter, window, nonce state --------------------------------------------
@pytest.mark.parametrize("name", ["gcm128", "chacha", "cbc-sha1"])
def test_rebind_keeps_state_and_never_reuses_a_nonce(name):
    out, inb = pair(name, in_remote=None)          # GW side: wildcard source
    ivs = set()
    for _ in range(3):
        p = out.encapsulate(inner())
        ivs.add(parse_ipv4(p)[1][8:16])
        inb.decapsulate(p)
    top, bitmap = inb.replay.snapshot()
    out.rebind(local=COA_B)
    inb.rebind()                                     # nothing to change: still accepted
    assert inb.replay.snapshot() == (top, bitmap)
    p = out.encapsulate(inner())
    header, esp = parse_ipv4(p)
    assert header.source == COA_B
    assert int.from_bytes(esp[4:8], "big") == 4       # the counter continued
    ivs.add(esp[8:16])
    assert len(ivs) == 4                              # no IV / nonce repeated
    assert inb.decapsulate(p) == inner()
    assert inb.counters.last_authenticated_source == COA_B


def test_rebind_inbound_fixed_peer():
    out, inb = pair("gcm128")
    out.rebind(local=COA_B)
    p = out.encapsulate(inner())
    assert drop_reason(inb, p) is DropReason.OUTER_SOURCE_MISMATCH
    inb.rebind(remote=COA_B)
    assert inb.decapsulate(p) == inner()
    with pytest.raises(UsageError):
        out.rebind(udp_encap=UdpEncap())


def test_rebind_udp_ports():
    out, inb = pair("gcm128", udp=UdpEncap())
    out.rebind(udp_encap=UdpEncap(4500, 31000))       # the peer now sits behind a NAT
    p = out.encapsulate(inner())
    assert parse_udp(parse_ipv4(p)[1])[0].destination_port == 31000
    # the NAT maps 31000 back to the peer's 4500 and gives the source a port of its own
    natted = p[:20] + (40123).to_bytes(2, "big") + (4500).to_bytes(2, "big") + p[24:]
    assert inb.decapsulate(natted) == inner()         # the source port is not checked


# --- selectors -----------------------------------------------------------------------------------
def test_outbound_selector_is_checked_before_encryption():
    out, inb = pair(out=dict(selector=Selector(local=HOME, remote="10.1.0.0/24")))
    with pytest.raises(Dropped) as info:
        out.encapsulate(inner(dst="8.8.8.8"))
    assert info.value.reason is DropReason.SELECTOR_MISMATCH
    with pytest.raises(Dropped):
        out.encapsulate(inner(src="10.1.0.101"))        # not the MN's home address
    assert out.sequence == 0 and out.counters.packets == 0     # no number was used up
    assert out.counters.drops == {DropReason.SELECTOR_MISMATCH: 2}
    assert inb.decapsulate(out.encapsulate(inner())) == inner()
    assert out.sequence == 1


def test_inbound_selector_mismatch_after_authentication():
    sel = Selector(local="10.1.0.0/24", remote=HOME)     # GW inbound: from the MN's home address
    out, inb = pair(in_=dict(selector=sel))
    assert inb.decapsulate(out.encapsulate(inner(src=HOME, dst=CN))) == inner(src=HOME, dst=CN)
    spoofed = out.encapsulate(inner(src="10.1.0.55", dst=CN))
    assert drop_reason(inb, spoofed) is DropReason.SELECTOR_MISMATCH
    assert inb.counters.packets == 1
    assert inb.counters.drops == {DropReason.SELECTOR_MISMATCH: 1}


class _DuckSelector:
    def __init__(self, answer):
        self.answer, self.seen = answer, []

    def matches_inbound(self, packet):
        self.seen.append(("in", packet))
        return self.answer

    def matches_outbound(self, packet):
        self.seen.append(("out", packet))
        return self.answer


def test_duck_typed_selector_sees_the_inner_packet():
    s = _DuckSelector(True)
    out, inb = pair(out=dict(selector=s), in_=dict(selector=s))
    inb.decapsulate(out.encapsulate(inner()))
    assert s.seen == [("out", inner()), ("in", inner())]


# --- NAT-T recognition (RFC 3948) -------------------------------------------------------------
def _udp_packet(payload: bytes, dport: int = 4500) -> bytes:
    udp = (4500).to_bytes(2, "big") + dport.to_bytes(2, "big") \
        + (8 + len(payload)).to_bytes(2, "big") + b"\x00\x00" + payload
    return build_ipv4(Ipv4Header(COA_A, GW, 17), udp)


def test_nat_keepalive_non_esp_marker_and_port():
    _, inb = pair(udp=UdpEncap())
    assert drop_reason(inb, _udp_packet(b"\xff")) is DropReason.NAT_KEEPALIVE
    assert drop_reason(inb, _udp_packet(b"\x00\x00\x00\x00" + b"ike" * 10)) \
        is DropReason.WRONG_PROTOCOL
    assert drop_reason(inb, _udp_packet(b"\x00" * 40, dport=4501)) is DropReason.WRONG_UDP_PORT
    raw_out, _ = pair()
    assert drop_reason(inb, raw_out.encapsulate(inner())) is DropReason.WRONG_PROTOCOL
    assert inb.replay.top == 0 and inb.counters.packets == 0


def test_raw_sa_refuses_udp():
    out, inb = pair(udp=None)
    udp_out, _ = pair(udp=UdpEncap())
    assert drop_reason(inb, udp_out.encapsulate(inner())) is DropReason.WRONG_PROTOCOL


# --- trailer handling with valid ICVs ------------------------------------------------------------
def _crafted(out: SecurityAssociation, plaintext: bytes) -> bytes:
    """An authentic packet from ``out``'s keys around an arbitrary ESP plaintext."""
    out.sequence += 1
    seq = out.sequence
    header = out.spi.to_bytes(4, "big") + seq.to_bytes(4, "big")
    esp = out.transform.seal(header, seq, b"", plaintext)
    return build_ipv4(Ipv4Header(COA_A, GW, 50), esp)


@pytest.mark.parametrize("name", ["cbc-sha1", "gcm128", "null-sha256"])
def test_trailer_errors_after_authentication(name):
    out, inb = pair(name)
    align = out.transform.align
    body = inner()
    good = body + build_trailer(len(body), align, 4)
    cases = [
        (body + build_trailer(len(body), align, 59), DropReason.DUMMY_PACKET),
        (body + build_trailer(len(body), align, 6), DropReason.BAD_NEXT_HEADER),
        (good[:-3] + bytes([good[-3] ^ 0x40]) + good[-2:] if good[-2] else None,
         DropReason.BAD_PADDING),
        (b"\x00" * (len(good) - 2) + bytes([len(good) - 1, 4]), DropReason.BAD_PADDING),
        (b"\x60" + body[1:] + build_trailer(len(body), align, 4), DropReason.MALFORMED),
    ]
    for plaintext, reason in cases:
        if plaintext is None:
            continue
        before = inb.replay.snapshot()
        assert drop_reason(inb, _crafted(out, plaintext)) is reason
        assert inb.replay.snapshot() == before
    assert inb.counters.packets == 0
    assert inb.decapsulate(_crafted(out, good)) == body


def test_tfc_padding_after_the_inner_packet_is_removed():
    out, inb = pair("gcm128")
    body = inner()
    tfc = body + b"\x00" * 13                          # RFC 4303 §2.4 TFC padding
    assert inb.decapsulate(_crafted(out, tfc + build_trailer(len(tfc), 4, 4))) == body


def test_malformed_inner_packets_are_not_encapsulated():
    out, _ = pair()
    for bad in (b"", b"\x45" * 10, b"\x60" + bytes(39)):
        with pytest.raises(Dropped) as info:
            out.encapsulate(bad)
        assert info.value.reason is DropReason.MALFORMED
    assert out.sequence == 0


# --- configuration errors and misuse ---------------------------------------------------------------
@pytest.mark.parametrize("kw, word", [
    (dict(spi=0), "spi"),
    (dict(encryption="ENCR_DES"), "ENCR_DES"),
    (dict(encryption_key=b"short"), "key"),
    (dict(integrity="AUTH_HMAC_SHA1_96", integrity_key=bytes(20)), "AEAD"),
    (dict(encryption="ENCR_AES_CBC", encryption_key=bytes(16)), "integrity"),
    (dict(encryption="ENCR_AES_CBC", encryption_key=bytes(16), integrity="AUTH_MD5",
          integrity_key=bytes(16)), "AUTH_MD5"),
    (dict(encryption="ENCR_NULL", encryption_key=b"", integrity="AUTH_HMAC_SHA1_96",
          integrity_key=bytes(19)), "integrity key"),
    (dict(remote=None), "remote"),
    (dict(local="10.0.0.300"), "10.0.0.300"),
    (dict(replay_window=16), "replay window"),
])
def test_config_errors_name_the_problem(kw, word):
    args = dict(spi=1000, direction=Direction.OUTBOUND, encryption="ENCR_AES_GCM_16",
                encryption_key=bytes(20), local=COA_A, remote=GW)
    args.update(kw)
    with pytest.raises(ConfigError) as info:
        SecurityAssociation(**args)
    assert word.lower() in str(info.value).lower()


def test_direction_misuse_is_a_usage_error():
    out, inb = pair()
    with pytest.raises(UsageError):
        out.decapsulate(b"")
    with pytest.raises(UsageError):
        inb.encapsulate(inner())


# --- status ----------------------------------------------------------------------------------------
def test_describe_is_json_and_has_no_keys():
    out, inb = pair("cbc-sha1", in_remote=None)
    inb.decapsulate(out.encapsulate(inner()))
    with pytest.raises(Dropped):
        inb.decapsulate(b"\x45")
    d = inb.describe()
    text = json.dumps(d)
    assert d["spi"] == "0x00001001" and d["remote"] == "*" and d["local"] == GW
    assert d["counters"]["drops"] == {"truncated": 1}
    assert d["counters"]["packets"] == 1
    assert d["counters"]["last_authenticated_source"] == COA_A
    assert inb._encryption_key.hex() not in text and inb._integrity_key.hex() not in text


def test_tshark_esp_sa_entry():
    out, inb = pair("cbc-sha1")
    e = out.tshark_esp_sa_entry()
    assert e[:4] == ["IPv4", COA_A, GW, "0x00001001"]
    assert e[4] == "AES-CBC [RFC3602]" and e[6] == "HMAC-SHA-1-96 [RFC2404]"
    assert e[5] == "0x" + out._encryption_key.hex() and e[7] == "0x" + out._integrity_key.hex()
    assert inb.tshark_esp_sa_entry()[1:3] == [COA_A, GW]      # src, dst of the packets
    g, _ = pair("gcm256")
    assert g.tshark_esp_sa_entry()[4:7] == ["AES-GCM with 16 octet ICV [RFC4106]",
                                            "0x" + g._encryption_key.hex(), "NULL"]
    c, _ = pair("chacha")
    with pytest.raises(UsageError):          # Wireshark 4.0 has no ChaCha20 for ESP
        c.tshark_esp_sa_entry()
    assert esp_sa_uat_record(e) == ",".join(f'"{f}"' for f in e)
    with pytest.raises(UsageError):
        esp_sa_uat_record(['a"b'])


def test_checksum_of_built_outer_headers_is_valid():
    out, _ = pair("cbc-sha1", udp=UdpEncap())
    for size in (0, 1, 15, 16, 17, 1400):
        p = out.encapsulate(inner(b"z" * size, tos=size & 0xFF, df=bool(size & 1)))
        assert checksum(p[:20]) == 0


def test_inlined_window_update_matches_the_replay_window():
    """decapsulate updates the window inline; it must agree with ReplayWindow.update."""
    from mipsec.ipsec.replay import ReplayWindow
    out, inb = pair("gcm128")
    model = ReplayWindow(inb.replay.size)
    packets = {}
    for seq in range(1, 3001):
        packets[seq] = out.encapsulate(inner())
    for seq in (1, 2, 3000, 1980, 1976, 2999, 1977, 1500, 3):
        expected = model.check(seq)
        if expected is None:
            assert inb.decapsulate(packets[seq]) == inner()
            model.update(seq)
        else:
            assert drop_reason(inb, packets[seq]) is expected
        assert inb.replay.snapshot() == model.snapshot()


def test_esn_at_the_very_end_of_the_number_space_only_drops():
    out, inb = pair("gcm128", esn=True)
    out.sequence = 2**64 - 3
    last = [out.encapsulate(inner()) for _ in range(2)]        # 2**64 - 2 and 2**64 - 1
    inb.replay.update(2**64 - 3)
    assert [inb.decapsulate(p) for p in last] == [inner(), inner()]
    assert drop_reason(inb, last[1]) is DropReason.REPLAYED
    # a low half far below the window: there is no next subspace to guess
    stale = out.transform.seal(out.spi.to_bytes(4, "big") + (7).to_bytes(4, "big"), 7,
                               b"", b"x" * 30)
    assert drop_reason(inb, build_ipv4(Ipv4Header(COA_A, GW, 50), stale)) \
        is DropReason.TOO_OLD
    with pytest.raises(SaExhausted):
        out.encapsulate(inner())


@pytest.mark.parametrize("name", ["cbc-sha1", "gcm128", "null-sha256"])
@pytest.mark.parametrize("udp", [None, UdpEncap()])
def test_largest_inner_packet_and_one_too_big(name, udp):
    out, inb = pair(name, udp=udp)
    biggest = out._max_inner
    packet = build_ipv4(Ipv4Header(HOME, CN, 17), bytes(biggest - 20))
    outer = out.encapsulate(packet)
    assert len(outer) <= 0xFFFF and inb.decapsulate(outer) == packet
    too_big = build_ipv4(Ipv4Header(HOME, CN, 17), bytes(biggest - 19))
    with pytest.raises(Dropped) as info:
        out.encapsulate(too_big)
    assert info.value.reason is DropReason.INNER_TOO_BIG
    assert out.sequence == 1


@pytest.mark.parametrize("ports", [(0, 4500), (4500, 65536), ("4500", 4500)])
def test_udp_encap_ports_are_validated(ports):
    with pytest.raises(ConfigError):
        UdpEncap(*ports)
