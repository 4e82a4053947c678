"""The capture writer and the esp_sa key file, checked by tshark itself: every ESP packet of the
capture decrypts with a good ICV, for each transform Wireshark 4.0 knows."""

from __future__ import annotations

import os

import pytest

from mipsec.io.pcap import EspSaEntry, PcapWriter, entry_from_sa, read_pcap, write_esp_sa_file
from mipsec.io.transports import build_udp_packet
from mipsec.ipsec.sa import Direction, SecurityAssociation

import needs


CASES = [
    ("ENCR_AES_GCM_16", 20, None, 0),
    ("ENCR_AES_GCM_16", 36, None, 0),
    ("ENCR_AES_CBC", 16, "AUTH_HMAC_SHA1_96", 20),
    ("ENCR_AES_CBC", 32, "AUTH_HMAC_SHA2_256_128", 32),
    ("ENCR_NULL", 0, "AUTH_HMAC_SHA2_512_256", 64),
]


def _sa(spi, enc, klen, integ, ilen, local, remote):
    return SecurityAssociation(spi=spi, direction=Direction.OUTBOUND, encryption=enc,
                               encryption_key=bytes((spi + i) & 0xFF for i in range(klen)),
                               integrity=integ,
                               integrity_key=bytes((spi * 3 + i) & 0xFF for i in range(ilen)),
                               local=local, remote=remote)


def test_pcap_header_and_records_round_trip(tmp_path):
    w = PcapWriter(tmp_path / "x.pcap")
    w.write(b"\x45" + b"\0" * 19, 1.25)
    w.write(b"\x45" + b"\1" * 39, 2.5)
    w.close()
    assert read_pcap(tmp_path / "x.pcap") == [(1.25, b"\x45" + b"\0" * 19),
                                              (2.5, b"\x45" + b"\1" * 39)]


def _one_packet(path, sa):
    """A capture of one ESP packet from ``sa`` (MN to CN, UDP "up")."""
    w = PcapWriter(path)
    w.write(sa.encapsulate(build_udp_packet("10.1.0.100", 1, "10.1.0.10", 2, b"up")), 5.0)
    w.close()
    return path


def test_tshark_decodes_every_esp_packet_with_a_good_icv(tmp_path):
    tshark = needs.tshark()
    pcap, keys = tmp_path / "gw.pcap", tmp_path / "gw.pcap.esp_sa"
    writer = PcapWriter(pcap)
    entries = []
    for n, (enc, klen, integ, ilen) in enumerate(CASES):
        spi = 0x1000 + n
        sa = _sa(spi, enc, klen, integ, ilen, "172.16.0.1", "172.16.1.10")
        entries.append(EspSaEntry(spi=spi, encryption=enc, encryption_key=sa._encryption_key,
                                  integrity=integ, integrity_key=sa._integrity_key))
        for i in range(3):
            inner = build_udp_packet("10.1.0.10", 5001, "10.1.0.100", 5001, b"m%d-%d" % (n, i))
            writer.write(sa.encapsulate(inner), 1000.0 + n + i / 10)
    writer.close()
    write_esp_sa_file(keys, entries)
    rows = needs.tshark_fields(tshark, pcap, keys, ["esp.spi", "esp.icv_good", "udp.dstport",
                                                    "ip.dst"])
    assert len(rows) == 3 * len(CASES)
    for spi, icv_good, dport, dst in rows:
        assert icv_good == "1", rows
        assert dport == "5001" and dst.endswith("10.1.0.100"), rows


def test_key_file_made_from_the_sa_itself_also_works(tmp_path):
    tshark = needs.tshark()
    sa = _sa(0x2000, "ENCR_AES_CBC", 16, "AUTH_HMAC_SHA1_96", 20, "172.16.1.10", "172.16.0.1")
    pcap, keys = _one_packet(tmp_path / "mn.pcap", sa), tmp_path / "mn.esp_sa"
    write_esp_sa_file(keys, [entry_from_sa(sa)])
    assert needs.tshark_fields(tshark, pcap, keys, ["esp.icv_good"]) == [["1"]]


def test_a_wrong_key_is_seen_as_a_bad_icv(tmp_path):
    """The check above can fail: with a wrong integrity key tshark reports the ICV bad."""
    tshark = needs.tshark()
    sa = _sa(0x3000, "ENCR_AES_CBC", 16, "AUTH_HMAC_SHA1_96", 20, "172.16.1.10", "172.16.0.1")
    pcap, keys = _one_packet(tmp_path / "bad.pcap", sa), tmp_path / "bad.esp_sa"
    write_esp_sa_file(keys, [EspSaEntry(spi=0x3000, encryption="ENCR_AES_CBC",
                                        encryption_key=sa._encryption_key,
                                        integrity="AUTH_HMAC_SHA1_96", integrity_key=b"\0" * 20)])
    assert needs.tshark_fields(tshark, pcap, keys, ["esp.icv_good", "esp.icv_bad"]) == [["0", "1"]]


def test_key_file_lines_have_wiresharks_format(tmp_path):
    e = EspSaEntry(spi=0x10000000, encryption="ENCR_AES_GCM_16", encryption_key=b"\x01" * 20)
    assert e.uat_line() == ('"IPv4","*","*","0x10000000","AES-GCM with 16 octet ICV [RFC4106]",'
                            '"0x' + "01" * 20 + '","NULL",""')
    write_esp_sa_file(tmp_path / "k", [e, e])
    lines = (tmp_path / "k").read_text().splitlines()
    assert lines[0].startswith("#") and lines[1:] == [e.uat_line()]
    assert oct(os.stat(tmp_path / "k").st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="no Wireshark name"):
        EspSaEntry(spi=1, encryption="ENCR_3DES", encryption_key=b"").uat_line()
