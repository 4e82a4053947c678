"""Proposal text forms, offering and choosing (RFC 7296 §2.7, §3.3)."""

import pytest

from mipsec.errors import ConfigError
from mipsec.ike.codec import Proposal, Transform
from mipsec.ike.constants import DhGroup, Encr, Esn, Integ, ProtocolId, TransformType
from mipsec.ike.proposals import (
    EspSuite,
    accept_esp_answer,
    accept_ike_answer,
    choose_esp,
    choose_ike,
    esp_answer,
    esp_proposals,
    ike_proposals,
    parse_esp_suite,
    parse_ike_suite,
)

T = TransformType


def test_text_forms():
    s = parse_ike_suite("aes256-sha256-prfsha256-ecp256")
    assert (s.encr, s.key_bits, s.integ, s.dh) == (Encr.ENCR_AES_CBC, 256,
                                                   Integ.AUTH_HMAC_SHA2_256_128, DhGroup.ECP_256)
    g = parse_ike_suite("aes128gcm16-x25519")
    assert g.aead and g.integ == Integ.NONE and g.dh == DhGroup.CURVE25519
    e = parse_esp_suite("aes128-sha256-modp2048")
    assert e == EspSuite(Encr.ENCR_AES_CBC, 128, Integ.AUTH_HMAC_SHA2_256_128, DhGroup.MODP_2048)
    assert e.encryption_name == "ENCR_AES_CBC" and e.integrity_name == "AUTH_HMAC_SHA2_256_128"
    assert parse_esp_suite("aes256gcm16").keymat_lengths() == (36, 0)
    for bad in ("aes256-ecp256", "aes128gcm16-sha256-ecp256", "des-sha1-ecp256", "aes256-sha256"):
        with pytest.raises(ConfigError):
            parse_ike_suite(bad)
    with pytest.raises(ConfigError):
        parse_esp_suite("aes128")


def test_responder_takes_the_first_acceptable_peer_proposal():
    ours = [parse_ike_suite("aes128gcm16-x25519"), parse_ike_suite("aes256-sha256-ecp256")]
    offered = ike_proposals([parse_ike_suite("aes256-sha256-modp2048"),
                             parse_ike_suite("aes256-sha256-ecp256"),
                             parse_ike_suite("aes128gcm16-x25519")])
    answer, suite = choose_ike(offered, ours)
    assert suite == parse_ike_suite("aes256-sha256-ecp256") and answer.number == 2
    assert accept_ike_answer((answer,), [parse_ike_suite("aes256-sha256-ecp256")]) == suite
    assert accept_ike_answer((answer,), ours[:1]) is None
    assert choose_ike(ike_proposals([parse_ike_suite("aes256-sha256-modp2048")]), ours) is None


def test_a_proposal_with_several_transforms_of_a_type():
    # strongSwan-style: one proposal listing alternatives per type
    offered = (Proposal(1, ProtocolId.IKE, b"", (
        Transform(T.ENCR, Encr.ENCR_AES_CBC, 128), Transform(T.ENCR, Encr.ENCR_AES_CBC, 256),
        Transform(T.PRF, 5), Transform(T.INTEG, 12),
        Transform(T.DH, 31), Transform(T.DH, 19))),)
    answer, suite = choose_ike(offered, [parse_ike_suite("aes256-sha256-ecp256")])
    assert suite.key_bits == 256 and suite.dh == DhGroup.ECP_256
    assert len(answer.transforms) == 4                       # one of each type


def test_esp_choice_ignores_dh_in_ike_auth_and_requires_it_in_create_child_sa():
    ours = [parse_esp_suite("aes128-sha256")]
    offered = esp_proposals([parse_esp_suite("aes128-sha256-ecp256")], b"\x01\x02\x03\x04", True)
    peer, suite = choose_esp(offered, ours, None)            # IKE_AUTH: DH ignored (§1.2)
    assert suite.dh == DhGroup.NONE
    peer, suite = choose_esp(offered, ours, DhGroup.ECP_256)  # CREATE_CHILD_SA with KE 19
    assert suite.dh == DhGroup.ECP_256
    assert choose_esp(offered, ours, DhGroup.MODP_2048) is None
    assert choose_esp(offered, ours, 0) is None              # PFS required but no KE sent
    answer = esp_answer(peer, suite, b"\xaa\xbb\xcc\xdd")
    assert answer.spi == b"\xaa\xbb\xcc\xdd" and answer.number == peer.number
    assert accept_esp_answer((answer,), ours, DhGroup.ECP_256) == suite


def test_esn_only_peer_gets_esn():
    offered = (Proposal(1, ProtocolId.ESP, b"\x01\x02\x03\x04", (
        Transform(T.ENCR, Encr.ENCR_AES_GCM_16, 256), Transform(T.ESN, Esn.ESN))),)
    _, suite = choose_esp(offered, [parse_esp_suite("aes256gcm16")], None)
    assert suite.esn is True


def test_wrong_esp_spi_size_is_not_chosen():
    offered = esp_proposals([parse_esp_suite("aes256gcm16")], b"\x01\x02\x03", False)
    assert choose_esp(offered, [parse_esp_suite("aes256gcm16")], None) is None
