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

    "IPv4","<src or *>","<dst or *>","0x<SPI 8 hex digits>","<encryption>","0x<key hex>","<auth>","0x<key hex>"

The algorithm fields take Wireshark's own names (packet-ipsec.c ``esp_encryption_type_vals``
and ``esp_authentication_type_vals``); ``TSHARK_ENCRYPTION`` / ``TSHARK_INTEGRITY`` map our IANA
names onto them.  For AES-GCM the key field is the key with its 4-byte salt appended, as in
RFC 4106 §8.1 keying, and the integrity algorithm is "NULL".  Addresses are written as ``*``:
SPIs are unique in a lab, and a care-of address changes during a handover while the SA stays.

To decode, pass ``-o esp.enable_encryption_decode:TRUE -o esp.enable_authentication_check:TRUE``
(tshark then sets ``esp.icv_good`` / ``esp.icv_bad`` per packet).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable

from mipsec.crypto.transforms import ENCRYPTION, INTEGRITY
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
TSHARK_INTEGRITY = {None: "NULL", "": "NULL",
                    **{name: spec.tshark_name for name, spec in INTEGRITY.items()
                       if spec.tshark_name}}


class PcapWriter:
    """Appends IPv4 packets to a LINKTYPE_RAW pcap file."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._file: BinaryIO = open(self.path, "wb")
        self._file.write(_GLOBAL.pack(PCAP_MAGIC, *PCAP_VERSION, 0, 0, PCAP_SNAPLEN, LINKTYPE_RAW))
        self._file.flush()
        self.records = 0

    def write(self, packet: bytes, timestamp: float) -> None:
        seconds = int(timestamp)
        micros = int((timestamp - seconds) * 1_000_000)
        captured = packet[:PCAP_SNAPLEN]
        self._file.write(_RECORD.pack(seconds, micros, len(captured), len(packet)))
        self._file.write(captured)
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


def write_esp_sa_file(path: str | os.PathLike[str], entries: Iterable[Any]) -> None:
    """(Re)write the esp_sa key file atomically; entries are EspSaEntry or formatted lines."""
    lines = []
    seen = set()
    for entry in entries:
        line = entry.uat_line() if hasattr(entry, "uat_line") else str(entry)
        if line not in seen:
            seen.add(line)
            lines.append(line)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        f.write("# mipsec ESP SAs for Wireshark/tshark (esp_sa UAT): keys, keep private\n")
        f.write("".join(line + "\n" for line in lines))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def tshark_options(path: str | os.PathLike[str]) -> list[str]:
    """The tshark command-line options that load an esp_sa key file and check every ICV."""
    opts = ["-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE"]
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                opts += ["-o", f"uat:esp_sa:{line}"]
    return opts
