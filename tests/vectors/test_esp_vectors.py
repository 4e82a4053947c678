"""Published vectors through mipsec's transforms and SA, each with its source.

* RFC 3602 §4 cases 1-4 (AES-CBC) and 5-8 (ESP packets with AES-CBC, no ICV);
* RFC 2202 §3 (HMAC-SHA-1) and RFC 4231 §4 (HMAC-SHA-256/384/512) through our keyed-state
  HMAC, full and truncated to the ESP ICV length (RFC 2404 §3, RFC 4868 §2.1.1);
* RFC 4868 §2.7.2.1 (HMAC-SHA-256 with the 32-byte ESP key size);
* draft-mcgrew-gcm-test-01 §4 (AES-GCM in ESP, RFC 4106), with and without ESN AAD;
* RFC 7634 Appendix A (ChaCha20-Poly1305 ESP tunnel-mode packet), through the whole SA.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mipsec.crypto.transforms import INTEGRITY, Aead, CbcHmac, HmacTruncated, make_transform
from mipsec.ipsec.sa import Direction, SecurityAssociation
from mipsec.wire.esp import build_trailer, parse_trailer
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4

h = bytes.fromhex

# --- RFC 3602 §4, cases 1-4: key, IV, plaintext, ciphertext ------------------------------------
RFC3602_CBC = [
    ("06a9214036b8a15b512e03d534120006", "3dafba429d9eb430b422da802c9fac41",
     b"Single block msg", "e353779c1079aeb82708942dbe77181a"),
    ("c286696d887c9aa0611bbb3e2025a45a", "562e17996d093d28ddb3ba695a2e6f58",
     h("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"),
     "d296cd94c2cccf8a3a863028b5e1dc0a7586602d253cfff91b8266bea6d61ab1"),
    ("6c3ea0477630ce21a2ce334aa746c2cd", "c782dc4c098c66cbd9cd27d825682c81",
     b"This is a 48-byte message (exactly 3 AES blocks)",
     "d0a02b3836451753d493665d33f0e8862dea54cdb293abc7506939276772f8d5"
     "021c19216bad525c8579695d83ba2684"),
    ("56e47a38c5598974bc46903dba290349", "8ce82eefbea0da3c44699ed7db51b7d9",
     h("a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
       "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"),
     "c30e32ffedc0774e6aff6af0869f71aa0f3af07a9a31a9c684db207eb0ef8e4e"
     "35907aa632c3ffdf868bb7b29d3d46ad83ce9f9a102ee99d49a53e87f4c3da55"),
]

# --- RFC 3602 §4, cases 5-8: key, ESP packet (SPI, seq, IV, ciphertext), payload, next header --
RFC3602_ESP = [
    ("90d382b410eeba7ad938c46cec1a82bf",
     "0000432100000001e96e8c08ab465763fd098d45dd3ff893f663c25d325c18c6a9453e194e120849"
     "a4870b66cc6b9965330013b4898dc856a4699e523a55db080b59ec3a8e4b7e52775b07d1db34ed9c"
     "538ab50c551b874aa269add047ad2d5913ac19b7cfbad4a6",
     "08000ebda70a00008e9c083db95b070008090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
     "202122232425262728292a2b2c2d2e2f3031323334353637", 1),
    ("90d382b410eeba7ad938c46cec1a82bf",
     "000043210000000869d08df7d203329db093fc4924e5bd80f51995881ec4e0c4488987ce742e8109"
     "689bb379d2d750c0d915dca346a89f75",
     "0800b5e8a80a0500a69c083d0b660e00777777777777777777777777", 1),
    ("0123456789abcdef0123456789abcdef",
     "0000876500000002f4e765244f6407adf13dc1380f673f37773b5241a4c449225e4f3ce5ed611b0c"
     "237ca96cf74a93013c1b0ea1a0cf70f8e4ecaec78ac53aad7a0f022b859243c647752e94a859352b"
     "8a4d4d2decd136e5c177f132ad3fbfb2201ac9904c74ee0a109e0ca1e4dfe9d5a100b842f1c22f0d",
     "45000054090400004001f988c0a87b03c0a87bc808009f76a90a0100b49c083d02a2040008090a0b"
     "0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f30313233"
     "34353637", 4),
    ("0123456789abcdef0123456789abcdef",
     "000087650000000585d47224b5f3dd5d2101d4ea8dffab2215b92683819596a8047232cc00f7048f"
     "e45318e11f8a0f62ede3c3fc61203bb50f980a08c9843fd3a1b06d5c07ff9639b7eb7dfb3512e5de"
     "435e7207ed971ef3d2726d9b5ef6affc6d17a0decbb13892",
     "45000044090c00004001f990c0a87b03c0a87bc80800d63caa0a0200c69c083da3de0300ffffffff"
     "ffffffffffffffffffffffffffffffffffffffffffffffffffffffff", 4),
]


def _cbc_transform(key: bytes) -> CbcHmac:
    t = make_transform("ENCR_AES_CBC", key, "AUTH_HMAC_SHA1_96", bytes(20))
    assert isinstance(t, CbcHmac)
    return t


def _warm_up(t: CbcHmac) -> None:
    """Put unrelated traffic through the persistent contexts first: the vectors must still
    come out right (the chaining state is irrelevant by construction)."""
    t.encrypt_update(bytes(range(48)))
    t.decrypt_update(bytes(range(64)))


@pytest.mark.parametrize("key, iv, plaintext, ciphertext", RFC3602_CBC)
def test_rfc3602_cbc_cases_1_to_4(key, iv, plaintext, ciphertext):
    t = _cbc_transform(h(key))
    _warm_up(t)
    # decryption: the persistent decryptor, fed IV || C, first block dropped
    assert t.decrypt_update(h(iv) + h(ciphertext))[16:] == plaintext
    # encryption with the given IV (reference path); ciphertext sits after header and IV
    sealed = t.seal_with_iv(b"\x00" * 8, h(iv), b"", plaintext)
    assert sealed[8:24] == h(iv)
    assert sealed[24:-12] == h(ciphertext)


@pytest.mark.parametrize("key, packet, payload, next_header", RFC3602_ESP)
def test_rfc3602_esp_cases_5_to_8(key, packet, payload, next_header):
    t = _cbc_transform(h(key))
    _warm_up(t)
    esp = h(packet)
    plaintext = t.decrypt_update(esp[8:])[16:]
    assert parse_trailer(plaintext) == (h(payload), next_header)
    # the other direction: our default padding (RFC 4303 §2.4) reproduces the packet
    trailer = build_trailer(len(h(payload)), 16, next_header)
    assert t.seal_with_iv(esp[:8], esp[8:24], b"", h(payload) + trailer)[:-12] == esp


def test_persistent_cbc_encryptor_is_cbc_under_the_sent_iv():
    """The fast path's claim: output after C0 is exactly CBC with IV = C0 (fresh context)."""
    key = h("56e47a38c5598974bc46903dba290349")
    t = _cbc_transform(key)
    _warm_up(t)
    plaintext = bytes(range(64))
    sealed = t.seal(b"\x00\x00\x10\x00\x00\x00\x00\x01", 1, b"", plaintext)
    iv, ciphertext = sealed[8:24], sealed[24:-12]
    fresh = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    assert fresh.update(plaintext) + fresh.finalize() == ciphertext
    assert t.open(sealed, b"") == plaintext


