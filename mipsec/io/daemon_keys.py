"""A role daemon's key files for its capture (``[daemon] keyfile``): the esp_sa and
ikev2_decryption_table files Wireshark reads, kept in step with the SAs the role holds and with
the capture files still on disk (docs/operations.md "Captures")."""

from __future__ import annotations

import logging
from typing import Any

from mipsec.config import DaemonConfig
from mipsec.io import pcap as pcapmod
from mipsec.io.daemon_state import DaemonState

log = logging.getLogger("mipsec.daemon")

def esp_entries(cfg: DaemonConfig) -> list[pcapmod.EspSaEntry]:
    """The esp_sa key-file entries for this daemon's SAs, from its configuration (manual keys;
    IKEv2-negotiated SAs are added as they are installed, see ``role_sas``)."""
    sas = []
    if cfg.role == "mn":
        sas = [cfg.node.esp_in, cfg.node.esp_out]
    elif cfg.role == "gw":
        for m in cfg.node.mobiles:
            sas += [m.esp_in, m.esp_out]
    sas = [sa for sa in sas if sa is not None]
    out = []
    for sa in sas:
        if sa.encryption not in pcapmod.TSHARK_ENCRYPTION:
            log.warning("key file: Wireshark 4.0 cannot decrypt %s; SA 0x%08x left out",
                        sa.encryption, sa.spi)
        else:
            out.append(pcapmod.EspSaEntry(spi=sa.spi, encryption=sa.encryption,
                                          encryption_key=sa.encryption_key,
                                          integrity=sa.integrity, integrity_key=sa.integrity_key))
    return out



def role_sas(role: Any) -> list[Any]:
    """Every ESP SA object the role holds now (current pairs, re-keyed inbound SAs)."""
    return list(role.esp_sas())


def sa_key_line(sa: Any) -> str | None:
    """The esp_sa record of an SA with wildcard addresses (valid across rebinds and moves), or
    None when Wireshark cannot decrypt its cipher."""
    try:
        return pcapmod.entry_from_sa(sa).uat_line()
    except Exception:
        return None


def read_key_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []



class CaptureKeys(DaemonState):
    """The key files beside the capture: every SA whose packets a kept capture file may hold."""

    def _update_keyfile(self) -> None:
        rotation = self.pcap.rotations if self.pcap is not None else 0
        rotated = rotation != self._key_rotation
        self._key_rotation = rotation
        self._update_ike_keyfile(rotation, rotated)
        new = False
        held = []
        for sa in role_sas(self.role):
            held.append(sa.spi)
            if sa.spi in self._esp_keys:
                continue
            line = sa_key_line(sa)
            # an SA Wireshark cannot decrypt gets no line, only its place (never looked at again)
            self._esp_keys.add(sa.spi, line or "", rotation)
            new = new or line is not None
        if rotated:
            self._esp_keys.held(held, rotation)
            new = self._prune_keys(self._esp_keys, rotation) or new
        if new:
            try:
                pcapmod.write_esp_sa_file(self.cfg.keyfile,
                                          [line for line in self._esp_keys.lines() if line])
            except OSError as exc:
                log.warning("key file %s: %s", self.cfg.keyfile, exc)

    def _prune_keys(self, keys: pcapmod.KeyLines, rotation: int) -> bool:
        """The capture rotated: drop the lines of SAs last in use in a capture file that is
        gone (the current file and ``keep`` rotated ones are kept; one more file's worth of
        margin for an SA that ended in the batch that rotated)."""
        if self.pcap is None or not self.pcap.max_bytes:
            return False
        return keys.prune(rotation - self.pcap.keep - 1)

    def _update_ike_keyfile(self, rotation: int, rotated: bool) -> None:
        """Add every IKE SA whose keys now exist (after IKE_SA_INIT, or a re-key's successor) to
        the ikev2_decryption_table file, so IKE_AUTH and everything after it decrypts; when the
        capture rotated, drop the IKE SAs no kept file can hold."""
        if self._ike_keyfile is None:
            return
        new = False
        held = []
        for sa in self.role.ike.endpoint.ike_sas:
            key = (sa.spi_i, sa.spi_r)
            held.append(key)
            if key in self._ike_keys:
                continue
            entry = pcapmod.ike_entry_from_sa(sa)
            if entry is None:                 # no keys yet (IKE_SA_INIT not answered)
                continue
            try:
                self._ike_keys.add(key, entry.uat_line(), rotation)
                new = True
            except ValueError as exc:         # a transform Wireshark 4.0 has no name for
                self._ike_keys.add(key, "", rotation)
                log.warning("IKE key file: %s; IKE SA %s left out", exc, sa.name)
        if rotated:
            self._ike_keys.held(held, rotation)
            new = self._prune_keys(self._ike_keys, rotation) or new
        if new:
            try:
                pcapmod.write_ike_key_file(self._ike_keyfile,
                                           [line for line in self._ike_keys.lines() if line])
            except OSError as exc:
                log.warning("key file %s: %s", self._ike_keyfile, exc)
