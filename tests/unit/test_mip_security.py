"""MN-HA authentication (RFC 5944 §3.5.1) and identification replay protection (§5.7)."""

import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason
from mipsec.errors import ConfigError, ParseError
from mipsec.mip.security import MobilitySecurityAssociation, ntp_from_unix, unix_from_ntp
from mipsec.wire.mip import (
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    build_registration_reply,
    build_registration_request,
    nai_extension,
    parse_registration_request,
)

KEY = bytes(range(16))
SPI = 0x1000
T0 = 1_790_000_000.25            # a wall clock in 2026, with a quarter second


def rrq_bytes(ident, extensions=()):
    return build_registration_request(RegistrationRequest(
        "10.1.0.100", "10.1.0.2", "172.16.1.10", ident, 300, RequestFlags.D | RequestFlags.T,
        tuple(extensions)))


def msa(**kw):
    return MobilitySecurityAssociation(SPI, KEY, **kw)


# --- authenticator vectors, computed independently with hmac/hashlib ---------------------------

def manual_rrq(ident):
    # The fixed part and an NAI extension, packed by hand from the RFC 5944 §3.3 figure
    return (struct.pack("!BBH4s4s4sQ", 1, 0x22, 300, bytes([10, 1, 0, 100]), bytes([10, 1, 0, 2]),
                        bytes([172, 16, 1, 10]), ident) + bytes([131, 3]) + b"mn1")


@pytest.mark.parametrize("algorithm,digest", [("hmac-md5", hashlib.md5),
                                              ("hmac-sha256", hashlib.sha256)])
def test_authenticator_covers_message_prior_extensions_and_type_length_spi(algorithm, digest):
    body = manual_rrq(0x0102030405060708)
    size = digest().digest_size
    ext_head = bytes([32, 4 + size]) + SPI.to_bytes(4, "big")
    expected = hmac.new(KEY, body + ext_head, digest).digest()
    signed = msa(algorithm=algorithm).sign(body)
    assert signed == body + ext_head + expected
    assert len(expected) == size


def test_fixed_hmac_md5_vector():
    # HMAC-MD5 of RFC 2104 with key 00..0f over the bytes below, computed with hashlib in this
    # test and pinned so that a change to framing or algorithm shows up as a diff.
    signed = msa().sign(manual_rrq(0x0102030405060708))
    covered = signed[:-16]
    assert covered.hex() == ("0122012c0a0100640a010002ac10010a0102030405060708"
                             "83036d6e31" "201400001000")
    assert signed[-16:] == hmac.new(KEY, covered, hashlib.md5).digest()


def test_verify_accepts_signed_and_returns_the_message():
    data = msa().sign(rrq_bytes(ntp_from_unix(T0), [nai_extension("mn1@example.net")]))
    msg = msa().verify(data)
    assert isinstance(msg, RegistrationRequest) and msg.nai == "mn1@example.net"


def test_verify_reply():
    rrp = build_registration_reply(RegistrationReply(ReplyCode.ACCEPTED, "10.1.0.100",
                                                     "10.1.0.2", 5, 300))
    assert msa().verify(msa().sign(rrp)).code is ReplyCode.ACCEPTED


def test_every_flipped_bit_of_the_covered_part_fails():
    data = msa().sign(rrq_bytes(ntp_from_unix(T0)))
    auth_at = len(data) - 16 - 6
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            with pytest.raises(ParseError) as info:
                msa().verify(bytes(bad))
            if i == 0:
                assert info.value.reason is DropReason.MALFORMED
            elif i in (auth_at, auth_at + 1):          # type / length of the auth extension
                assert info.value.reason in (DropReason.MIP_BAD_EXTENSION, DropReason.TRUNCATED,
                                             DropReason.MIP_NO_AUTH, DropReason.MIP_AUTH_FAILED)
            elif auth_at + 2 <= i < auth_at + 6:       # SPI
                assert info.value.reason is DropReason.MIP_UNKNOWN_SPI
            else:
                assert info.value.reason is DropReason.MIP_AUTH_FAILED, i