# --- HMAC -------------------------------------------------------------------------------------
_DATA7_4231 = (b"This is a test using a larger than block-size key and a larger than "
               b"block-size data. The key needs to be hashed before being used by the HMAC "
               b"algorithm.")
# RFC 2202 §3: HMAC-SHA-1 test cases 1-7 (key, data, digest)
RFC2202 = [
    (b"\x0b" * 20, b"Hi There", "b617318655057264e28bc0b6fb378c8ef146be00"),
    (b"Jefe", b"what do ya want for nothing?", "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"),
    (b"\xaa" * 20, b"\xdd" * 50, "125d7342b9ac11cd91a39af48aa17b4f63f175d3"),
    (bytes(range(1, 26)), b"\xcd" * 50, "4c9007f4026250c6bc8414f9bf50c86c2d7235da"),
    (b"\x0c" * 20, b"Test With Truncation", "4c1a03424b55e07fe7f27be1d58bb9324a9a5a04"),
    (b"\xaa" * 80, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "aa4ae5e15272d00e95705637ce8a3b55ed402112"),
    (b"\xaa" * 80,
     b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data",
     "e8e99d0f45237d786d6bbaa7965c7808bbff1a91"),
]
# RFC 4231 §4.2-4.8: test cases 1-4, 6, 7 (key, data, SHA-256, SHA-384, SHA-512)
RFC4231 = [
    (b"\x0b" * 20, b"Hi There",
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
     "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
     "faea9ea9076ede7f4af152e8b2fa9cb6",
     "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
     "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854"),
    (b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
     "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
     "8e2240ca5e69e2c78b3239ecfab21649",
     "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
     "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"),
    (b"\xaa" * 20, b"\xdd" * 50,
     "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
     "88062608d3e6ad8a0aa2ace014c8a86f0aa635d947ac9febe83ef4e55966144b"
     "2a5ab39dc13814b94e3ab6e101a34f27",
     "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39"
     "bf3e848279a722c806b485a47e67c807b946a337bee8942674278859e13292fb"),
    (bytes(range(1, 26)), b"\xcd" * 50,
     "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
     "3e8a69b7783c25851933ab6290af6ca77a9981480850009cc5577c6e1f573b4e"
     "6801dd23c4a7d679ccf8a386c674cffb",
     "b0ba465637458c6990e5a8c5f61d4af7e576d97ff94b872de76f8050361ee3db"
     "a91ca5c11aa25eb4d679275cc5788063a5f19741120c4f2de2adebeb10a298dd"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
     "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c6"
     "0c2ef6ab4030fe8296248df163f44952",
     "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f352"
     "6b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598"),
    (b"\xaa" * 131, _DATA7_4231,
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
     "6617178e941f020d351e2f254e8fd32c602420feb0b8fb9adccebb82461e99c5"
     "a678cc31e799176d3860e6110c46523e",
     "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944"
     "b6022cac3c4982b10d5eeb55c3e4de15134676fb6de0446065c97440fa8c6a58"),
]


