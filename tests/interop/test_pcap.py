"""The capture writer and the key files, checked by tshark itself: every ESP packet of the
capture decrypts with a good ICV, for each transform Wireshark 4.0 knows; every IKEv2 message
after IKE_SA_INIT (IKE_AUTH, CREATE_CHILD_SA for a child and for the IKE SA, INFORMATIONAL)
decrypts with the ikev2_decryption_table file, its integrity checksum correct; and one wrong key
byte breaks either check."""

from __future__ import annotations

import os

import pytest

import needs
from ike_harness import MN_ADDR, establish
from mipsec.ike.constants import Encr, Integ
from mipsec.ike.proposals import parse_ike_suite
from mipsec.io.pcap import (
    EspSaEntry,
    IkeSaEntry,
    PcapWriter,
    entry_from_sa,
    ike_entry_from_sa,
    ike_keyfile_path,
    read_pcap,
    tshark_options,
    write_esp_sa_file,
    write_ike_key_file,
)
from mipsec.ipsec.sa import Direction, SecurityAssociation
from mipsec.node.packet import a2b
from mipsec.node.packet import build_udp_packet as build_udp_raw

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
    w.write(sa.encapsulate(build_udp_raw(a2b("10.1.0.100"), a2b("10.1.0.10"), 1, 2, b"up")), 5.0)
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
            inner = build_udp_raw(a2b("10.1.0.10"), a2b("10.1.0.100"), 5001, 5001,
                                  b"m%d-%d" % (n, i))
            writer.write(sa.encapsulate(inner), 1000.0 + n + i / 10)
    writer.close()
    write_esp_sa_file(keys, entries)
    rows = needs.tshark_fields(tshark, pcap, keys, ["esp.spi", "esp.icv_good", "udp.dstport",
                                                    "ip.dst"])
    assert len(rows) == 3 * len(CASES)
    for _spi, icv_good, dport, dst in rows:
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


# --- IKEv2 --------------------------------------------------------------------------------------

# RFC 7296 §3.2 payload types, as tshark's isakmp.typepayload shows them
SA, KE, IDI, IDR, AUTH, NONCE, NOTIFY, DELETE, TSI, TSR, SK = 33, 34, 35, 36, 39, 40, 41, 42, 44, 45, 46
IKE_SA_INIT, IKE_AUTH, CREATE_CHILD_SA, INFORMATIONAL = 34, 35, 36, 37
# the capture of _ike_capture, message by message: exchange, payloads inside the SK payload
EXPECTED = [
    (IKE_SA_INIT, None), (IKE_SA_INIT, None),
    (IKE_AUTH, {IDI, IDR, AUTH, SA, TSI, TSR}), (IKE_AUTH, {IDR, AUTH, SA, TSI, TSR}),
    (CREATE_CHILD_SA, {NOTIFY, SA, NONCE, TSI, TSR}), (CREATE_CHILD_SA, {SA, NONCE, TSI, TSR}),
    (INFORMATIONAL, {DELETE}), (INFORMATIONAL, {DELETE}),          # the old child (its SPIs)
    (CREATE_CHILD_SA, {SA, NONCE, KE}), (CREATE_CHILD_SA, {SA, NONCE, KE}),   # IKE SA re-key
    (INFORMATIONAL, {DELETE}), (INFORMATIONAL, set()),             # the old IKE SA (no SPI)
    (INFORMATIONAL, {DELETE}), (INFORMATIONAL, {DELETE}),          # a child, over the new one
]
ESP_DELETES = {6, 7, 12, 13}          # the messages that delete one ESP SPI (RFC 7296 §3.11)
IKE_SUITES = ["aes256-sha256-prfsha256-ecp256", "aes128gcm16-prfsha256-x25519"]


def _ike_capture(tmp_path, suite):
    """Two endpoints in memory: IKE_SA_INIT + IKE_AUTH, a child re-key, an IKE SA re-key and a
    child delete, every datagram captured as IPv4/UDP; the key file from the initiator's SAs
    (the one before and the one after the IKE re-key).  (pcap, key file, expected exchanges)."""
    net, I, R = establish(ike_suites=(parse_ike_suite(suite),))
    (first,) = I.ike_sas
    (peer,) = R.ike_sas
    assert ike_entry_from_sa(first) == ike_entry_from_sa(peer)   # both ends write the same line
    net.deliver(first.rekey_child(next(iter(first.children)), net.now), MN_ADDR)
    net.deliver(first.rekey(net.now), MN_ADDR)
    (second,) = [sa for sa in I.ike_sas if sa is not first and sa.is_established]
    net.deliver(second.delete_child(next(iter(second.children)), net.now), MN_ADDR)
    entries = [ike_entry_from_sa(first), ike_entry_from_sa(second)]
    pcap, keys = tmp_path / "ike.pcap", tmp_path / "ike.pcap.ikev2_decryption_table"
    w = PcapWriter(pcap)
    for i, d in enumerate(net.sent):
        w.write(build_udp_raw(a2b(d.local[0]), a2b(d.remote[0]), d.local[1], d.remote[1], d.data),
                1000.0 + i / 10)
    w.close()
    write_ike_key_file(keys, entries)
    return pcap, keys