def test_missing_auth_wrong_key_wrong_algorithm():
    plain = rrq_bytes(ntp_from_unix(T0))
    with pytest.raises(ParseError) as info:
        msa().verify(plain)
    assert info.value.reason is DropReason.MIP_NO_AUTH
    other = MobilitySecurityAssociation(SPI, b"another-key-0123")
    with pytest.raises(ParseError) as info:
        msa().verify(other.sign(plain))
    assert info.value.reason is DropReason.MIP_AUTH_FAILED
    with pytest.raises(ParseError) as info:
        msa().verify(msa(algorithm="hmac-sha256").sign(plain))
    assert info.value.reason is DropReason.MIP_AUTH_FAILED


def test_extensions_after_the_mn_ha_auth_are_not_covered():
    # RFC 5944 §3.6.1.3: an FA may append MN-FA / FA-HA extensions after the MN-HA one
    data = msa().sign(rrq_bytes(ntp_from_unix(T0)))
    assert msa().verify(data + bytes.fromhex("21 08 00000101 aabbccdd")).mn_ha_auth.spi == SPI


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="reserved"):
        MobilitySecurityAssociation(255, KEY)
    with pytest.raises(ConfigError, match="algorithm"):
        MobilitySecurityAssociation(SPI, KEY, algorithm="md5-prefix-suffix")
    with pytest.raises(ConfigError, match="replay"):
        MobilitySecurityAssociation(SPI, KEY, replay="none")
    assert "key" not in repr(msa()).replace("MobilitySecurityAssociation", "")


# --- NTP identification and replay (RFC 5944 §5.7) ---------------------------------------------

def test_ntp_timestamp_format():
    # 1970-01-01 is NTP second 2,208,988,800 (RFC 5905 §6); half a second is fraction 2**31
    assert ntp_from_unix(0.5) == (2_208_988_800 << 32) | (1 << 31)
    assert unix_from_ntp(ntp_from_unix(T0)) == T0


def test_mn_identifications_strictly_increase_even_if_the_clock_stands_still():
    mn = msa()
    a = mn.new_identification(T0)
    b = mn.new_identification(T0)
    c = mn.new_identification(T0 - 5)
    assert a < b < c and a == ntp_from_unix(T0)


@pytest.mark.parametrize("mn_clock,ok", [(T0, True), (T0 + 6.9, True), (T0 - 6.9, True),
                                         (T0 + 7.1, False), (T0 - 7.1, False)])
def test_skew(mn_clock, ok):
    ha = msa()
    ident = ntp_from_unix(mn_clock)
    if ok:
        ha.check_identification(ident, T0)
    else:
        with pytest.raises(ParseError) as info:
            ha.check_identification(ident, T0)
        assert info.value.reason is DropReason.MIP_IDENTIFICATION_MISMATCH


def test_configurable_skew():
    ha = msa(skew_s=1.0)
    with pytest.raises(ParseError):
        ha.check_identification(ntp_from_unix(T0 + 2), T0)


def test_equal_older_newer_after_acceptance():
    ha = msa()
    first = ntp_from_unix(T0)
    ha.check_identification(first, T0)
    ha.accept_identification(first)
    for ident in (first, first - 1, ntp_from_unix(T0 - 1)):      # equal, older
        with pytest.raises(ParseError) as info:
            ha.check_identification(ident, T0 + 1)
        assert info.value.reason is DropReason.MIP_REPLAYED
    ha.check_identification(first + 1, T0 + 1)                  # newer by one fraction unit
    ha.check_identification(ntp_from_unix(T0 + 3), T0 + 1)


def test_check_changes_no_state():
    ha = msa()
    ha.check_identification(ntp_from_unix(T0 + 1), T0)
    assert ha.last_accepted_id is None
    ha.check_identification(ntp_from_unix(T0), T0)              # still acceptable


def test_133_reply_identification_and_mn_resynchronisation():
    mn, ha = msa(), msa()
    mn_clock = T0 - 3600.0                                   # MN an hour behind
    request_id = mn.new_identification(mn_clock)
    with pytest.raises(ParseError) as info:
        ha.check_identification(request_id, T0)
    assert info.value.reason is DropReason.MIP_IDENTIFICATION_MISMATCH
    reply_id = ha.reply_identification(request_id, T0, accepted=False)
    # §5.7: HA time in the high 32 bits, the MN's low 32 bits
    assert reply_id >> 32 == ntp_from_unix(T0) >> 32
    assert reply_id & 0xFFFFFFFF == request_id & 0xFFFFFFFF
    reply = msa().verify(msa().sign(build_registration_reply(RegistrationReply(
        ReplyCode.HA_IDENTIFICATION_MISMATCH, "10.1.0.100", "10.1.0.2", reply_id, 0))))
    assert mn.adopt_reply(request_id, reply, mn_clock)
    retry = mn.new_identification(mn_clock + 0.5)
    ha.check_identification(retry, T0 + 0.5)                 # now within the skew
    ha.accept_identification(retry)
    assert ha.reply_identification(retry, T0, accepted=True) == retry


