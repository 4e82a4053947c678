"""SA proposals (RFC 7296 §2.7, §3.3): what we offer, and how we choose from what a peer offers.

An ``IkeSuite`` (mipsec.ike.crypto) or an ``EspSuite`` is one combination of transforms; we offer
each as its own proposal, in preference order.  A responder walks the peer's proposals in the
peer's order and takes the first one that contains every transform of one of our suites (§2.7:
the responder's choice, one transform of each type); the answer carries exactly that one
proposal, with the peer's proposal number and the responder's SPI.  An initiator checks that the
answer is one of the combinations it offered.

Text form used in configs (close to strongSwan's): ``aes256-sha256-prfsha256-ecp256``,
``aes128gcm16-prfsha256-x25519`` for IKE; ``aes128-sha256``, ``aes256gcm16`` (+ ``-modp2048`` etc.
for PFS on re-key) for ESP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mipsec.errors import ConfigError
from mipsec.ike.codec import Proposal, Transform
from mipsec.ike.constants import DhGroup, Encr, Esn, Integ, Prf, ProtocolId, TransformType
from mipsec.ike.crypto import IkeSuite, encr_key_len

ESP_ENCR_NAMES: dict[int, str] = {Encr.ENCR_AES_CBC: "ENCR_AES_CBC", Encr.ENCR_AES_GCM_16: "ENCR_AES_GCM_16"}
ESP_INTEG_NAMES: dict[int, str] = {Integ.AUTH_HMAC_SHA2_256_128: "AUTH_HMAC_SHA2_256_128"}
ESP_INTEG_KEY_LEN: dict[int, int] = {Integ.AUTH_HMAC_SHA2_256_128: 32}


@dataclass(frozen=True, slots=True)
class EspSuite:
    encr: int
    key_bits: int
    integ: int = Integ.NONE
    dh: int = DhGroup.NONE          # PFS group for CREATE_CHILD_SA (ignored in IKE_AUTH, §1.2)
    esn: bool = False

    @property
    def aead(self) -> bool:
        return self.encr == Encr.ENCR_AES_GCM_16

    @property
    def encryption_name(self) -> str:
        return ESP_ENCR_NAMES[self.encr]

    @property
    def integrity_name(self) -> str | None:
        return None if self.aead else ESP_INTEG_NAMES[self.integ]

    def keymat_lengths(self) -> tuple[int, int]:
        """(encryption key octets incl. salt, integrity key octets) for one direction (§2.17)."""
        return (encr_key_len(self.encr, self.key_bits),
                0 if self.aead else ESP_INTEG_KEY_LEN[self.integ])


# --- text form -------------------------------------------------------------------------------

_ENCR = {
    "aes128": (Encr.ENCR_AES_CBC, 128), "aes192": (Encr.ENCR_AES_CBC, 192),
    "aes256": (Encr.ENCR_AES_CBC, 256),
    "aes128gcm16": (Encr.ENCR_AES_GCM_16, 128), "aes256gcm16": (Encr.ENCR_AES_GCM_16, 256),
}
_INTEG = {"sha256": Integ.AUTH_HMAC_SHA2_256_128}
_PRF = {"prfsha256": Prf.PRF_HMAC_SHA2_256}
_DH = {"modp2048": DhGroup.MODP_2048, "ecp256": DhGroup.ECP_256, "x25519": DhGroup.CURVE25519,
       "curve25519": DhGroup.CURVE25519}


_ESN = {"esn": True, "noesn": False}


def _parse_suite(kind: str, text: str, tables: dict[str, dict[str, Any]],
                 required: tuple[str, ...], needs: str) -> tuple[dict[str, Any], Integ]:
    """The strongSwan-style words of ``text`` ("aes128-sha256-x25519"), each looked up in the
    named ``tables`` (the last word of a kind wins), and the checks IKE and ESP suites share:
    the ``required`` kinds present, an integrity algorithm exactly when the cipher is not AEAD.
    Returns the words found by table name and the integrity transform (NONE for AEAD)."""
    found: dict[str, Any] = {}
    for part in text.lower().split("-"):
        for name, table in tables.items():
            if part in table:
                found[name] = table[part]
                break
        else:
            raise ConfigError(f"{kind} proposal {text!r}: unknown algorithm {part!r}")
    if any(name not in found for name in required):
        raise ConfigError(f"{kind} proposal {text!r}: needs {needs}")
    aead = found["encr"][0] == Encr.ENCR_AES_GCM_16
    if not aead and "integ" not in found:
        raise ConfigError(f"{kind} proposal {text!r}: AES-CBC needs an integrity algorithm")
    if aead and "integ" in found:
        raise ConfigError(f"{kind} proposal {text!r}: AES-GCM takes no integrity algorithm")
    return found, Integ.NONE if aead else found["integ"]


def parse_ike_suite(text: str) -> IkeSuite:
    found, integ = _parse_suite("IKE", text, {"encr": _ENCR, "integ": _INTEG, "prf": _PRF,
                                              "dh": _DH},
                                ("encr", "dh"), "an encryption algorithm and a DH group")
    encr = found["encr"]
    return IkeSuite(encr[0], encr[1], found.get("prf", Prf.PRF_HMAC_SHA2_256), integ, found["dh"])


def parse_esp_suite(text: str) -> EspSuite:
    found, integ = _parse_suite("ESP", text, {"encr": _ENCR, "integ": _INTEG, "dh": _DH,
                                              "esn": _ESN},
                                ("encr",), "an encryption algorithm")
    encr = found["encr"]
    return EspSuite(encr[0], encr[1], integ, found.get("dh", DhGroup.NONE),
                    found.get("esn", False))


# --- offering ---------------------------------------------------------------------------------

def ike_proposals(suites, spi: bytes = b"") -> tuple[Proposal, ...]:
    out = []
    for n, s in enumerate(suites, 1):
        t = [Transform(TransformType.ENCR, s.encr, s.key_bits), Transform(TransformType.PRF, s.prf)]
        if not s.aead:
            t.append(Transform(TransformType.INTEG, s.integ))
        t.append(Transform(TransformType.DH, s.dh))
        out.append(Proposal(n, ProtocolId.IKE, spi, tuple(t)))
    return tuple(out)


def esp_proposals(suites, spi: bytes, pfs: bool) -> tuple[Proposal, ...]:
    out = []
    for n, s in enumerate(suites, 1):
        t = [Transform(TransformType.ENCR, s.encr, s.key_bits)]
        if not s.aead:
            t.append(Transform(TransformType.INTEG, s.integ))
        if pfs and s.dh:
            t.append(Transform(TransformType.DH, s.dh))
        t.append(Transform(TransformType.ESN, Esn.ESN if s.esn else Esn.NO_ESN))
        out.append(Proposal(n, ProtocolId.ESP, spi, tuple(t)))
    return tuple(out)


# --- choosing ------------------------------------------------------------------------------------

def _has(p: Proposal, ttype: int, tid: int, key_bits: int | None = None) -> bool:
    return any(t.type == ttype and t.id == tid and (key_bits is None or t.key_length == key_bits)
               for t in p.transforms)


def choose_ike(offered: tuple[Proposal, ...], suites) -> tuple[Proposal, IkeSuite] | None:
    """Responder: the first acceptable peer proposal, answered as (proposal, suite)."""
    for p in offered:
        if p.protocol != ProtocolId.IKE:
            continue
        for s in suites:
            if not (_has(p, TransformType.ENCR, s.encr, s.key_bits)
                    and _has(p, TransformType.PRF, s.prf)
                    and _has(p, TransformType.DH, s.dh)
                    and (s.aead or _has(p, TransformType.INTEG, s.integ))):
                continue
            if s.aead and any(t.type == TransformType.INTEG and t.id != Integ.NONE
                              for t in p.transforms) and not _has(p, TransformType.INTEG, 0):
                continue          # an AEAD proposal must not require an integrity transform
            return (Proposal(p.number, ProtocolId.IKE, p.spi, ike_proposals([s])[0].transforms), s)
    return None


def choose_esp(offered: tuple[Proposal, ...], suites, dh_required: int | None
               ) -> tuple[Proposal, EspSuite] | None:
    """Responder: pick an ESP proposal; returns (the peer's proposal, the suite chosen), the
    answer is ``esp_answer``.  ``dh_required``: in CREATE_CHILD_SA the KE group the
    initiator sent (then the proposal must list it), or None in IKE_AUTH (DH ignored, §1.2)."""
    for p in offered:
        if p.protocol != ProtocolId.ESP or len(p.spi) != 4 or p.spi == _SPI_ZERO:
            continue          # RFC 4303 §2.1: SPI 0 "MUST NOT be sent on the wire"
        for s in suites:
            if not (_has(p, TransformType.ENCR, s.encr, s.key_bits)
                    and (s.aead or _has(p, TransformType.INTEG, s.integ))):
                continue
            esn_ids = {t.id for t in p.transforms if t.type == TransformType.ESN}
            esn = s.esn
            if esn_ids and (Esn.ESN if esn else Esn.NO_ESN) not in esn_ids:
                if Esn.ESN in esn_ids:
                    esn = True              # the peer insists on ESN; our ESP supports it
                else:
                    continue
            dh: int = DhGroup.NONE
            if dh_required:
                if not _has(p, TransformType.DH, dh_required):
                    continue
                dh = dh_required
            elif dh_required is not None:       # CREATE_CHILD_SA without KE: no PFS offered
                dh_ids = {t.id for t in p.transforms if t.type == TransformType.DH}
                if dh_ids and DhGroup.NONE not in dh_ids:
                    continue
            return p, EspSuite(s.encr, s.key_bits, s.integ, dh, esn)
    return None


def esp_answer(peer: Proposal, suite: EspSuite, our_spi: bytes) -> Proposal:
    """The one proposal a responder sends back: peer's number, our SPI, one transform a type."""
    return Proposal(peer.number, ProtocolId.ESP, our_spi,
                    esp_proposals([suite], our_spi, pfs=bool(suite.dh))[0].transforms)


def accept_ike_answer(answer: tuple[Proposal, ...], suites) -> IkeSuite | None:
    """Initiator: the single answered proposal must be exactly one of our suites (§2.7)."""
    if len(answer) != 1:
        return None
    p = answer[0]
    if p.protocol != ProtocolId.IKE:
        return None
    for s in suites:
        if _transform_set(p) == _transform_set(ike_proposals([s])[0]):
            return s
    return None


def accept_esp_answer(answer: tuple[Proposal, ...], suites, pfs_group: int | None
                      ) -> EspSuite | None:
    if len(answer) != 1:
        return None
    p = answer[0]
    if p.protocol != ProtocolId.ESP or len(p.spi) != 4 or p.spi == _SPI_ZERO:
        return None           # RFC 4303 §2.1: an answer with SPI 0 names no usable SA
    for s in suites:
        cand = EspSuite(s.encr, s.key_bits, s.integ, pfs_group or DhGroup.NONE, s.esn)
        if _transform_set(p) == _transform_set(esp_proposals([cand], p.spi, bool(pfs_group))[0]):
            return cand
    return None


_SPI_ZERO = bytes(4)


def _transform_set(p: Proposal) -> frozenset:
    return frozenset((t.type, t.id, t.key_length) for t in p.transforms)
