"""The SIU message (docs/protocol.md): framing vector, signing, and every refusal with its reason."""

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason
from mipsec.errors import ConfigError, ParseError
from mipsec.mip.constants import SIU_REPLAY_WINDOW
from mipsec.mip.security import ntp_from_unix
from mipsec.mip.siu import SiuSigner, SiuVerifier
from mipsec.wire.siu import (
    SIU_FIXED_BYTES,
    Siu,
    SiuFlags,
    SiuType,
    build_siu,
    build_siu_body,
    parse_siu,
)

HA = "10.1.0.2"
KEY = b"ha-gw-shared-key-0123456789abcdef"
RRP = bytes.fromhex("0300012c0a0100640a010002e9aa3b8000000000") + bytes.fromhex(
    "201400001000") + b"\x22" * 16
T0 = 1_790_000_000.0


def signer(**kw):
    return SiuSigner(HA, KEY, key_id=7, **kw)


def verifier():
    return SiuVerifier({HA: (7, KEY), "10.1.0.3": (1, b"another-ha-key-0123456789")})


def update(s, **kw):
    args = dict(home_address="10.1.0.100", old_care_of="172.16.1.10", new_care_of="172.16.2.10",
                gateway_spi=0xC0FFEE01, lifetime=300, rrp=RRP, wallclock=T0)
    args.update(kw)
    return s.build(SiuType.UPDATE, **args)


def test_vector_field_by_field():
    data = update(signer())
    expected_body = bytes.fromhex(
        "02" "01" "80" "07"              # version 2, UPDATE, flags F, key id 7
        "0a010002"                       # sender 10.1.0.2
        "0000000000000001"               # sequence 1
        + ntp_from_unix(T0).to_bytes(8, "big").hex() +
        "0a010064" "ac10010a" "ac10020a" # home, old CoA, new CoA
        "c0ffee01" "012c"                # gateway SPI, lifetime 300
        + len(RRP).to_bytes(2, "big").hex()
        + "0000000000000000") + RRP      # gateway epoch 0: not known yet
    assert data[:-32] == expected_body
    assert len(expected_body) == SIU_FIXED_BYTES + len(RRP)
    assert data[-32:] == hmac.new(KEY, expected_body, hashlib.sha256).digest()


def test_round_trip_and_fields():
    siu = verifier().verify(HA, update(signer()))
    assert (siu.type, siu.sender, siu.sequence, siu.home_address, siu.old_care_of,
            siu.new_care_of, siu.gateway_spi, siu.lifetime, siu.rrp, siu.flags) == (
        SiuType.UPDATE, HA, 1, "10.1.0.100", "172.16.1.10", "172.16.2.10", 0xC0FFEE01, 300,
        RRP, SiuFlags.FORWARD_RRP)
    assert build_siu(parse_siu(update(signer()))) == update(signer())


def test_deregistration():
    s = signer()
    data = s.build(SiuType.DEREGISTER, home_address="10.1.0.100", old_care_of="172.16.2.10",
                   new_care_of="0.0.0.0", gateway_spi=1, lifetime=0, rrp=RRP, wallclock=T0,
                   forward_rrp=False)
    siu = verifier().verify(HA, data)
    assert siu.type is SiuType.DEREGISTER and siu.new_care_of == "0.0.0.0"
    assert siu.flags == SiuFlags(0)
    with pytest.raises(ValueError):
        s.build(SiuType.DEREGISTER, home_address="10.1.0.100", old_care_of="172.16.2.10",
                new_care_of="172.16.1.10", gateway_spi=1, lifetime=0, wallclock=T0)


def test_sequence_increases_and_replays_are_refused():
    s, v = signer(), verifier()
    first, second = update(s), update(s, old_care_of="172.16.2.10", new_care_of="172.16.1.10")
    v.verify(HA, first)
    v.verify(HA, second)
    for old in (first, second):
        with pytest.raises(ParseError) as info:
            v.verify(HA, old)
        assert info.value.reason is DropReason.SIU_REPLAYED


def test_reordered_siu_is_accepted_once_inside_the_window():
    # SIUs for many MNs overtake each other on the home link: a replay window, not "greater
    # than the last"; each number is still accepted once, and one left of the window never
    s, v = signer(), verifier()
    first, second = update(s), update(s)
    assert v.verify(HA, second).sequence == 2
    assert v.verify(HA, first).sequence == 1
    for again in (first, second):
        with pytest.raises(ParseError) as info:
            v.verify(HA, again)
        assert info.value.reason is DropReason.SIU_REPLAYED


