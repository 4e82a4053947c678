"""Interoperability: mipsec against Scapy's ``scapy.layers.ipsec`` in both directions, for every
transform both implement, raw ESP and UDP-encapsulated (RFC 3948, Scapy's ``nat_t_header``),
with and without extended sequence numbers; and against tshark's ESP decryption."""

from __future__ import annotations

import os
import subprocess

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.utils import wrpcap

import needs
from mipsec.drops import DropReason
from mipsec.errors import Dropped
from mipsec.ipsec.sa import Direction, SecurityAssociation, UdpEncap, esp_sa_uat_record
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4

MN, GW = "172.16.1.10", "172.16.0.1"
SCAPY_NAMES = {
    "ENCR_AES_CBC": "AES-CBC", "ENCR_AES_GCM_16": "AES-GCM",
    "ENCR_CHACHA20_POLY1305": "CHACHA20-POLY1305", "ENCR_NULL": "NULL",
    "AUTH_HMAC_SHA1_96": "HMAC-SHA1-96", "AUTH_HMAC_SHA2_256_128": "SHA2-256-128",
    "AUTH_HMAC_SHA2_384_192": "SHA2-384-192", "AUTH_HMAC_SHA2_512_256": "SHA2-512-256",
}
KEY_SIZES = {"AUTH_HMAC_SHA1_96": 20, "AUTH_HMAC_SHA2_256_128": 32,
             "AUTH_HMAC_SHA2_384_192": 48, "AUTH_HMAC_SHA2_512_256": 64}
TRANSFORMS = (
    [("ENCR_AES_CBC", k, a) for k in (16, 24, 32) for a in KEY_SIZES]
    + [("ENCR_AES_GCM_16", 20, None), ("ENCR_AES_GCM_16", 36, None),
       ("ENCR_CHACHA20_POLY1305", 36, None)]
    + [("ENCR_NULL", 0, a) for a in KEY_SIZES]
)
IDS = [f"{e}-{k}-{a}" for e, k, a in TRANSFORMS]


def _inner(n: int) -> bytes:
    payload = bytes((i * 7 + n) & 0xFF for i in range(n))
    udp = (5000).to_bytes(2, "big") + (6000).to_bytes(2, "big") \
        + (8 + n).to_bytes(2, "big") + b"\x00\x00" + payload
    return build_ipv4(Ipv4Header("10.1.0.100", "10.1.0.10", 17, identification=n), udp)


def _setup(enc, ek, integ, udp, esn_high):
    key = os.urandom(ek)
    ikey = os.urandom(KEY_SIZES[integ]) if integ else b""
    common = dict(encryption=enc, encryption_key=key, integrity=integ, integrity_key=ikey,
                  esn=esn_high is not None, udp_encap=UdpEncap() if udp else None)
    ours_out = SecurityAssociation(spi=0x2001, direction=Direction.OUTBOUND, local=MN,
                                   remote=GW, **common)
    ours_in = SecurityAssociation(spi=0x2001, direction=Direction.INBOUND, local=GW,
                                  remote=MN, **common)
    crypt_key = key or None
    theirs = ScapySA(
        ESP, spi=0x2001, crypt_algo=SCAPY_NAMES[enc], crypt_key=crypt_key,
        auth_algo=SCAPY_NAMES[integ] if integ else None, auth_key=ikey or None,
        tunnel_header=IP(src=MN, dst=GW), nat_t_header=UDP(sport=4500, dport=4500) if udp
        else None, esn_en=esn_high is not None, esn=esn_high or 0)
    return ours_out, ours_in, theirs


