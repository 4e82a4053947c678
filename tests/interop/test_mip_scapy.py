"""Cross-check our RRQ/RRP codecs with Scapy's independent ``scapy.layers.mobileip``."""

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.mobileip import MobileIP, MobileIPRRP, MobileIPRRQ
from scapy.packet import Raw

from levels import examples
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.wire.mip import (
    RegistrationReply,
    RegistrationRequest,
    RequestFlags,
    build_registration_reply,
    build_registration_request,
    nai_extension,
    parse_registration_reply,
    parse_registration_request,
)

addresses = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
MSA = MobilitySecurityAssociation(0x1000, b"0123456789abcdef")


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(0, 255), st.integers(0, 65535), addresses, addresses, addresses,
       st.integers(0, 2**64 - 1))
def test_scapy_built_request_parses(flags, life, home, ha, coa, ident):
    raw = bytes(MobileIP(type=1) / MobileIPRRQ(flags=flags, lifetime=life, homeaddr=home,
                                               haaddr=ha, coaddr=coa, id=ident))
    rrq = parse_registration_request(raw)
    assert (int(rrq.flags), rrq.lifetime, rrq.home_address, rrq.home_agent,
            rrq.care_of_address, rrq.identification) == (flags, life, home, ha, coa, ident)


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(0, 255), st.integers(0, 65535), addresses, addresses,
       st.integers(0, 2**64 - 1))
def test_scapy_built_reply_parses(code, life, home, ha, ident):
    raw = bytes(MobileIP(type=3) / MobileIPRRP(code=code, lifetime=life, homeaddr=home,
                                               haaddr=ha, id=ident))
    rrp = parse_registration_reply(raw)
    assert (int(rrp.code), rrp.lifetime, rrp.home_address, rrp.home_agent,
            rrp.identification) == (code, life, home, ha, ident)


def test_our_signed_request_dissected_by_scapy_over_udp_434():
    payload = MSA.sign(build_registration_request(RegistrationRequest(
        "10.1.0.100", "10.1.0.2", "172.16.1.10", 0xE9AA3B8012345678, 300,
        RequestFlags.D | RequestFlags.T, (nai_extension("mn1@example.net"),))))
    pkt = IP(bytes(IP(src="172.16.1.10", dst="10.1.0.2") / UDP(sport=434, dport=434) / payload))
    rrq = pkt[MobileIPRRQ]
    assert pkt[MobileIP].type == 1
    assert (rrq.flags, rrq.lifetime, rrq.homeaddr, rrq.haaddr, rrq.coaddr, rrq.id) == (
        0x22, 300, "10.1.0.100", "10.1.0.2", "172.16.1.10", 0xE9AA3B8012345678)
    # Scapy does not dissect extensions: they are the Raw tail, byte for byte ours
    assert bytes(pkt[Raw]) == payload[24:]
    assert MSA.verify(bytes(pkt[MobileIP])).nai == "mn1@example.net"


def test_our_reply_dissected_by_scapy():
    payload = MSA.sign(build_registration_reply(RegistrationReply(
        133, "10.1.0.100", "10.1.0.2", 0xE9AA3B8112345678, 0)))
    pkt = UDP(bytes(UDP(sport=434, dport=434) / payload))
    rrp = pkt[MobileIPRRP]
    assert (rrp.code, rrp.lifetime, rrp.homeaddr, rrp.haaddr, rrp.id) == (
        133, 0, "10.1.0.100", "10.1.0.2", 0xE9AA3B8112345678)