def test_siu_left_of_the_window_is_refused():
    s, v = signer(), verifier()
    old = update(s)
    s.next_sequence += SIU_REPLAY_WINDOW
    v.verify(HA, update(s))
    with pytest.raises(ParseError) as info:
        v.verify(HA, old)
    assert info.value.reason is DropReason.SIU_REPLAYED


def test_floor_refuses_numbers_from_before_a_restart():
    s = signer(first_sequence=1000)
    v = SiuVerifier({HA: (7, KEY)}, floor=1001)
    with pytest.raises(ParseError) as info:
        v.verify(HA, update(s))
    assert info.value.reason is DropReason.SIU_REPLAYED
    assert v.verify(HA, update(s)).sequence == 1001


def test_epoch_check():
    s, v = signer(first_sequence=500), verifier()
    # epoch 0 ("not known yet") is fresh only in an SIU built after the GW started
    siu = v.authenticate(HA, update(s))
    start = ntp_from_unix(T0)
    assert v.freshness(siu, epoch=77, unknown_epoch_floor=start) is None
    assert v.freshness(siu, epoch=77, unknown_epoch_floor=start + 1) is DropReason.SIU_STALE_EPOCH
    assert v.freshness(v.authenticate(HA, update(s, gateway_epoch=77)), epoch=77) is None
    stale = v.authenticate(HA, update(s, gateway_epoch=76))
    assert v.freshness(stale, epoch=77) is DropReason.SIU_STALE_EPOCH
    # freshness changes nothing; accept records the number
    assert v.last_sequence == {}
    v.accept(stale)
    assert v.freshness(stale, epoch=76) is DropReason.SIU_REPLAYED


def test_unknown_sender_and_spoofed_sender_field():
    data = update(signer())
    with pytest.raises(ParseError) as info:
        verifier().verify("10.1.0.99", data)
    assert info.value.reason is DropReason.SIU_UNKNOWN_SENDER
    # a configured HA that claims to be another one
    with pytest.raises(ParseError) as info:
        verifier().verify("10.1.0.3", data)
    assert info.value.reason is DropReason.SIU_UNKNOWN_SENDER


def test_other_has_key_does_not_authenticate():
    forged = SiuSigner(HA, b"another-ha-key-0123456789", key_id=7)
    with pytest.raises(ParseError) as info:
        verifier().verify(HA, update(forged))
    assert info.value.reason is DropReason.SIU_AUTH_FAILED


def test_wrong_key_id():
    with pytest.raises(ParseError) as info:
        verifier().verify(HA, update(SiuSigner(HA, KEY, key_id=8)))
    assert info.value.reason is DropReason.SIU_AUTH_FAILED


def test_every_byte_flipped_is_refused_with_a_specific_reason():
    data = update(signer())
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(ParseError) as info:
            verifier().verify(HA, bytes(bad))
        if i == 0 or i == 1 or i == 2:                           # version, type, flags
            assert info.value.reason is DropReason.MALFORMED, i
        elif 4 <= i < 8:                                          # sender field
            assert info.value.reason is DropReason.SIU_UNKNOWN_SENDER, i
        elif i in (42, 43):                                       # RRP length
            assert info.value.reason in (DropReason.TRUNCATED, DropReason.MALFORMED), i
        else:
            assert info.value.reason is DropReason.SIU_AUTH_FAILED, i


def test_failed_siu_does_not_move_replay_state():
    s, v = signer(), verifier()
    legit = update(s)
    forged = bytearray(update(s))
    forged[-1] ^= 0xFF
    with pytest.raises(ParseError):
        v.verify(HA, bytes(forged))
    assert v.last_sequence == {}
    assert v.verify(HA, legit).sequence == 1


def test_truncated_at_every_length():
    data = update(signer())
    for n in range(len(data)):
        with pytest.raises(ParseError) as info:
            verifier().verify(HA, data[:n])
        assert info.value.reason is DropReason.TRUNCATED, n


def test_trailing_bytes_are_malformed():
    with pytest.raises(ParseError) as info:
        verifier().verify(HA, update(signer()) + b"\0")
    assert info.value.reason is DropReason.MALFORMED