@pytest.mark.parametrize("key, data, digest", RFC2202)
def test_rfc2202_hmac_sha1_and_its_96_bit_truncation(key, data, digest):
    mac = HmacTruncated(INTEGRITY["AUTH_HMAC_SHA1_96"], key, any_key_length=True)
    assert mac.full_mac(data) == h(digest)
    assert mac.mac(data) == h(digest)[:12]                 # RFC 2404 §2: first 96 bits
    # the ESN high half is authenticated as if appended to the data (RFC 4303 §2.2.1)
    assert mac.mac(data[:5], data[5:]) == h(digest)[:12]


@pytest.mark.parametrize("key, data, d256, d384, d512", RFC4231)
def test_rfc4231_hmac_sha2_and_rfc4868_truncation(key, data, d256, d384, d512):
    for name, digest, icv in (("AUTH_HMAC_SHA2_256_128", d256, 16),
                              ("AUTH_HMAC_SHA2_384_192", d384, 24),
                              ("AUTH_HMAC_SHA2_512_256", d512, 32)):
        mac = HmacTruncated(INTEGRITY[name], key, any_key_length=True)
        assert mac.full_mac(data) == h(digest)
        assert mac.mac(data) == h(digest)[:icv]            # RFC 4868 §2.3: leftmost bits


def test_rfc4231_case5_truncation():
    """RFC 4231 §4.6 publishes only the leftmost 128 bits."""
    for name, digest in (("AUTH_HMAC_SHA2_256_128", "a3b6167473100ee06e0c796c2955552b"),
                         ("AUTH_HMAC_SHA2_384_192", "3abf34c3503b2a23a46efc619baef897"),
                         ("AUTH_HMAC_SHA2_512_256", "415fad6271580a531d4179bc891d87a6")):
        mac = HmacTruncated(INTEGRITY[name], b"\x0c" * 20, any_key_length=True)
        assert mac.full_mac(b"Test With Truncation")[:16] == h(digest)


# RFC 4868 §2.7.2.1: HMAC-SHA-256 with a 32-byte key, the size ESP uses
RFC4868_SHA256 = [
    (b"\x0b" * 32, b"Hi There",
     "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"),
    (b"Jefe" * 8, b"what do ya want for nothing?",
     "167f928588c5cc2eef8e3093caa0e87c9ff566a14794aa61648d81621a2a40c6"),
    (b"\xaa" * 32, b"\xdd" * 50,
     "cdcb1220d1ecccea91e53aba3092f962e549fe6ce9ed7fdc43191fbde45c30b0"),
]


@pytest.mark.parametrize("key, data, digest", RFC4868_SHA256)
def test_rfc4868_esp_sized_keys_through_the_cbc_transform(key, data, digest):
    t = make_transform("ENCR_AES_CBC", bytes(16), "AUTH_HMAC_SHA2_256_128", key)
    assert t.hmac.mac(data) == h(digest)[:16]