def _ike_problems(tshark, pcap, keys):
    """What tshark could not decrypt or check in the IKE capture (empty when all is well)."""
    rows = needs.tshark_fields(tshark, pcap, keys, [
        "isakmp.exchangetype", "isakmp.typepayload", "isakmp.enc.pad_length",
        "isakmp.enc.icd", "_ws.expert.message", "isakmp.id.data.fqdn", "isakmp.id.data.user_fqdn",
        "isakmp.delete.spi"])
    problems = []
    exchanges = [int(r[0]) for r in rows]
    assert exchanges == [m[0] for m in EXPECTED], exchanges
    for n, ((exch, want), row) in enumerate(zip(EXPECTED, rows, strict=True)):
        _exch, types, pad, icd, expert, fqdn, user_fqdn, deleted = row
        if exch == IKE_SA_INIT:
            continue
        inner = [int(t) for t in types.split(",")]
        if inner[0] != SK or not pad:
            problems.append((n, "not decrypted", types))
        if expert:      # "IKEv2 Integrity Checksum Data is incorrect", "Malformed Packet" ...
            problems.append((n, "tshark's expert info", expert, icd))
        # the decrypted content, not just the (cleartext) first payload type: the identities
        if exch == IKE_AUTH and (fqdn, user_fqdn) != (("gw.example", "mn@example") if n == 2
                                                       else ("gw.example", "")):
            problems.append((n, "identities", fqdn, user_fqdn))
        if n in ESP_DELETES and len(deleted) != 8:       # one 4-octet ESP SPI
            problems.append((n, "deleted SPI", deleted))
        missing = want - set(inner[1:])
        if missing:
            problems.append((n, "payloads missing", sorted(missing), types))
    return problems


@pytest.mark.parametrize("suite", IKE_SUITES)
def test_tshark_decrypts_every_ike_message_with_the_ike_key_file(tmp_path, suite):
    tshark = needs.tshark()
    pcap, keys = _ike_capture(tmp_path, suite)
    assert _ike_problems(tshark, pcap, keys) == []


@pytest.mark.parametrize("suite", IKE_SUITES)
def test_one_wrong_ike_key_byte_breaks_the_decryption(tmp_path, suite):
    """Every key field matters: one flipped bit in SK_ei, SK_er (and SK_ai, SK_ar with an
    integrity transform) and tshark no longer decrypts or no longer finds the checksum good."""
    tshark = needs.tshark()
    pcap, keys = _ike_capture(tmp_path, suite)
    header, *lines = keys.read_text().splitlines()
    fields = [2, 3] + ([5, 6] if "gcm" not in suite else [])
    for field in fields:
        for which in range(len(lines)):       # the key of the first and of the re-keyed IKE SA
            bad = lines[which].split(",")
            bad[field] = f"{int(bad[field][:2], 16) ^ 1:02x}" + bad[field][2:]
            wrong = tmp_path / f"wrong-{field}-{which}"
            wrong.write_text("\n".join([header, *lines[:which], ",".join(bad),
                                        *lines[which + 1:]]) + "\n")
            assert _ike_problems(tshark, pcap, wrong), (field, which)


def test_ike_key_file_lines_have_wiresharks_format(tmp_path):
    e = IkeSaEntry(spi_i=bytes.fromhex("0102030405060708"), spi_r=bytes(7) + b"\x09",
                   encr=Encr.ENCR_AES_CBC, key_bits=256, integ=Integ.AUTH_HMAC_SHA2_256_128,
                   sk_ei=b"\x11" * 32, sk_er=b"\x22" * 32, sk_ai=b"\x33" * 32, sk_ar=b"\x44" * 32)
    assert e.uat_line() == ("0102030405060708,0000000000000009," + "11" * 32 + "," + "22" * 32
                            + ',"AES-CBC-256 [RFC3602]",' + "33" * 32 + "," + "44" * 32
                            + ',"HMAC_SHA2_256_128 [RFC4868]"')
    g = IkeSaEntry(spi_i=b"\1" * 8, spi_r=b"\2" * 8, encr=Encr.ENCR_AES_GCM_16, key_bits=128,
                   integ=Integ.NONE, sk_ei=b"\5" * 20, sk_er=b"\6" * 20)
    assert g.uat_line().endswith(',"AES-GCM-128 with 16 octet ICV [RFC5282]",,,"NONE [RFC4306]"')
    path = tmp_path / "gw.pcap.ikev2_decryption_table"
    write_ike_key_file(path, [e, g, e])
    assert path.read_text().splitlines()[1:] == [e.uat_line(), g.uat_line()]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="no Wireshark name"):
        IkeSaEntry(spi_i=b"\1" * 8, spi_r=b"\2" * 8, encr=3, key_bits=192, integ=Integ.NONE,
                   sk_ei=b"", sk_er=b"").uat_line()
    # beside the esp_sa file, and in a Wireshark profile directory
    assert ike_keyfile_path("/x/gw.pcap.esp_sa") == "/x/gw.pcap.ikev2_decryption_table"
    assert ike_keyfile_path("/p/esp_sa") == "/p/ikev2_decryption_table"
    # tshark_options tells the two tables apart, line by line, from both files
    esp = tmp_path / "gw.pcap.esp_sa"
    write_esp_sa_file(esp, [EspSaEntry(spi=7, encryption="ENCR_AES_GCM_16",
                                       encryption_key=b"\1" * 20)])
    opts = tshark_options(esp, path)
    assert [o.split(":")[1] for o in opts if o.startswith("uat:")] == \
        ["esp_sa", "ikev2_decryption_table", "ikev2_decryption_table"]
    assert tshark_options([esp, path]) == opts


def test_no_ike_entry_before_the_keys_exist():
    net, I, R = establish(tap=lambda d: None)            # IKE_SA_INIT request lost
    (sa,) = I.ike_sas
    assert sa.keys is None and ike_entry_from_sa(sa) is None
