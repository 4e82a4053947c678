"""ESP transforms, keyed by their IANA names (IKEv2 Transform Type 1 and 3, RFC 8221).

A transform object is built ONCE per SA with its keys; it holds every keyed object the packets
need (an AESGCM / ChaCha20Poly1305 object; one CBC encryptor and one CBC decryptor context; the
precomputed inner/outer HMAC hash states), so the per-packet cost is only the cryptography itself.

Per packet the SA calls

* ``seal(header8, seq, seq_hi, plaintext) -> header8 + IV + ciphertext + ICV``  (RFC 4303 §2)
* ``open(esp, seq_hi) -> plaintext | None``  (None: ICV / tag does not verify)

where ``plaintext`` is payload + padding + pad length + next header (the SA pads to
``align``) and ``seq_hi`` is the 4-byte implicit high half of an extended sequence number or
b"".  The SA inlines the same steps on its hot path, using the public keyed primitives
(``Aead.encrypt/decrypt/salt``, ``CbcHmac.encrypt_update/decrypt_update/random/hmac``,
``HmacTruncated.keyed``) to save a call per packet.

CBC with persistent contexts (one per SA and direction).  Encryption feeds one fresh random
block R first: its output C0 = E(K, R xor state) is unpredictable, and the output that follows
is exactly CBC under IV = C0 (CBC chains only on the previous ciphertext block), so C0 is sent
as the explicit IV (RFC 3602 §2.1 asks for an unpredictable IV).  Decryption feeds IV || C and
drops the first 16 output bytes: CBC decryption of block i depends only on C(i-1) and C(i).
The random blocks are cut from a pool of ``RANDOM_POOL_BYTES`` from ``random`` (os.urandom),
refilled when used up: 16 fresh random bytes per packet without a system call per packet.
HMAC (RFC 2104): a keyed ``cryptography`` HMAC context made once and copied per packet.
Measured here at 100 bytes, HMAC-SHA1: copied ``cryptography`` context 0.78 us, copied
precomputed ``hashlib`` inner/outer states 0.88 us, ``hmac.digest`` one-shot 2.0 us.
"""

from __future__ import annotations

import abc
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from mipsec.errors import ConfigError

_Q = struct.Struct("!Q")
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
RANDOM_POOL_BYTES = 4096   # CBC: random blocks are cut from a pool refilled every 256 packets
_compare = hmac.compare_digest


@dataclass(frozen=True)
class EncryptionSpec:
    """An IANA Transform Type 1 entry as mipsec implements it."""
    name: str
    key_sizes: tuple[int, ...]   # bytes, including the 4-byte salt for AEAD (RFC 4106 §8.1)
    iv_size: int                 # explicit IV in each packet (RFC 4303 §2.3)
    align: int                   # pad the plaintext to a multiple of this (RFC 4303 §2.4)
    aead: bool
    icv_size: int = 0            # AEAD tag length
    rfc: str = ""
    tshark_names: tuple[str, ...] = ()   # Wireshark esp_sa UAT encryption algorithm strings


@dataclass(frozen=True)
class IntegritySpec:
    """An IANA Transform Type 3 entry."""
    name: str
    hash_name: str
    key_size: int                # bytes (RFC 2404 §3, RFC 4868 §2.1.1: key = hash output size)
    icv_size: int                # truncated ICV (RFC 2404 §3, RFC 4868 §2.1.1)
    rfc: str = ""
    tshark_name: str = ""


ENCRYPTION: dict[str, EncryptionSpec] = {
    s.name: s for s in (
        EncryptionSpec("ENCR_NULL", (0,), 0, 4, False, rfc="RFC 2410",
                       tshark_names=("NULL",)),
        EncryptionSpec("ENCR_AES_CBC", (16, 24, 32), 16, 16, False, rfc="RFC 3602",
                       tshark_names=("AES-CBC [RFC3602]",)),
        EncryptionSpec("ENCR_AES_GCM_16", (20, 36), 8, 4, True, icv_size=16, rfc="RFC 4106",
                       tshark_names=("AES-GCM with 16 octet ICV [RFC4106]",)),
        EncryptionSpec("ENCR_CHACHA20_POLY1305", (36,), 8, 4, True, icv_size=16,
                       rfc="RFC 7634", tshark_names=()),
    )
}

INTEGRITY: dict[str, IntegritySpec] = {
    s.name: s for s in (
        IntegritySpec("AUTH_HMAC_SHA1_96", "sha1", 20, 12, "RFC 2404",
                      "HMAC-SHA-1-96 [RFC2404]"),
        IntegritySpec("AUTH_HMAC_SHA2_256_128", "sha256", 32, 16, "RFC 4868",
                      "HMAC-SHA-256-128 [RFC4868]"),
        IntegritySpec("AUTH_HMAC_SHA2_384_192", "sha384", 48, 24, "RFC 4868",
                      "HMAC-SHA-384-192 [RFC4868]"),
        IntegritySpec("AUTH_HMAC_SHA2_512_256", "sha512", 64, 32, "RFC 4868",
                      "HMAC-SHA-512-256 [RFC4868]"),
    )
}