# --- draft-mcgrew-gcm-test-01 §4: key, salt, SPI/seq (AAD), IV, plaintext, ciphertext+tag -----
GCM_ESP = [
    # 128-bit key, 64-bit extended sequence number 0x87654321_00000000 (12-byte AAD)
    ("4c80cdefbb5d10da906ac73c3613a634", "2e443b68", "000043218765432100000000",
     "4956ed7e3b244cfe",
     "45000048699a000080114db7c0a80102c0a801010a9bf15638d301000001000000000000045f736970"
     "045f756470037369700963796265726369747902646b000021000101020201",
     "fecf537e729d5b07dc30df528dd22b768d1b98736696a6fd348509fa13ceac34cfa2436f14a3f3cf"
     "65925bf1f4a13c5d15b21e1884f5ff6247aeabb786b93bce61bc17d768fd9732"
     "459018148f6cbe722fd04796562dfdb4"),
    # 128-bit key, 32-bit sequence number (8-byte AAD)
    ("feffe9928665731c6d6a8f9467308308", "cafebabe", "0000a5f80000000a", "facedbaddecaf888",
     "4500003e698f000080114dccc0a80102c0a801010a980035002a2343b2d0010000010000000000000373"
     "69700963796265726369747902646b00000100010001",
     "deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c3de81827c10e9a4f"
     "51330d0eec416642cfbb85a5b47e48a4ec3b9ba95d918bd183b70d3aa8bc6ee4c309e9d85a41ad4a"),
    # 256-bit key, 32-bit sequence number
    ("abbccddef00112233445566778899aababbccddef00112233445566778899aab", "11223344",
     "4a2cbfe300000002", "0102030405060708",
     "4500003069a6400080062690c0a801029389155e0a9e008b2dc57ee0000000007002400020bf000002"
     "0405b40101040201020201",
     "ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763748a637985771d34"
     "7f0545659f14e99def842d8eb335f4eecfdbf831824b4c4915956c96"),
    # 128-bit key, extended sequence number whose high half is 0 (12-byte AAD)
    ("abbccddef00112233445566778899aab", "decaf888", "000001000000000000000001",
     "cafedebaceface74",
     "4500004933ba00007f119106c3fb1d10c2b1d326c02831ce0035dd7b800302d500004e20001e8c18d7"
     "5b81dc91baa0476b91b924b280389d92c963bac046ec959b6266c04722b14923010101",
     "18a6fd42f72cbf4ab2a2ea901f73d814e3e7f243d95412e1c349c1d2fbec168f9190feebaf2cb019"
     "84e65863965d7472b79da345e0e780191f0d2f0e0f496c226f2127b27db35724e7845d68"
     "651f57e65f354f75ff17015769623436"),
]


@pytest.mark.parametrize("key, salt, aad, iv, plaintext, sealed", GCM_ESP)
def test_gcm_esp_vectors_both_directions(key, salt, aad, iv, plaintext, sealed):
    t = make_transform("ENCR_AES_GCM_16", h(key + salt))
    assert isinstance(t, Aead)
    aad = h(aad)
    if len(aad) == 12:       # ESN: AAD = SPI || seq high || seq low (RFC 4106 §5)
        header, seq_hi = aad[:4] + aad[8:], aad[4:8]
    else:                    # AAD = SPI || seq (RFC 4106 §5)
        header, seq_hi = aad, b""
    esp = header + h(iv) + h(sealed)
    assert t.seal_with_iv(header, h(iv), seq_hi, h(plaintext)) == esp
    assert t.open(esp, seq_hi) == h(plaintext)
    # the wrong AAD form (ESN left out or added) must not verify
    assert t.open(esp, b"" if seq_hi else b"\x00\x00\x00\x00") is None


# --- RFC 7634 Appendix A: ChaCha20-Poly1305 ESP, tunnel mode, SPI 0x01020304, seq 5 -----------
RFC7634_KEY = h("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f") + h("a0a1a2a3")
RFC7634_IV = h("1011121314151617")
RFC7634_INNER = h(
    "45000054a6f200004001e778c6336405c000020508005b7a3a080000553bec100007362708090a0b0c0d"
    "0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637")
RFC7634_SEALED = h(
    "24039428b97f417e3c13753a4f05087b67c352e6a7fab1b982d466ef407ae5c614ee8099d52844eb61aa"
    "95dfab4c02f72aa71e7c4c4f64c9befe2facc638e8f3cbec163fac469b502773f6fb94e664da9165b828"
    "29f641e0" "76aaa8266b7fb0f7b11b369907e1ad43")


def test_rfc7634_appendix_a_transform_both_directions():
    t = make_transform("ENCR_CHACHA20_POLY1305", RFC7634_KEY)
    header = h("0102030400000005")
    plaintext = RFC7634_INNER + h("01020204")     # padding 1 2, pad length 2, next header 4
    esp = header + RFC7634_IV + RFC7634_SEALED
    assert t.seal_with_iv(header, RFC7634_IV, b"", plaintext) == esp
    assert t.open(esp, b"") == plaintext


def test_rfc7634_appendix_a_through_the_inbound_sa():
    """The published ESP payload inside an outer IPv4 header decapsulates to the inner packet."""
    esp = h("0102030400000005") + RFC7634_IV + RFC7634_SEALED
    outer = build_ipv4(Ipv4Header("203.0.113.153", "192.0.2.153", 50, ttl=64), esp)
    sa = SecurityAssociation(spi=0x01020304, direction=Direction.INBOUND,
                             encryption="ENCR_CHACHA20_POLY1305", encryption_key=RFC7634_KEY,
                             local="192.0.2.153", remote="203.0.113.153")
    assert sa.decapsulate(outer) == RFC7634_INNER
    assert sa.replay.top == 5
    assert sa.counters.packets == 1 and sa.counters.octets == len(RFC7634_INNER)
