"""Packet captures of a daemon's net side, and the ESP key file Wireshark / tshark read.

**pcap.** Classic libpcap format (https://wiki.wireshark.org/Development/LibpcapFileFormat):
a 24-byte global header (magic 0xa1b2c3d4 written in host order, version 2.4, snaplen 65535,
link type 101 = LINKTYPE_RAW: each record starts with an IPv4 header, no link layer), then per
packet a 16-byte record header (seconds, microseconds, captured length, original length).  The
event loop calls ``flush()`` after every batch of packets, so a capture can be read while the
daemon runs without a system call per packet.  The timestamp is given
by the caller (the event loop is the only code that reads the clock).

**ESP key file.** Wireshark's ESP dissector takes its SAs from the ``esp_sa`` UAT (Preferences >
Protocols > ESP > ESP SAs).  As a file (``esp_sa`` in a profile directory, e.g.
``~/.config/wireshark/esp_sa``) or on tshark's command line (``-o 'uat:esp_sa:<line>'``, once per
SA) every SA is one line of eight double-quoted, comma-separated fields, checked with tshark 4.0:

    "IPv4","<src or *>","<dst or *>","0x<SPI 8 hex digits>","<encryption>","0x<key hex>",
    "<auth>","0x<key hex>"                      (one line)

The algorithm fields take Wireshark's own names (packet-ipsec.c ``esp_encryption_type_vals``
and ``esp_authentication_type_vals``); ``TSHARK_ENCRYPTION`` / ``TSHARK_INTEGRITY`` map our IANA
names onto them.  For AES-GCM the key field is the key with its 4-byte salt appended, as in
RFC 4106 §8.1 keying, and the integrity algorithm is "NULL".  Addresses are written as ``*``:
SPIs are unique in a lab, and a care-of address changes during a handover while the SA stays.

To decode, pass ``-o esp.enable_encryption_decode:TRUE -o esp.enable_authentication_check:TRUE``
(tshark then sets ``esp.icv_good`` / ``esp.icv_bad`` per packet).

**IKEv2 key file.** The IKE messages after IKE_SA_INIT (IKE_AUTH, CREATE_CHILD_SA,
INFORMATIONAL) sit in an Encrypted payload (RFC 7296 §3.14) that Wireshark opens with the
``ikev2_decryption_table`` UAT (Preferences > Protocols > ISAKMP > IKEv2 Decryption Table; as a
file ``ikev2_decryption_table`` in a profile directory, or ``-o 'uat:ikev2_decryption_table:<line>'``).
One IKE SA per line, eight comma-separated fields in the order of packet-isakmp.c's
``ikev2_uat_flds`` (Wireshark 4.0): byte fields as bare hex, the two algorithm fields as
double-quoted names from its ``vs_ikev2_encr_algs`` / ``vs_ikev2_auth_algs``:

    <SPIi 16 hex>,<SPIr 16 hex>,<SK_ei hex>,<SK_er hex>,"<encryption>",<SK_ai hex>,<SK_ar hex>,"<integrity>"

For AES-GCM, SK_ei / SK_er carry the 4-byte salt at their end (RFC 5282 §7.1), SK_ai / SK_ar are
empty and the integrity is "NONE [RFC4306]".  With AES-CBC + HMAC Wireshark checks every
message's Integrity Checksum Data (the expert info ``isakmp.ikev2.integrity_checksum`` flags a
wrong one); with AES-GCM a wrong key shows as undecodable payloads.  ``ike_keyfile_path`` names
the file beside the esp_sa one; ``tshark_options`` takes both.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

from mipsec.crypto.transforms import ENCRYPTION, INTEGRITY
from mipsec.ike.constants import Encr, Integ
from mipsec.ipsec.sa import esp_sa_uat_record

PCAP_MAGIC = 0xA1B2C3D4
PCAP_VERSION = (2, 4)
PCAP_SNAPLEN = 65535
LINKTYPE_RAW = 101             # raw IPv4/IPv6, no link-layer header (tcpdump.org link types)
_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")

# IANA transform names (RFC 8221 / IKEv2 registries) -> Wireshark 4.0 esp_sa UAT strings, from
# the transform registry (mipsec.crypto.transforms).  ENCR_CHACHA20_POLY1305 has none: "ChaCha20
# with Poly1305 [RFC7634]" exists only from Wireshark 4.2 on and tshark 4.0 refuses the whole
# table with it, so such SAs are left out of key files.
TSHARK_ENCRYPTION = {name: spec.tshark_names[0] for name, spec in ENCRYPTION.items()
                     if spec.tshark_names}
TSHARK_INTEGRITY: dict[str | None, str] = {None: "NULL", "": "NULL",
                    **{name: spec.tshark_name for name, spec in INTEGRITY.items()
                       if spec.tshark_name}}


# IKEv2 transforms (IANA ENCR id, key bits) / INTEG id -> Wireshark 4.0 ikev2_decryption_table
# names (packet-isakmp.c vs_ikev2_encr_algs / vs_ikev2_auth_algs).  The ESP table's names differ
# ("AES-CBC [RFC3602]" there, "AES-CBC-128 [RFC3602]" here): these are the UAT's own strings.
IKEV2_TSHARK_ENCRYPTION: dict[tuple[int, int], str] = {
    **{(Encr.ENCR_AES_CBC, bits): f"AES-CBC-{bits} [RFC3602]" for bits in (128, 192, 256)},
    **{(Encr.ENCR_AES_GCM_16, bits): f"AES-GCM-{bits} with 16 octet ICV [RFC5282]"
       for bits in (128, 192, 256)},
}
IKEV2_TSHARK_INTEGRITY: dict[int, str] = {
    Integ.NONE: "NONE [RFC4306]",
    Integ.AUTH_HMAC_SHA2_256_128: "HMAC_SHA2_256_128 [RFC4868]",
}
IKEV2_UAT = "ikev2_decryption_table"


class PcapWriter:
    """Writes IPv4 packets to a LINKTYPE_RAW pcap file, bounded and never truncating one.

    A capture already at ``path`` (an earlier run's) is rotated away first, not overwritten:
    ``path`` -> ``path.1`` -> ``path.2`` ... up to ``keep`` rotated files (older ones are
    deleted).  When ``max_bytes`` (> 0) would be exceeded the current file is rotated the same
    way, so the captures of one daemon never take more than ``(keep + 1) * max_bytes``.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 0, keep: int = 0):
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.records = 0
        self.rotations = 0
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            self._shift()
        self._open()

    def _open(self) -> None:
        self._file: BinaryIO = open(self.path, "wb")
        self._file.write(_GLOBAL.pack(PCAP_MAGIC, *PCAP_VERSION, 0, 0, PCAP_SNAPLEN, LINKTYPE_RAW))
        self._file.flush()
        self.size = _GLOBAL.size

    def _shift(self) -> None:
        """path.(keep-1) -> path.keep ... path -> path.1; with keep 0 the old file goes."""
        if self.keep <= 0:
            os.unlink(self.path)
            return
        for i in range(self.keep - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")

    def rotate(self) -> None:
        self._file.close()
        self._shift()
        self._open()
        self.rotations += 1

    def write(self, packet: bytes, timestamp: float) -> None:
        seconds = int(timestamp)
        micros = int((timestamp - seconds) * 1_000_000)
        captured = packet[:PCAP_SNAPLEN]
        grown = _RECORD.size + len(captured)
        if self.max_bytes and self.size + grown > self.max_bytes and self.size > _GLOBAL.size:
            self.rotate()
        self._file.write(_RECORD.pack(seconds, micros, len(captured), len(packet)))
        self._file.write(captured)
        self.size += grown
        self.records += 1

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_pcap(path: str | os.PathLike[str]) -> list[tuple[float, bytes]]:
    """The records of a pcap written by ``PcapWriter`` (for tests and ``mipsec`` tools)."""
    with open(path, "rb") as f:
        data = f.read()
    magic, _maj, _min, _tz, _sig, _snap, linktype = _GLOBAL.unpack_from(data)
    if magic != PCAP_MAGIC or linktype != LINKTYPE_RAW:
        raise ValueError(f"{path}: not a LINKTYPE_RAW pcap written in host byte order")
    out, off = [], _GLOBAL.size
    while off + _RECORD.size <= len(data):
        sec, usec, caplen, _orig = _RECORD.unpack_from(data, off)
        off += _RECORD.size
        out.append((sec + usec / 1e6, data[off:off + caplen]))
        off += caplen
    return out


@dataclass(frozen=True)
class EspSaEntry:
    """One line of Wireshark's esp_sa table."""
    spi: int
    encryption: str            # IANA name
    encryption_key: bytes      # including the salt for AEAD transforms
    integrity: str | None = None
    integrity_key: bytes = b""
    source: str = "*"
    destination: str = "*"

    def uat_line(self) -> str:
        try:
            enc = TSHARK_ENCRYPTION[self.encryption]
        except KeyError:
            raise ValueError(f"no Wireshark name for encryption {self.encryption!r}") from None
        try:
            auth = TSHARK_INTEGRITY[self.integrity]
        except KeyError:
            raise ValueError(f"no Wireshark name for integrity {self.integrity!r}") from None
        fields = ["IPv4", self.source, self.destination, f"0x{self.spi:08x}", enc,
                  "0x" + self.encryption_key.hex(), auth,
                  "0x" + self.integrity_key.hex() if self.integrity_key else ""]
        return esp_sa_uat_record(fields)


def entry_from_sa(sa: Any) -> _RawLine:
    """The esp_sa entry of a live ``SecurityAssociation`` (its own ``tshark_esp_sa_entry``), with
    wildcard addresses: valid across rebinds and moves.  UsageError for a cipher Wireshark 4.0
    cannot decrypt."""
    fields = list(sa.tshark_esp_sa_entry())
    fields[1] = fields[2] = "*"
    return _RawLine(esp_sa_uat_record(fields))


class _RawLine(str):
    """An already formatted UAT line."""

    def uat_line(self) -> str:
        return str(self)


class KeyLines:
    """The lines of a key file (``esp_sa`` or ``ikev2_decryption_table``), one per SA, each
    tagged with the newest capture file the SA was in use during (``PcapWriter.rotations``:
    0 is the first file of this run, -1 an earlier run's).  A bounded capture keeps the
    current file and ``keep`` rotated ones, so a line whose SA was last in use in a file that
    is gone decrypts nothing any more: ``prune`` drops it, and the key files stop growing with
    every re-key.  With an unbounded capture nothing is pruned."""

    def __init__(self) -> None:
        self._lines: dict[Any, tuple[str, int]] = {}

    def __contains__(self, key: Any) -> bool:
        return key in self._lines

    def __len__(self) -> int:
        return len(self._lines)

    def add(self, key: Any, line: str, tag: int) -> None:
        self._lines[key] = (line, tag)

    def held(self, keys: Iterable[Any], tag: int) -> None:
        """The SAs ``keys`` are in use during capture file ``tag``."""
        for key in keys:
            entry = self._lines.get(key)
            if entry is not None and entry[1] < tag:
                self._lines[key] = (entry[0], tag)

    def prune(self, oldest: int) -> bool:
        """Drop the lines of SAs last in use before capture file ``oldest``; True if any went."""
        gone = [key for key, (_line, tag) in self._lines.items() if tag < oldest]
        for key in gone:
            del self._lines[key]
        return bool(gone)

    def lines(self) -> list[str]:
        return [line for line, _tag in self._lines.values()]


def write_esp_sa_file(path: str | os.PathLike[str], entries: Iterable[Any]) -> None:
    """(Re)write the esp_sa key file atomically; entries are EspSaEntry or formatted lines."""
    _write_private(path, "# mipsec ESP SAs for Wireshark/tshark (esp_sa UAT): keys, keep private\n",
                   entries)


@dataclass(frozen=True)
class IkeSaEntry:
    """One line of Wireshark's ikev2_decryption_table: an IKE SA's SPIs and SK_e / SK_a keys."""
    spi_i: bytes
    spi_r: bytes
    encr: int                  # IANA ENCR id
    key_bits: int
    integ: int                 # IANA INTEG id (Integ.NONE with AES-GCM)
    sk_ei: bytes
    sk_er: bytes
    sk_ai: bytes = b""
    sk_ar: bytes = b""

    def uat_line(self) -> str:
        if len(self.spi_i) != 8 or len(self.spi_r) != 8:
            raise ValueError("IKE SPIs are 8 octets (RFC 7296 §3.1)")
        try:
            enc = IKEV2_TSHARK_ENCRYPTION[(self.encr, self.key_bits)]
        except KeyError:
            raise ValueError(f"no Wireshark name for IKE encryption {self.encr} "
                             f"({self.key_bits} bits)") from None
        try:
            auth = IKEV2_TSHARK_INTEGRITY[self.integ]
        except KeyError:
            raise ValueError(f"no Wireshark name for IKE integrity {self.integ}") from None
        return ",".join([self.spi_i.hex(), self.spi_r.hex(), self.sk_ei.hex(), self.sk_er.hex(),
                         f'"{enc}"', self.sk_ai.hex(), self.sk_ar.hex(), f'"{auth}"'])


def ike_entry_from_sa(sa: Any) -> IkeSaEntry | None:
    """The ikev2_decryption_table entry of an ``mipsec.ike.sa.IkeSa`` once its keys exist (after
    IKE_SA_INIT, or when a re-key created it), else None."""
    keys, suite = sa.keys, sa.suite
    if keys is None or suite is None or not any(sa.spi_r):
        return None
    return IkeSaEntry(spi_i=sa.spi_i, spi_r=sa.spi_r, encr=suite.encr, key_bits=suite.key_bits,
                      integ=Integ.NONE if suite.aead else suite.integ, sk_ei=keys.sk_ei,
                      sk_er=keys.sk_er, sk_ai=keys.sk_ai, sk_ar=keys.sk_ar)


def ike_keyfile_path(esp_keyfile: str | os.PathLike[str]) -> str:
    """Where the IKEv2 keys go beside an esp_sa key file: ``gw.pcap.esp_sa`` ->
    ``gw.pcap.ikev2_decryption_table``; a profile's ``esp_sa`` -> its ``ikev2_decryption_table``."""
    path = os.fspath(esp_keyfile)
    head, name = os.path.split(path)
    if name == "esp_sa":
        return os.path.join(head, IKEV2_UAT)
    if name.endswith(".esp_sa"):
        return path[:-len("esp_sa")] + IKEV2_UAT
    return f"{path}.{IKEV2_UAT}"


def write_ike_key_file(path: str | os.PathLike[str], entries: Iterable[Any]) -> None:
    """(Re)write the ikev2_decryption_table key file atomically, mode 0600; entries are
    IkeSaEntry or formatted lines."""
    _write_private(path, "# mipsec IKEv2 SAs for Wireshark/tshark (ikev2_decryption_table UAT): "
                   "keys, keep private\n", entries)


def _write_private(path: str | os.PathLike[str], header: str, entries: Iterable[Any]) -> None:
    lines, seen = [], set()
    for entry in entries:
        line = entry.uat_line() if hasattr(entry, "uat_line") else str(entry)
        if line not in seen:
            seen.add(line)
            lines.append(line)
    # a fresh O_EXCL|O_NOFOLLOW 0600 temporary file renamed over the target: the keys are never
    # readable by others, and nothing planted at a predictable name is written through
    from mipsec.files import write_private
    write_private(path, header + "".join(line + "\n" for line in lines))


def tshark_options(*keyfiles: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
                   ) -> list[str]:
    """The tshark command-line options that load key files: esp_sa files (every ESP ICV
    checked) and ikev2_decryption_table files, told apart line by line (an esp_sa line starts
    with its quoted address family, an IKEv2 line with the initiator's SPI in hex).  Takes
    paths or lists of paths: ``tshark_options(keyfile, ike_keyfile_path(keyfile))``."""
    paths: list[str | os.PathLike[str]] = []
    for item in keyfiles:
        if isinstance(item, (str, os.PathLike)):
            paths.append(item)
        else:
            paths.extend(item)
    opts = ["-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE"]
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                uat = "esp_sa" if line.startswith('"') else IKEV2_UAT
                opts += ["-o", f"uat:{uat}:{line}"]
    return opts
