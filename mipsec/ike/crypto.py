"""IKEv2 cryptography: PRF and prf+ (§2.13), Diffie-Hellman (§2.14), key derivation (§2.14,
§2.17, §2.18), PSK authentication (§2.15) and the Encrypted payload (§3.14, RFC 5282).

Everything here is a pure function of its inputs, except ``DhPrivate.generate`` which takes an
injectable random source; cipher objects are built once per IKE SA (``SkCipher``).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mipsec.drops import DropReason
from mipsec.errors import ParseError, UsageError
from mipsec.ike import codec
from mipsec.ike.constants import (
    GENERIC_PAYLOAD_HEADER_LEN,
    IKE_HEADER_LEN,
    KEY_PAD,
    DhGroup,
    Encr,
    Integ,
    PayloadType,
    Prf,
)

Random = Callable[[int], bytes]

# --- PRF and prf+ (§2.13) ------------------------------------------------------------------------

PRF_KEY_LEN: dict[int, int] = {Prf.PRF_HMAC_SHA2_256: 32}       # RFC 4868 §2.1.2: preferred key size = output


def prf(algorithm: int, key: bytes, data: bytes) -> bytes:
    if algorithm != Prf.PRF_HMAC_SHA2_256:
        raise UsageError(f"PRF {algorithm} is not implemented")
    return hmac.new(key, data, sha256).digest()


def prf_plus(algorithm: int, key: bytes, seed: bytes, length: int) -> bytes:
    """§2.13: T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n); at most 255 blocks."""
    out = bytearray()
    t = b""
    n = 1
    while len(out) < length:
        if n > 255:
            raise UsageError("prf+ cannot produce that much keying material")
        t = prf(algorithm, key, t + seed + bytes([n]))
        out += t
        n += 1
    return bytes(out[:length])


# --- Diffie-Hellman (§2.14) ----------------------------------------------------------------------

# RFC 3526 §3: the 2048-bit MODP group, generator 2.
MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)
MODP_2048_G = 2
# §3.4: KE data sizes
KE_LEN: dict[int, int] = {DhGroup.MODP_2048: 256, DhGroup.ECP_256: 64, DhGroup.CURVE25519: 32}


class DhPrivate:
    """One side of a Diffie-Hellman exchange; ``public`` is the KE payload data (§3.4)."""

    def __init__(self, group: int, secret: int | bytes):
        self.group = DhGroup(group)
        if self.group == DhGroup.MODP_2048:
            self._x = int(secret) if isinstance(secret, int) else int.from_bytes(secret, "big")
            self.public = pow(MODP_2048_G, self._x, MODP_2048_P).to_bytes(256, "big")
        elif self.group == DhGroup.ECP_256:
            x = secret if isinstance(secret, int) else int.from_bytes(secret, "big")
            self._ec_key = ec.derive_private_key(x, ec.SECP256R1())
            nums = self._ec_key.public_key().public_numbers()
            # RFC 5903 §7: the KE data is x | y, without the SEC1 0x04 prefix
            self.public = nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")
        elif self.group == DhGroup.CURVE25519:
            self._x25519_key = x25519.X25519PrivateKey.from_private_bytes(bytes(secret))
            self.public = self._x25519_key.public_key().public_bytes_raw()   # RFC 8031 §2
        else:  # pragma: no cover - DhGroup() already refused it
            raise UsageError(f"DH group {group} is not implemented")

    @classmethod
    def generate(cls, group: int, random: Random = os.urandom) -> DhPrivate:
        group = DhGroup(group)
        if group == DhGroup.MODP_2048:
            # a 256-bit exponent is ample for a 2048-bit group (RFC 3526 §8, 2 x strength)
            return cls(group, int.from_bytes(random(32), "big") | (1 << 255))
        if group == DhGroup.ECP_256:
            n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
            while True:
                d = int.from_bytes(random(32), "big")
                if 0 < d < n:
                    return cls(group, d)
        return cls(group, random(32))

    def shared_secret(self, peer_public: bytes) -> bytes:
        """g^ir; raises ParseError(MALFORMED) for a public value that is not valid in the group."""
        if len(peer_public) != KE_LEN[self.group]:
            raise ParseError(f"KE data of {len(peer_public)} octets for group {self.group.value}",
                             DropReason.IKE_BAD_LENGTH)
        if self.group == DhGroup.MODP_2048:
            y = int.from_bytes(peer_public, "big")
            if not 1 < y < MODP_2048_P - 1:                  # RFC 6989 §2.1
                raise ParseError("MODP public value out of range", DropReason.MALFORMED)
            return pow(y, self._x, MODP_2048_P).to_bytes(256, "big")
        if self.group == DhGroup.ECP_256:
            try:
                pub = ec.EllipticCurvePublicKey.from_encoded_point(
                    ec.SECP256R1(), b"\x04" + peer_public)     # checks the point is on the curve
                shared = self._ec_key.exchange(ec.ECDH(), pub)
            except ValueError as e:
                raise ParseError(f"bad ECP-256 point: {e}", DropReason.MALFORMED) from None
            return shared                                       # RFC 5903 §7: x coordinate only
        try:
            shared = self._x25519_key.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as e:                                  # all-zero result, RFC 8031 §2.3
            raise ParseError(f"bad Curve25519 value: {e}", DropReason.MALFORMED) from None
        return shared


# --- IKE SA keys (§2.14) ------------------------------------------------------------------------

ENCR_BLOCK: dict[int, int] = {Encr.ENCR_AES_CBC: 16, Encr.ENCR_AES_GCM_16: 1}
INTEG_KEY_LEN: dict[int, int] = {Integ.AUTH_HMAC_SHA2_256_128: 32}
INTEG_ICV_LEN: dict[int, int] = {Integ.AUTH_HMAC_SHA2_256_128: 16}


def encr_key_len(encr: int, key_bits: int) -> int:
    """Octets of keying material for an encryption transform (GCM: key + 4-octet salt,
    RFC 5282 §7.1 / RFC 4106 §8.1)."""
    if encr == Encr.ENCR_AES_GCM_16:
        return key_bits // 8 + 4
    return key_bits // 8


@dataclass(frozen=True, slots=True)
class IkeSuite:
    """The negotiated IKE SA transforms."""
    encr: int
    key_bits: int
    prf: int
    integ: int          # Integ.NONE with an AEAD
    dh: int

    @property
    def aead(self) -> bool:
        return self.encr == Encr.ENCR_AES_GCM_16


@dataclass(frozen=True, slots=True)
class IkeKeys:
    sk_d: bytes
    sk_ai: bytes
    sk_ar: bytes
    sk_ei: bytes
    sk_er: bytes
    sk_pi: bytes
    sk_pr: bytes


def skeyseed(prf_alg: int, ni: bytes, nr: bytes, shared: bytes) -> bytes:
    """§2.14: SKEYSEED = prf(Ni | Nr, g^ir)."""
    return prf(prf_alg, ni + nr, shared)


def rekey_skeyseed(prf_alg: int, old_sk_d: bytes, shared: bytes, ni: bytes, nr: bytes) -> bytes:
    """§2.18: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)."""
    return prf(prf_alg, old_sk_d, shared + ni + nr)


def derive_ike_keys(suite: IkeSuite, seed: bytes, ni: bytes, nr: bytes,
                    spi_i: bytes, spi_r: bytes) -> IkeKeys:
    """§2.14: {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni|Nr|SPIi|SPIr)."""
    p = PRF_KEY_LEN[suite.prf]
    a = INTEG_KEY_LEN.get(suite.integ, 0) if not suite.aead else 0
    e = encr_key_len(suite.encr, suite.key_bits)
    km = prf_plus(suite.prf, seed, ni + nr + spi_i + spi_r, 3 * p + 2 * a + 2 * e)
    parts = []
    off = 0
    for n in (p, a, a, e, e, p, p):
        parts.append(km[off:off + n])
        off += n
    return IkeKeys(*parts)


def child_keymat(prf_alg: int, sk_d: bytes, ni: bytes, nr: bytes, length: int,
                 shared: bytes | None = None) -> bytes:
    """§2.17: KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr)."""
    return prf_plus(prf_alg, sk_d, (shared or b"") + ni + nr, length)


def psk_auth(prf_alg: int, psk: bytes, real_message: bytes, peer_nonce: bytes,
             sk_p: bytes, id_body: bytes) -> bytes:
    """§2.15: AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>) where
    SignedOctets = RealMessage | NoncePeerData | prf(SK_p, RestOfIDPayload)."""
    signed = real_message + peer_nonce + prf(prf_alg, sk_p, id_body)
    return prf(prf_alg, prf(prf_alg, psk, KEY_PAD), signed)


# --- the Encrypted payload (§3.14, RFC 5282) ----------------------------------------------------

class SkCipher:
    """Protects and opens SK payloads in one direction; keyed once per IKE SA."""

    def __init__(self, suite: IkeSuite, encr_key: bytes, integ_key: bytes,
                 random: Random = os.urandom):
        self.suite = suite
        self._random = random
        if suite.aead:
            self._aead = AESGCM(encr_key[:-4])
            self._salt = encr_key[-4:]
            self.iv_len, self.icv_len, self.block = 8, 16, 1       # RFC 5282 §3, §8.1
        else:
            if suite.integ not in INTEG_KEY_LEN:
                raise UsageError(f"integrity transform {suite.integ} is not implemented")
            self._key = encr_key
            self._integ_key = integ_key
            self.iv_len, self.block = 16, 16
            self.icv_len = INTEG_ICV_LEN[suite.integ]

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._integ_key, data, sha256).digest()[:self.icv_len]

    def protect(self, header: codec.Header, payloads, unencrypted=()) -> bytes:
        """Build a whole message: header | unencrypted payloads | SK{payloads} (§3.14)."""
        inner = codec.build_chain(payloads)
        first_inner = payloads[0].ptype if payloads else 0
        # §3.14: Pad Length is the last octet; pad so the total is a multiple of the block
        pad = (-(len(inner) + 1)) % self.block
        plaintext = inner + bytes(pad) + bytes([pad])
        iv = self._random(self.iv_len)
        body_len = self.iv_len + len(plaintext) + self.icv_len
        pre = codec.build_chain(list(unencrypted), last_next=PayloadType.SK) if unencrypted else b""
        first = unencrypted[0].ptype if unencrypted else PayloadType.SK
        total = IKE_HEADER_LEN + len(pre) + GENERIC_PAYLOAD_HEADER_LEN + body_len
        sk_header = codec.GENERIC.build({"next_payload": first_inner, "flags": 0,
                                         "length": GENERIC_PAYLOAD_HEADER_LEN + body_len})
        aad = codec.build_header(header, first, total) + pre + sk_header
        if self.suite.aead:
            ct = self._aead.encrypt(self._salt + iv, plaintext, aad)  # tag appended
            return aad + iv + ct
        enc = Cipher(algorithms.AES(self._key), modes.CBC(iv)).encryptor()
        ct = enc.update(plaintext) + enc.finalize()
        signed = aad + iv + ct
        return signed + self._mac(signed)

    def open(self, message: codec.Message) -> tuple[codec.Payload, ...]:
        """Check and decrypt ``message.encrypted``; returns the inner payloads.

        Raises ParseError: IKE_INTEGRITY_FAILED for a bad ICV / tag, IKE_BAD_LENGTH or
        MALFORMED for a body that cannot be a valid SK payload, and whatever the inner chain
        parse raises (the ICV is checked first, so an attacker never reaches the parser)."""
        sk = message.encrypted
        if sk is None:
            raise ParseError("no SK payload", DropReason.MALFORMED)
        body = sk.body
        if len(body) < self.iv_len + self.icv_len + (1 if self.suite.aead else self.block):
            raise ParseError("SK payload too short", DropReason.IKE_BAD_LENGTH)
        raw = message.raw
        iv = body[:self.iv_len]
        if self.suite.aead:
            aad = raw[:sk.offset + GENERIC_PAYLOAD_HEADER_LEN]
            try:
                plaintext = self._aead.decrypt(self._salt + iv, body[self.iv_len:], aad)
            except InvalidTag:
                raise ParseError("SK tag does not verify", DropReason.IKE_INTEGRITY_FAILED) from None
        else:
            signed, icv = raw[:-self.icv_len], raw[-self.icv_len:]
            if not hmac.compare_digest(self._mac(signed), icv):        # §3.14: check, then decrypt
                raise ParseError("SK ICV does not verify", DropReason.IKE_INTEGRITY_FAILED)
            ct = body[self.iv_len:-self.icv_len]
            if len(ct) % self.block:
                raise ParseError("SK ciphertext is not whole blocks", DropReason.IKE_BAD_LENGTH)
            dec = Cipher(algorithms.AES(self._key), modes.CBC(iv)).decryptor()
            plaintext = dec.update(ct) + dec.finalize()
        pad = plaintext[-1]
        if pad + 1 > len(plaintext):
            raise ParseError("SK pad length past the plaintext", DropReason.MALFORMED)
        return codec.parse_payload_chain(sk.first_payload, plaintext[:-(pad + 1)])