def test_unknown_type_and_version():
    body = build_siu_body(Siu(SiuType.ACK, HA, 5, 0, "10.1.0.100", "0.0.0.0", "0.0.0.0", 0, 0))
    for offset, value in ((0, 1), (0, 3), (1, 9)):    # version 1 had no Gateway Epoch
        bad = bytearray(body + b"\0" * 32)
        bad[offset] = value
        with pytest.raises(ParseError) as info:
            parse_siu(bytes(bad))
        assert info.value.reason is DropReason.MALFORMED


def test_first_sequence_for_restart_safety():
    s = signer(first_sequence=ntp_from_unix(T0))
    assert verifier().verify(HA, update(s)).sequence == ntp_from_unix(T0)


def test_keys_are_checked_at_configuration():
    with pytest.raises(ConfigError, match="10.1.0.2"):
        SiuSigner(HA, b"short")
    with pytest.raises(ConfigError, match="10.1.0.9"):
        SiuVerifier({"10.1.0.9": (1, b"short")})
    with pytest.raises(ConfigError):
        SiuVerifier({"10.1.0.9": (300, KEY)})


def test_ack_round_trip_at_the_ha():
    ha_signer, gw_signer = signer(), SiuSigner("10.1.0.1", KEY, key_id=7)
    applied = verifier().verify(HA, update(ha_signer))
    ack = gw_signer.build_ack(applied, sa_remote="172.16.2.10", wallclock=T0)
    ha_side = SiuVerifier({"10.1.0.1": (7, KEY)})
    got = ha_side.verify("10.1.0.1", ack)
    assert (got.type, got.sequence, got.new_care_of, got.rrp) == (
        SiuType.ACK, applied.sequence, "172.16.2.10", b"")
    assert gw_signer.next_sequence == 1
    with pytest.raises(ParseError) as info:
        ha_side.verify("10.1.0.1", ack)
    assert info.value.reason is DropReason.SIU_REPLAYED


def test_reject_type_frames():
    data = signer().build(SiuType.REJECT, home_address="10.1.0.100", old_care_of="172.16.1.10",
                          new_care_of="172.16.2.10", gateway_spi=1, lifetime=0, rrp=RRP,
                          wallclock=T0)
    assert verifier().verify(HA, data).type is SiuType.REJECT


def test_diagram_in_docs_matches_the_construct_offsets():
    import pathlib
    import re

    from mipsec.wire.siu import SIU_HEADER

    offsets, pos = {}, 0
    for sub in SIU_HEADER.subcons:
        offsets[sub.name] = pos
        if sub.name != "rrp":
            pos += sub.sizeof()
    row_starts = sorted({offsets[n] for n in offsets if offsets[n] % 4 == 0})
    doc = (pathlib.Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    diagram = doc.split("```")[1]
    numbers = [int(m) for m in re.findall(r"\|\s+(\d+)\s*$", diagram, re.M)]
    assert numbers == row_starts == [0, 4, 8, 16, 24, 28, 32, 36, 40, 44, 52]
    assert offsets["rrp_length"] == 42 and offsets["gateway_epoch"] == 44
    assert offsets["rrp"] == SIU_FIXED_BYTES



@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=200), st.integers(0, 200), st.binary(max_size=4))
def test_random_and_spliced_input_only_raises_parse_error(noise, cut, patch):
    base = update(signer())
    spliced = base[:cut] + patch + base[cut + len(patch):]
    v = verifier()
    for data in (noise, spliced, base[:8] + noise):
        try:
            v.verify(HA, data)
        except ParseError:
            pass


def test_key_change_with_two_keys_per_ha():
    new_key = b"the-next-ha-gw-key-0123456789abc"
    v = SiuVerifier({HA: [(7, KEY), (8, new_key)]})
    assert v.verify(HA, update(signer())).key_id == 7
    assert v.verify(HA, update(SiuSigner(HA, new_key, key_id=8, first_sequence=2))).key_id == 8
    # the key id selects the key: the right id with the other key's tag does not verify
    with pytest.raises(ParseError) as info:
        v.verify(HA, update(SiuSigner(HA, KEY, key_id=8, first_sequence=3)))
    assert info.value.reason is DropReason.SIU_AUTH_FAILED
    with pytest.raises(ConfigError, match="twice"):
        SiuVerifier({HA: [(7, KEY), (7, new_key)]})
