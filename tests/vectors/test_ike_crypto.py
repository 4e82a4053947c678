"""IKEv2 key derivation and crypto against published vectors and independent computations."""

import hashlib
import hmac

import pytest

from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.ike import codec
from mipsec.ike.constants import DhGroup, Encr, ExchangeType, Flag, Integ, PayloadType, Prf
from mipsec.ike.crypto import (
    DhPrivate,
    IkeSuite,
    SkCipher,
    child_keymat,
    derive_ike_keys,
    prf,
    prf_plus,
    psk_auth,
    rekey_skeyseed,
    skeyseed,
)

H = bytes.fromhex
SHA256 = Prf.PRF_HMAC_SHA2_256


def test_prf_is_hmac_sha256_rfc4231_case_2():
    # RFC 4231 §4.3, test case 2
    assert prf(SHA256, b"Jefe", b"what do ya want for nothing?") == H(
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def test_prf_is_hmac_sha256_rfc4231_case_1():
    # RFC 4231 §4.2, test case 1
    assert prf(SHA256, b"\x0b" * 20, b"Hi There") == H(
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")


def _independent_prf_plus(key, seed, length):
    # §2.13 written out by hand: T1 = prf(K, S|0x01), T2 = prf(K, T1|S|0x02), ...
    blocks = [b""]
    for n in range(1, 9):
        blocks.append(hmac.new(key, blocks[-1] + seed + bytes([n]), hashlib.sha256).digest())
    return b"".join(blocks)[:length]


@pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 100, 128])
def test_prf_plus_matches_independent_computation(length):
    key, seed = b"k" * 32, b"seed-octets" * 3
    assert prf_plus(SHA256, key, seed, length) == _independent_prf_plus(key, seed, length)


def test_prf_plus_refuses_more_than_255_blocks():
    with pytest.raises(UsageError):
        prf_plus(SHA256, b"k", b"s", 255 * 32 + 1)
    assert len(prf_plus(SHA256, b"k", b"s", 255 * 32)) == 255 * 32


# RFC 5903 §8.1: 256-bit random ECP group
ECP_I = int("C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433", 16)
ECP_GI = H("DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180"
           "5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3")
ECP_R = int("C6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53", 16)
ECP_GR = H("D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63"
           "56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB")
ECP_GIRX = H("D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE")


def test_ecp256_rfc5903_vector_both_ways():
    i = DhPrivate(DhGroup.ECP_256, ECP_I)
    r = DhPrivate(DhGroup.ECP_256, ECP_R)
    assert i.public == ECP_GI and r.public == ECP_GR
    # RFC 5903 §7 (errata 9): the shared secret is the x coordinate only
    assert i.shared_secret(ECP_GR) == ECP_GIRX == r.shared_secret(ECP_GI)


def test_ecp256_refuses_point_off_the_curve():
    i = DhPrivate(DhGroup.ECP_256, ECP_I)
    bad = ECP_GR[:-1] + bytes([ECP_GR[-1] ^ 1])
    with pytest.raises(ParseError) as e:
        i.shared_secret(bad)
    assert e.value.reason == DropReason.MALFORMED


# RFC 7748 §6.1
X_A = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
X_A_PUB = H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
X_B = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
X_B_PUB = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
X_K = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_curve25519_rfc7748_vector_both_ways():
    a, b = DhPrivate(DhGroup.CURVE25519, X_A), DhPrivate(DhGroup.CURVE25519, X_B)
    assert a.public == X_A_PUB and b.public == X_B_PUB
    assert a.shared_secret(X_B_PUB) == X_K == b.shared_secret(X_A_PUB)


def test_curve25519_refuses_low_order_point():
    a = DhPrivate(DhGroup.CURVE25519, X_A)
    with pytest.raises(ParseError):          # RFC 8031 §2.3: all-zero shared secret
        a.shared_secret(bytes(32))