class HmacTruncated:
    """HMAC (RFC 2104) truncated to ``icv_size`` bytes (RFC 2404 §2, RFC 4868 §2.3).

    The keyed HMAC context is made once; each packet works on a copy of it, so the key
    schedule (inner and outer padded-key hashes) is never recomputed.
    """

    __slots__ = ("spec", "icv_size", "keyed")

    def __init__(self, spec: IntegritySpec, key: bytes, *, any_key_length: bool = False):
        # any_key_length: only for the RFC 2202 / RFC 4231 vectors, whose keys are not the
        # ESP key size that RFC 2404 §3 and RFC 4868 §2.1.1 require.
        if len(key) != spec.key_size and not (any_key_length and key):
            raise ConfigError(f"{spec.name}: integrity key is {len(key)} bytes, "
                              f"needs {spec.key_size} ({spec.rfc})")
        self.spec = spec
        self.icv_size = spec.icv_size
        self.keyed = crypto_hmac.HMAC(key, _HASHES[spec.hash_name]())  # copy, never update

    def mac(self, data: bytes, extra: bytes = b"") -> bytes:
        """Truncated HMAC of data || extra (extra: the ESN high half, RFC 4303 §2.2.1)."""
        h = self.keyed.copy()
        h.update(data)
        if extra:
            h.update(extra)
        return h.finalize()[: self.icv_size]

    def full_mac(self, data: bytes) -> bytes:
        """The untruncated HMAC, for RFC 2202 / RFC 4231 vector tests."""
        h = self.keyed.copy()
        h.update(data)
        return h.finalize()


