"""Hostile input to the Mobile IP codecs and their security checks.

Mutation-based and structure-aware: signed messages with one field or one byte changed, forged
messages that try to move replay state, length fields that lie.  Every refusal is a
``ParseError`` with a specific reason; nothing else escapes; replay state (the SIU verifier's last
sequence, the MSA's last identification) moves only for a message that authenticated.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason as R
from mipsec.errors import ParseError
from mipsec.mip.security import MobilitySecurityAssociation, ntp_from_unix
from mipsec.mip.siu import SiuSigner, SiuVerifier
from mipsec.wire.mip import (
    EXT_MN_HA_AUTH,
    Extension,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    build_registration_reply,
    build_registration_request,
    nai_extension,
    parse_registration_request,
)
from mipsec.wire.siu import SIU_FIXED_BYTES, Siu, SiuType, build_siu_body

HA, GW_INSIDE = "10.1.0.2", "10.1.0.1"
KEY = bytes(range(32))
NOW = 1_767_225_600.0


def _reason(fn, *args) -> R:
    with pytest.raises(ParseError) as info:
        fn(*args)
    return info.value.reason


def _sign(body: bytes, key: bytes = KEY) -> bytes:
    return body + hmac.new(key, body, hashlib.sha256).digest()


def _siu(**kw) -> Siu:
    fields = dict(type=SiuType.UPDATE, sender=HA, sequence=10, timestamp=0,
                  home_address="10.1.0.100", old_care_of="172.16.1.10",
                  new_care_of="172.16.2.10", gateway_spi=0x1234, lifetime=600, key_id=1)
    fields.update(kw)
    return Siu(**fields)


# --- SIU ---------------------------------------------------------------------------------------
def test_forged_siu_with_the_highest_sequence_cannot_lock_the_verifier_out():
    v = SiuVerifier({HA: (1, KEY)})
    v.verify(HA, _sign(build_siu_body(_siu(sequence=5))))
    forged = _sign(build_siu_body(_siu(sequence=2**64 - 1)), key=b"\x01" * 32)
    assert _reason(v.verify, HA, forged) is R.SIU_AUTH_FAILED
    assert v.last_sequence == {HA: 5}
    v.verify(HA, _sign(build_siu_body(_siu(sequence=6))))      # the real HA goes on
    assert v.last_sequence == {HA: 6}


@pytest.mark.parametrize("what, data, reason", [
    ("rrp_length says one byte more than there is",
     lambda b: b[:42] + (int.from_bytes(b[42:44], "big") + 1).to_bytes(2, "big") + b[44:],
     R.TRUNCATED),
    ("rrp_length says one byte less", lambda b: b[:42]
     + (int.from_bytes(b[42:44], "big") - 1).to_bytes(2, "big") + b[44:], R.MALFORMED),
    ("rrp_length 0xFFFF", lambda b: b[:42] + b"\xff\xff" + b[44:], R.TRUNCATED),
    ("authenticator cut to 0 bytes", lambda b: b[:-32], R.TRUNCATED),
    ("version 0", lambda b: b"\x00" + b[1:], R.MALFORMED),
    ("type 0", lambda b: b[:1] + b"\x00" + b[2:], R.MALFORMED),
    ("type 5", lambda b: b[:1] + b"\x05" + b[2:], R.MALFORMED),
    ("reserved flag bit", lambda b: b[:2] + b"\x81" + b[3:], R.MALFORMED),
    ("unknown key id", lambda b: b[:3] + b"\x09" + b[4:], R.SIU_AUTH_FAILED),
    ("sender field names another host", lambda b: b[:4] + bytes((10, 1, 0, 10)) + b[8:],
     R.SIU_UNKNOWN_SENDER),
    ("sender field 0.0.0.0", lambda b: b[:4] + bytes(4) + b[8:], R.SIU_UNKNOWN_SENDER),
])
def test_siu_field_attacks(what, data, reason):
    v = SiuVerifier({HA: (1, KEY)})
    good = _sign(build_siu_body(_siu(rrp=b"\x03" + bytes(27))))
    bad = data(good)
    if reason not in (R.TRUNCATED, R.MALFORMED) and len(bad) == len(good):
        bad = _sign(bad[:-32])          # re-signed: only the field itself can be refused
    assert _reason(v.verify, HA, bad) is reason, what
    assert v.last_sequence == {}


def test_siu_from_an_unconfigured_source_even_with_a_valid_mac():
    v = SiuVerifier({HA: (1, KEY)})
    other = SiuSigner("10.1.0.10", KEY, 1)             # same key, different host
    data = other.build(home_address="10.1.0.100", old_care_of="0.0.0.0",
                       new_care_of="172.16.1.10", gateway_spi=1, lifetime=1, wallclock=NOW)
    assert _reason(v.verify, "10.1.0.10", data) is R.SIU_UNKNOWN_SENDER
    assert _reason(v.verify, HA, data) is R.SIU_UNKNOWN_SENDER   # sender field says 10.1.0.10
    assert v.last_sequence == {}


@settings(max_examples=examples(200), deadline=None)
@given(st.integers(0, SIU_FIXED_BYTES + 40 + 31), st.integers(0, 255), st.booleans(),
       st.integers(0, 60))
def test_siu_any_byte_changed_never_raises_or_moves_state(pos, value, resign, extra):
    v = SiuVerifier({HA: (1, KEY)})
    v.verify(HA, _sign(build_siu_body(_siu(sequence=100))))
    good = _sign(build_siu_body(_siu(sequence=101, rrp=bytes(range(40)))))
    bad = bytearray(good)
    bad[pos % len(bad)] = value
    bad = bytes(bad) + bytes(extra)
    if resign and len(bad) > 32:
        bad = _sign(bad[:-32])
    try:
        siu = v.verify(HA, bad)
    except ParseError as exc:
        assert isinstance(exc.reason, R)
        assert v.last_sequence == {HA: 100}
    else:
        assert resign or bad == good
        assert v.last_sequence == {HA: siu.sequence} and siu.sequence > 100


# --- registration messages and the MSA ------------------------------------------------------
def _rrq(ident=None, extensions=()):
    return build_registration_request(RegistrationRequest(
        home_address="10.1.0.100", home_agent=HA, care_of_address="172.16.1.10",
        identification=ident if ident is not None else ntp_from_unix(NOW), lifetime=600,
        extensions=tuple(extensions)))


@pytest.mark.parametrize("algorithm", ["hmac-md5", "hmac-sha256"])
def test_every_covered_byte_changed_fails_authentication(algorithm):
    msa = MobilitySecurityAssociation(0x1000, b"k" * 16, algorithm)
    signed = msa.sign(_rrq(extensions=[nai_extension("mn@example")]))
    assert msa.verify(signed)
    covered = len(signed) - msa.authenticator_bytes
    for i in range(len(signed)):
        bad = bytearray(signed)
        bad[i] ^= 0x10
        reason = _reason(msa.verify, bytes(bad))
        if i == 0:
            assert reason is R.MALFORMED                  # no longer type 1
        elif i in (25, covered - 5):                      # NAI length, auth extension length
            assert reason in (R.TRUNCATED, R.MIP_BAD_EXTENSION, R.MIP_NO_AUTH), i
        elif i == 24:                                     # NAI type 131 -> 147, skippable
            assert reason is R.MIP_AUTH_FAILED, i
        elif i == covered - 6:                            # auth type 32 -> 48, not skippable
            assert reason is R.MIP_BAD_EXTENSION, i
        elif covered - 4 <= i < covered:                  # the SPI
            assert reason is R.MIP_UNKNOWN_SPI, i
        else:
            assert reason is R.MIP_AUTH_FAILED, i


def test_authenticator_lengths_other_than_the_algorithms_fail():
    msa = MobilitySecurityAssociation(0x1000, b"k" * 16)
    body = _rrq()
    for n in (0, 1, 15, 17, 32, 251):
        ext = Extension(EXT_MN_HA_AUTH, (0x1000).to_bytes(4, "big") + bytes(n))
        assert _reason(msa.verify, body + ext.encode()) is R.MIP_AUTH_FAILED, n
    # a correct authenticator followed by one more byte inside the extension
    signed = msa.sign(body)
    longer = bytearray(signed + b"\x00")
    longer[len(body) + 1] += 1
    assert _reason(msa.verify, bytes(longer)) is R.MIP_AUTH_FAILED


def test_identification_checks_change_nothing_when_they_refuse():
    msa = MobilitySecurityAssociation(0x1000, b"k" * 16, skew_s=7)
    first = ntp_from_unix(NOW)
    msa.check_identification(first, NOW)
    msa.accept_identification(first)
    for ident, reason in [(first, R.MIP_REPLAYED), (first - 1, R.MIP_REPLAYED),
                          ((first + 2**63) % 2**64, R.MIP_REPLAYED),
                          (first + (8 << 32), R.MIP_IDENTIFICATION_MISMATCH),
                          (ntp_from_unix(NOW + 7.5), R.MIP_IDENTIFICATION_MISMATCH)]:
        assert _reason(msa.check_identification, ident, NOW) is reason
        assert msa.last_accepted_id == first
    msa.check_identification(ntp_from_unix(NOW + 6.9), NOW)        # inside the skew: fine


def test_reply_for_another_home_address_is_authentic_but_distinguishable():
    """The MN must compare the reply's home address itself (the MSA only proves who signed)."""
    msa = MobilitySecurityAssociation(0x1000, b"k" * 16)
    other = msa.sign(build_registration_reply(RegistrationReply(
        code=ReplyCode.ACCEPTED, home_address="10.1.0.101", home_agent=HA, identification=5,
        lifetime=1)))
    assert msa.verify(other).home_address == "10.1.0.101"


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=12)), max_size=6),
       st.integers(0, 6))