def test_reply_for_another_request_is_not_adopted():
    mn = msa()
    request_id = mn.new_identification(T0)
    stranger = RegistrationReply(ReplyCode.HA_IDENTIFICATION_MISMATCH, "10.1.0.100", "10.1.0.2",
                                 ntp_from_unix(T0 + 999) & ~0xFFFFFFFF | 0x1234, 0)
    assert not mn.reply_matches(request_id, stranger)
    assert not mn.adopt_reply(request_id, stranger, T0)
    assert mn.clock_offset_s == 0.0


def test_accepted_reply_does_not_move_the_clock():
    mn = msa()
    request_id = mn.new_identification(T0)
    ok = RegistrationReply(ReplyCode.ACCEPTED, "10.1.0.100", "10.1.0.2", request_id, 300)
    assert not mn.adopt_reply(request_id, ok, T0)
    assert mn.clock_offset_s == 0.0


def counter_random():
    state = {"n": 0}

    def rand(n):
        state["n"] += 1
        return state["n"].to_bytes(n, "big")
    return rand


def test_nonce_mode_first_request_gets_133_then_succeeds():
    mn = msa(replay="nonces", random=counter_random())
    ha_nonces = iter([b"\xab" * 4, b"\xcd" * 4])
    ha = msa(replay="nonces", random=lambda n: next(ha_nonces))
    first = mn.new_identification(T0)
    with pytest.raises(ParseError) as info:
        ha.check_identification(first, T0)
    assert info.value.reason is DropReason.MIP_IDENTIFICATION_MISMATCH
    reply_id = ha.reply_identification(first, T0, accepted=False)
    assert reply_id == (0xABABABAB << 32) | (first & 0xFFFFFFFF)
    reply = RegistrationReply(ReplyCode.HA_IDENTIFICATION_MISMATCH, "10.1.0.100", "10.1.0.2",
                              reply_id, 0)
    assert mn.adopt_reply(first, reply, T0)
    second = mn.new_identification(T0)
    assert second >> 32 == 0xABABABAB and second != first
    ha.check_identification(second, T0)
    # the accepted reply hands out a fresh nonce; the old one no longer works
    assert ha.reply_identification(second, T0, accepted=True) >> 32 == 0xCDCDCDCD
    with pytest.raises(ParseError):
        ha.check_identification(second, T0)


def test_parse_request_identification_is_64_bits():
    ident = ntp_from_unix(T0)
    assert parse_registration_request(rrq_bytes(ident)).identification == ident



@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=80), st.integers(0, 60), st.binary(min_size=1, max_size=3))
def test_verify_random_and_spliced_input_only_raises_parse_error(noise, cut, patch):
    base = msa().sign(rrq_bytes(ntp_from_unix(T0), [nai_extension("mn1@example.net")]))
    for data in (noise, b"\x01" + noise, b"\x03" + noise,
                 base[:cut] + patch + base[cut + len(patch):]):
        try:
            msa().verify(data)
        except ParseError:
            pass


def test_replay_and_skew_checks_survive_the_2036_ntp_rollover():
    rollover = 2_085_978_496.0          # 2036-02-07 06:28:16 UTC: NTP seconds wrap to 0
    ha, mn = msa(), msa()
    before = mn.new_identification(rollover - 1)
    after = mn.new_identification(rollover + 1)
    assert after < before                               # the raw value wrapped ...
    ha.check_identification(before, rollover)
    ha.accept_identification(before)
    ha.check_identification(after, rollover)            # ... but it is newer and within skew
    ha.accept_identification(after)
    with pytest.raises(ParseError) as info:
        ha.check_identification(before, rollover)
    assert info.value.reason is DropReason.MIP_REPLAYED