def test_modp2048_agrees_and_matches_plain_pow():
    a = DhPrivate(DhGroup.MODP_2048, 0x1234567)
    b = DhPrivate(DhGroup.MODP_2048, 0x7654321)
    from mipsec.ike.crypto import MODP_2048_P
    # RFC 3526 §3: the prime's well-known shape and a 2048-bit size
    assert MODP_2048_P.bit_length() == 2048 and MODP_2048_P % 2**64 == 2**64 - 1
    assert MODP_2048_P >> 1984 == 0xFFFFFFFFFFFFFFFF
    assert a.public == pow(2, 0x1234567, MODP_2048_P).to_bytes(256, "big")
    assert a.shared_secret(b.public) == b.shared_secret(a.public)
    assert len(a.shared_secret(b.public)) == 256
    for bad in (bytes(256), (1).to_bytes(256, "big"), (MODP_2048_P - 1).to_bytes(256, "big")):
        with pytest.raises(ParseError):
            a.shared_secret(bad)
    with pytest.raises(ParseError) as e:
        a.shared_secret(b.public[1:])
    assert e.value.reason == DropReason.IKE_BAD_LENGTH


@pytest.mark.parametrize("group", list(DhGroup)[1:])
def test_generated_keys_agree(group):
    a, b = DhPrivate.generate(group), DhPrivate.generate(group)
    assert a.shared_secret(b.public) == b.shared_secret(a.public)


def test_ike_key_derivation_layout_against_hand_computation():
    suite = IkeSuite(Encr.ENCR_AES_CBC, 256, SHA256, Integ.AUTH_HMAC_SHA2_256_128,
                     DhGroup.CURVE25519)
    ni, nr, spi_i, spi_r, g = b"N" * 32, b"n" * 32, b"I" * 8, b"R" * 8, b"G" * 32
    seed = skeyseed(SHA256, ni, nr, g)
    assert seed == hmac.new(ni + nr, g, hashlib.sha256).digest()        # §2.14
    keys = derive_ike_keys(suite, seed, ni, nr, spi_i, spi_r)
    km = _independent_prf_plus(seed, ni + nr + spi_i + spi_r, 3 * 32 + 2 * 32 + 2 * 32)
    # SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr, sizes 32 32 32 32 32 32 32
    assert (keys.sk_d, keys.sk_ai, keys.sk_ar, keys.sk_ei, keys.sk_er, keys.sk_pi, keys.sk_pr) == \
        tuple(km[i:i + 32] for i in range(0, 224, 32))


def test_gcm_ike_keys_have_no_integrity_key_and_a_salt():
    suite = IkeSuite(Encr.ENCR_AES_GCM_16, 128, SHA256, Integ.NONE, DhGroup.ECP_256)
    keys = derive_ike_keys(suite, b"s" * 32, b"a" * 16, b"b" * 16, b"I" * 8, b"R" * 8)
    assert keys.sk_ai == keys.sk_ar == b""
    assert len(keys.sk_ei) == len(keys.sk_er) == 16 + 4
    km = _independent_prf_plus(b"s" * 32, b"a" * 16 + b"b" * 16 + b"I" * 8 + b"R" * 8, 136)
    assert keys.sk_ei == km[32:52] and keys.sk_er == km[52:72] and keys.sk_pr == km[104:136]


def test_rekey_skeyseed_and_child_keymat():
    assert rekey_skeyseed(SHA256, b"d" * 32, b"g", b"i", b"r") == \
        hmac.new(b"d" * 32, b"gir", hashlib.sha256).digest()             # §2.18
    assert child_keymat(SHA256, b"d" * 32, b"i", b"r", 40) == _independent_prf_plus(b"d" * 32, b"ir", 40)
    assert child_keymat(SHA256, b"d" * 32, b"i", b"r", 40, shared=b"G") == \
        _independent_prf_plus(b"d" * 32, b"Gir", 40)                     # §2.17 with PFS