@pytest.mark.parametrize("esn_high", [None, 3], ids=["seq32", "esn"])
@pytest.mark.parametrize("udp", [False, True], ids=["raw", "udp"])
@pytest.mark.parametrize("enc, ek, integ", TRANSFORMS, ids=IDS)
def test_both_directions(enc, ek, integ, udp, esn_high):
    ours_out, ours_in, theirs = _setup(enc, ek, integ, udp, esn_high)
    high = esn_high or 0
    ours_out.sequence = (high << 32) + 40                  # next packet: low half 41
    ours_in.replay.update((high << 32) + 30)               # the receiver saw earlier traffic
    for n in (0, 1, 13, 64, 200):
        inner = _inner(n)
        # mipsec -> Scapy
        packet = ours_out.encapsulate(inner)
        decrypted = theirs.decrypt(IP(packet))
        assert bytes(decrypted) == inner, f"Scapy could not read our {n}-byte packet"
        # Scapy -> mipsec (Scapy numbers from 50 upwards in the same subspace)
        theirs_packet = theirs.encrypt(IP(inner), seq_num=50 + n)
        assert ours_in.decapsulate(bytes(theirs_packet)) == inner
    assert ours_in.counters.packets == 5 and not ours_in.counters.drops


def test_scapy_tampered_packets_are_refused_by_reason():
    ours_out, ours_in, theirs = _setup("ENCR_AES_CBC", 16, "AUTH_HMAC_SHA2_256_128", True,
                                       None)
    packet = bytearray(bytes(theirs.encrypt(IP(_inner(20)), seq_num=7)))
    packet[-1] ^= 0x80
    with pytest.raises(Dropped) as info:
        ours_in.decapsulate(bytes(packet))
    assert info.value.reason is DropReason.ICV_MISMATCH


# --- tshark (Wireshark 4.0) as a third implementation --------------------------------------------
def test_tshark_decrypts_with_our_esp_sa_entries(tmp_path):
    tshark = needs.tshark()
    cases = [("ENCR_AES_CBC", 16, "AUTH_HMAC_SHA1_96", False),
             ("ENCR_AES_CBC", 32, "AUTH_HMAC_SHA2_256_128", True),
             ("ENCR_AES_GCM_16", 20, None, False),
             ("ENCR_NULL", 0, "AUTH_HMAC_SHA2_512_256", False)]
    packets, options = [], []
    for index, (enc, ek, integ, udp) in enumerate(cases):
        key = os.urandom(ek)
        ikey = os.urandom(KEY_SIZES[integ]) if integ else b""
        sa = SecurityAssociation(spi=0x3000 + index, direction=Direction.OUTBOUND, local=MN,
                                 remote=GW, encryption=enc, encryption_key=key,
                                 integrity=integ, integrity_key=ikey,
                                 udp_encap=UdpEncap() if udp else None)
        packets.append(sa.encapsulate(_inner(100 + index)))
        record = esp_sa_uat_record(sa.tshark_esp_sa_entry())
        options += ["-o", f"uat:esp_sa:{record}"]
    pcap = tmp_path / "esp.pcap"
    wrpcap(str(pcap), [IP(p) for p in packets])
    result = subprocess.run(
        [tshark, "-n", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE",
         "-o", "esp.enable_authentication_check:TRUE", *options,
         "-T", "fields", "-E", "separator=|", "-e", "esp.spi", "-e", "ip.src",
         "-e", "ip.id", "-e", "udp.dstport", "-e", "esp.icv_good", "-e", "esp.pad_len",
         "-e", "esp.protocol"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(cases)
    for index, line in enumerate(lines):
        spi, sources, ids, dports, icv_good, pad_len, next_header = line.split("|")
        assert int(spi, 16) == 0x3000 + index
        # the inner header (source 10.1.0.100, id 100 + index) is only visible if decrypted
        assert "10.1.0.100" in sources.split(","), line
        assert 100 + index in [int(i, 16) for i in ids.split(",")], line
        assert "6000" in dports.split(","), line
        assert icv_good in ("1", "True"), line          # tshark verified our ICV
        assert int(next_header, 0) == 4, line              # RFC 4303 §2.6: IPv4 in tunnel mode
        assert pad_len != "", line