def test_extension_walk_never_raises_anything_but_parse_error(exts, cut):
    data = _rrq() + b"".join(bytes((t, len(d))) + d if t not in (36, 38)
                             else bytes((t, 0)) + len(d).to_bytes(2, "big") + d
                             for t, d in exts)
    data = data[:len(data) - cut] if cut else data
    try:
        rrq = parse_registration_request(data)
    except ParseError as exc:
        assert isinstance(exc.reason, R)
    else:
        assert all(e.type >= 128 or e.type in (32, 33, 34, 131) for e in rrq.extensions)


def test_unusable_care_of_names_every_address_that_cannot_be_a_tunnel_endpoint():
    from mipsec.mip.ipip import unusable_care_of

    for bad in ("0.0.0.0", "0.1.2.3", "127.0.0.1", "127.255.255.254", "224.0.0.1",
                "239.255.255.255", "240.0.0.1", "255.255.255.255", "not an address",
                "1.2.3", "256.1.1.1", ""):
        assert unusable_care_of(bad), bad
    for good in ("172.16.1.10", "10.1.0.100", "1.0.0.1", "223.255.255.254", "192.0.2.1"):
        assert not unusable_care_of(good), good
    assert unusable_care_of("172.16.0.1", frozenset({"172.16.0.1", "10.1.0.1"}))