class Transform(abc.ABC):
    """Base: the attributes the SA reads to size packets, and the two per-packet operations."""

    __slots__ = ("encryption", "integrity", "iv_size", "icv_size", "align", "block_size")
    encryption: EncryptionSpec
    integrity: IntegritySpec | None
    iv_size: int                 # bytes of explicit IV per packet
    icv_size: int                # bytes of ICV (AEAD tag or truncated HMAC)
    align: int                   # the padded plaintext is a multiple of this
    block_size: int              # the cipher's block (1 for stream ciphers and NULL)

    @abc.abstractmethod
    def seal(self, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes:
        """header || IV || ciphertext || ICV for the padded ``plaintext``."""

    @abc.abstractmethod
    def open(self, esp: bytes, seq_hi: bytes) -> bytes | None:
        """The padded plaintext of a whole ESP packet, or None if the ICV does not verify."""


class CbcHmac(Transform):
    """ENCR_AES_CBC (RFC 3602) with an AUTH_HMAC_* (RFC 2404 / RFC 4868), encrypt-then-MAC."""

    __slots__ = ("encrypt_update", "decrypt_update", "hmac", "random", "_mac", "_key",
                 "_pool", "_pos")

    def __init__(self, spec: EncryptionSpec, key: bytes, mac: HmacTruncated,
                 random: Callable[[int], bytes]):
        self.encryption, self.integrity = spec, mac.spec
        self.iv_size = 16
        self.block_size = 16
        self.align = 16
        self.icv_size = mac.icv_size
        self._key = key
        self.random = random
        self._pool = b""
        self._pos = RANDOM_POOL_BYTES
        # The IVs given here are never used on the wire: see the module docstring.
        aes = algorithms.AES(key)
        self.encrypt_update = Cipher(aes, modes.CBC(random(16))).encryptor().update
        self.decrypt_update = Cipher(aes, modes.CBC(bytes(16))).decryptor().update
        self.hmac = mac
        self._mac = mac.mac

    def seal(self, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes:
        # RFC 3602 §3: header || IV || CBC ciphertext; RFC 4303 §3.3.4: ICV over all of it
        data = header + self.encrypt_update(self.random_block() + plaintext)
        return data + self._mac(data, seq_hi)

    def random_block(self) -> bytes:
        """16 fresh random bytes, cut from the pool."""
        pos = self._pos
        if pos >= RANDOM_POOL_BYTES:
            self._pool = self.random(RANDOM_POOL_BYTES)
            pos = 0
        self._pos = pos + 16
        return self._pool[pos:pos + 16]

    def seal_with_iv(self, header: bytes, iv: bytes, seq_hi: bytes, plaintext: bytes) -> bytes:
        """Reference path with a given IV and a fresh context (vectors, RFC 3602 §4)."""
        enc = Cipher(algorithms.AES(self._key), modes.CBC(iv)).encryptor()
        data = header + iv + enc.update(plaintext) + enc.finalize()
        return data + self._mac(data, seq_hi)

    def open(self, esp: bytes, seq_hi: bytes) -> bytes | None:
        data = _authenticated(self._mac, self.icv_size, esp, seq_hi)
        return None if data is None else self.decrypt_update(data[8:])[16:]


def _authenticated(mac: Callable[[bytes, bytes], bytes], icv_size: int, esp: bytes,
                   seq_hi: bytes) -> bytes | None:
    """``esp`` without its ICV if the ICV verifies (constant time, RFC 4303 §3.4.4), else None."""
    data = esp[:-icv_size]
    return data if _compare(mac(data, seq_hi), esp[-icv_size:]) else None


class NullHmac(Transform):
    """ENCR_NULL (RFC 2410) with an AUTH_HMAC_*: integrity only, for debugging."""

    __slots__ = ("hmac", "_mac")

    def __init__(self, spec: EncryptionSpec, mac: HmacTruncated):
        self.encryption, self.integrity = spec, mac.spec
        self.iv_size = 0
        self.block_size = 1
        self.align = 4
        self.icv_size = mac.icv_size
        self.hmac = mac
        self._mac = mac.mac

    def seal(self, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes:
        data = header + plaintext
        return data + self._mac(data, seq_hi)

    def open(self, esp: bytes, seq_hi: bytes) -> bytes | None:
        data = _authenticated(self._mac, self.icv_size, esp, seq_hi)
        return None if data is None else data[8:]


class Aead(Transform):
    """ENCR_AES_GCM_16 (RFC 4106) and ENCR_CHACHA20_POLY1305 (RFC 7634).

    Nonce = 4-byte salt (the last 4 key bytes) || 8-byte explicit IV; the IV is the 64-bit
    sequence number, unique per SA for its whole life (RFC 4106 §3.1, RFC 7634 §2).  AAD = SPI ||
    sequence number, or SPI || ESN high || ESN low (RFC 4106 §5, RFC 7634 §2.1).
    """

    __slots__ = ("encrypt", "decrypt", "salt")

    def __init__(self, spec: EncryptionSpec, key: bytes):
        self.encryption, self.integrity = spec, None
        self.iv_size = 8
        self.block_size = 1
        self.align = 4
        self.icv_size = spec.icv_size
        cls = AESGCM if spec.name == "ENCR_AES_GCM_16" else ChaCha20Poly1305
        aead = cls(key[:-4])
        self.salt = key[-4:]
        self.encrypt = aead.encrypt
        self.decrypt = aead.decrypt

    def seal(self, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes:
        iv = _Q.pack(seq)
        aad = header[:4] + seq_hi + header[4:] if seq_hi else header
        return header + iv + self.encrypt(self.salt + iv, plaintext, aad)

    def seal_with_iv(self, header: bytes, iv: bytes, seq_hi: bytes, plaintext: bytes) -> bytes:
        """Reference path with a given explicit IV (vectors only: never reuse an IV)."""
        aad = header[:4] + seq_hi + header[4:] if seq_hi else header
        return header + iv + self.encrypt(self.salt + iv, plaintext, aad)

    def open(self, esp: bytes, seq_hi: bytes) -> bytes | None:
        aad = esp[:4] + seq_hi + esp[4:8] if seq_hi else esp[:8]
        try:
            return self.decrypt(self.salt + esp[8:16], esp[16:], aad)
        except InvalidTag:
            return None


def make_transform(encryption: str, encryption_key: bytes, integrity: str | None = None,
                   integrity_key: bytes = b"",
                   random: Callable[[int], bytes] = os.urandom) -> Transform:
    """Build the keyed transform for one SA; ConfigError names any bad name or key length."""
    spec = ENCRYPTION.get(encryption)
    if spec is None:
        raise ConfigError(f"unknown encryption transform {encryption!r}; "
                          f"known: {', '.join(ENCRYPTION)}")
    if len(encryption_key) not in spec.key_sizes:
        raise ConfigError(f"{encryption}: key is {len(encryption_key)} bytes, needs one of "
                          f"{spec.key_sizes} ({spec.rfc})")
    if spec.aead:
        if integrity is not None:
            # RFC 4106 §9 / RFC 7634: combined mode, no separate integrity algorithm
            raise ConfigError(f"{encryption} is an AEAD transform: integrity must be None, "
                              f"not {integrity!r}")
        return Aead(spec, bytes(encryption_key))
    if integrity is None:
        # RFC 8221 §5: ESP encryption without authentication is not allowed here
        raise ConfigError(f"{encryption} needs an integrity transform "
                          f"(one of {', '.join(INTEGRITY)})")
    ispec = INTEGRITY.get(integrity)
    if ispec is None:
        raise ConfigError(f"unknown integrity transform {integrity!r}; "
                          f"known: {', '.join(INTEGRITY)}")
    mac = HmacTruncated(ispec, bytes(integrity_key))
    if spec.name == "ENCR_NULL":
        return NullHmac(spec, mac)
    return CbcHmac(spec, bytes(encryption_key), mac, random)