def test_psk_auth_formula():
    # §2.15 computed by hand with hmac
    k = hmac.new(b"secret", b"Key Pad for IKEv2", hashlib.sha256).digest()
    maced_id = hmac.new(b"P" * 32, b"\x02\x00\x00\x00gw", hashlib.sha256).digest()
    want = hmac.new(k, b"MSG" + b"NONCE" + maced_id, hashlib.sha256).digest()
    assert psk_auth(SHA256, b"secret", b"MSG", b"NONCE", b"P" * 32, b"\x02\x00\x00\x00gw") == want


SUITES = [
    IkeSuite(Encr.ENCR_AES_CBC, 128, SHA256, Integ.AUTH_HMAC_SHA2_256_128, DhGroup.ECP_256),
    IkeSuite(Encr.ENCR_AES_CBC, 256, SHA256, Integ.AUTH_HMAC_SHA2_256_128, DhGroup.ECP_256),
    IkeSuite(Encr.ENCR_AES_GCM_16, 128, SHA256, Integ.NONE, DhGroup.ECP_256),
    IkeSuite(Encr.ENCR_AES_GCM_16, 256, SHA256, Integ.NONE, DhGroup.ECP_256),
]


def _pair(suite):
    keys = derive_ike_keys(suite, b"s" * 32, b"a" * 16, b"b" * 16, b"I" * 8, b"R" * 8)
    send = SkCipher(suite, keys.sk_ei, keys.sk_ai)
    recv = SkCipher(suite, keys.sk_ei, keys.sk_ai)
    return send, recv


HDR = codec.Header(b"I" * 8, b"R" * 8, ExchangeType.INFORMATIONAL, Flag.INITIATOR, 7)
INNER = (codec.NotifyPayload(16384, b"x" * 5), codec.DeletePayload(3, (b"\x01\x02\x03\x04",)))


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: f"{s.encr.name}-{s.key_bits}")
def test_sk_round_trip_and_every_tampered_octet_is_refused(suite):
    send, recv = _pair(suite)
    wire = send.protect(HDR, INNER)
    msg = codec.parse_message(wire)
    assert msg.encrypted.first_payload == PayloadType.NOTIFY
    assert recv.open(msg) == INNER
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x01
        try:
            m = codec.parse_message(bytes(bad))
        except ParseError:
            continue                         # header/length fields: refused by the parser
        with pytest.raises(ParseError) as e:
            recv.open(m)
        assert e.value.reason == DropReason.IKE_INTEGRITY_FAILED, i


@pytest.mark.parametrize("suite", SUITES[:1] + SUITES[2:3], ids=["cbc", "gcm"])
def test_sk_with_unencrypted_payload_before_it(suite):
    send, recv = _pair(suite)
    wire = send.protect(HDR, INNER, unencrypted=(codec.VendorIdPayload(b"vid"),))
    msg = codec.parse_message(wire)
    assert msg.payloads == (codec.VendorIdPayload(b"vid"),)
    assert recv.open(msg) == INNER


def test_sk_cbc_is_what_the_spec_says():
    # §3.14 built by hand: IV | AES-CBC(payloads | pad | padlen) | HMAC-SHA-256-128 over all
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    suite = SUITES[0]
    iv = bytes(range(16))
    c = SkCipher(suite, b"E" * 16, b"A" * 32, random=lambda n: iv)
    wire = c.protect(HDR, (codec.NoncePayload(b"z" * 10),))
    inner = codec.GENERIC.build({"next_payload": 0, "flags": 0, "length": 14}) + b"z" * 10
    plain = inner + bytes(1) + b"\x01"                  # 14 + 2 = 16
    enc = Cipher(algorithms.AES(b"E" * 16), modes.CBC(iv)).encryptor()
    ct = enc.update(plain) + enc.finalize()
    body_len = 4 + 16 + 16 + 16
    head = codec.build_header(HDR, PayloadType.SK, 28 + body_len) + \
        codec.GENERIC.build({"next_payload": PayloadType.NONCE, "flags": 0, "length": body_len})
    signed = head + iv + ct
    assert wire == signed + hmac.new(b"A" * 32, signed, hashlib.sha256).digest()[:16]
