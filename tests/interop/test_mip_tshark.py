"""Cross-check our registration messages with Wireshark's independent ``mip`` dissector.

We write a pcap of UDP/434 packets built by our codecs (Scapy's ``wrpcap`` only frames them)
and compare what ``tshark -T fields`` reads with what we meant.  tshark is a Debian package in
our CI image: when CI=true and it is missing, this test fails instead of skipping.
"""

import datetime
import subprocess

import pytest
from scapy.layers.inet import IP, UDP
from scapy.utils import wrpcap

import needs
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.wire.mip import (
    Extension,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    build_registration_reply,
    build_registration_request,
    nai_extension,
)

FIELDS = ["mip.type", "mip.flags", "mip.s", "mip.d", "mip.t", "mip.code", "mip.life",
          "mip.homeaddr", "mip.haaddr", "mip.coa", "mip.ident", "mip.ext.type", "mip.auth.spi",
          "mip.auth.auth", "mip.nai", "_ws.malformed"]


@pytest.fixture(scope="module")
def tshark():
    return needs.tshark()


def dissect(tshark, tmp_path, payloads):
    pcap = tmp_path / "mip.pcap"
    wrpcap(str(pcap), [IP(src=src, dst=dst) / UDP(sport=434, dport=434) / p
                       for src, dst, p in payloads])
    cmd = [tshark, "-r", str(pcap), "-T", "fields", "-E", "separator=|", "-E", "occurrence=a",
           "-E", "aggregator=,"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return [dict(zip(FIELDS, line.split("|"), strict=True)) for line in out.splitlines()]


def ntp_as_wireshark(ident):
    """Wireshark shows the NTP identification as an absolute UTC time (nanoseconds)."""
    seconds = (ident >> 32) - 2_208_988_800
    nanos = ((ident & 0xFFFFFFFF) * 1_000_000_000) >> 32
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return when.strftime("%b %d, %Y %H:%M:%S") + f".{nanos:09d} UTC"


def test_tshark_reads_our_request_and_reply(tshark, tmp_path):
    msa = MobilitySecurityAssociation(0x1000, b"0123456789abcdef")
    rrq_id = 0xE9AA3B8012345678
    rrq = msa.sign(build_registration_request(RegistrationRequest(
        "10.1.0.100", "10.1.0.2", "172.16.1.10", rrq_id, 300,
        RequestFlags.D | RequestFlags.T,
        (nai_extension("mn1@example.net"), Extension(200, b"abc")))))
    rrp_id = 0xE9AA3B8112345678
    rrp = msa.sign(build_registration_reply(RegistrationReply(
        ReplyCode.HA_IDENTIFICATION_MISMATCH, "10.1.0.100", "10.1.0.2", rrp_id, 0)))
    req, rep = dissect(tshark, tmp_path, [("172.16.1.10", "10.1.0.2", rrq),
                                          ("10.1.0.2", "172.16.1.10", rrp)])

    assert req["mip.type"] == "1" and int(req["mip.flags"], 16) == 0x22
    assert (req["mip.s"], req["mip.d"], req["mip.t"]) == ("0", "1", "1")
    assert req["mip.life"] == "300"
    assert (req["mip.homeaddr"], req["mip.haaddr"], req["mip.coa"]) == (
        "10.1.0.100", "10.1.0.2", "172.16.1.10")
    assert req["mip.ident"] == ntp_as_wireshark(rrq_id)
    assert req["mip.ext.type"] == "131,200,32"
    assert req["mip.nai"] == "mn1@example.net"
    assert int(req["mip.auth.spi"], 16) == 0x1000
    assert bytes.fromhex(req["mip.auth.auth"]) == rrq[-16:]
    assert req["_ws.malformed"] == ""

    assert rep["mip.type"] == "3" and rep["mip.code"] == "133" and rep["mip.life"] == "0"
    assert (rep["mip.homeaddr"], rep["mip.haaddr"]) == ("10.1.0.100", "10.1.0.2")
    assert rep["mip.ident"] == ntp_as_wireshark(rrp_id)
    assert rep["mip.ext.type"] == "32" and bytes.fromhex(rep["mip.auth.auth"]) == rrp[-16:]
    assert rep["_ws.malformed"] == ""
