"""A negotiated ESP child SA (RFC 7296 §2.17) and how it becomes two mipsec ESP SAs.

``ChildSa`` is plain data: SPIs, the chosen suite, the keys per direction, traffic selectors and
the outer addressing the IKE SA had when the child was made.  ``make_sas`` builds the inbound and
outbound ``mipsec.ipsec.sa.SecurityAssociation`` (docs/design.md) from it; the roles install
them in their SAD/SPD.

Key order (§2.17): KEYMAT = prf+(SK_d, [g^ir |] Ni | Nr) is cut into the initiator-to-responder
encryption key, initiator-to-responder integrity key, then the responder-to-initiator pair, where
"initiator" is the initiator of the exchange that created the child (IKE_AUTH: the IKE SA's
initiator; CREATE_CHILD_SA: whoever sent that request).  An AES-GCM key includes its 4-octet salt
at the end (RFC 4106 §8.1), which is how the ESP layer expects it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mipsec.ike.codec import TrafficSelector
from mipsec.ike.constants import NAT_T_PORT
from mipsec.ike.proposals import EspSuite


@dataclass(frozen=True, slots=True)
class ChildKeys:
    encr_in: bytes
    integ_in: bytes
    encr_out: bytes
    integ_out: bytes


def split_keymat(keymat: bytes, suite: EspSuite, we_initiated: bool) -> ChildKeys:
    e, a = suite.keymat_lengths()
    ei, ai = keymat[:e], keymat[e:e + a]
    er, ar = keymat[e + a:2 * e + a], keymat[2 * e + a:2 * e + 2 * a]
    if we_initiated:
        return ChildKeys(encr_in=er, integ_in=ar, encr_out=ei, integ_out=ai)
    return ChildKeys(encr_in=ei, integ_in=ai, encr_out=er, integ_out=ar)


@dataclass(frozen=True, slots=True)
class ChildSa:
    spi_in: int                    # we chose it; the peer sends ESP with it
    spi_out: int                   # the peer chose it; we send ESP with it
    suite: EspSuite
    keys: ChildKeys = field(repr=False)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    local_address: str             # outer addresses at creation time (MOBIKE may move them)
    remote_address: str
    udp_encap: bool                # RFC 3948: NAT detected (or forced) -> ESP in UDP 4500
    local_port: int = NAT_T_PORT
    remote_port: int = NAT_T_PORT
    created: float = 0.0

    @property
    def encryption(self) -> str:
        return self.suite.encryption_name

    @property
    def integrity(self) -> str | None:
        return self.suite.integrity_name

    def selector(self):
        """The inner-packet selector, local point of view (None parts = any).  A TS list that is
        not exactly one prefix each side becomes the covering wildcard on that side."""
        from mipsec.ipsec.selector import Selector

        def one(ts: tuple[TrafficSelector, ...]) -> tuple[str | None, int | None]:
            if len(ts) != 1:
                return None, None
            net = ts[0].as_network()
            if net == "0.0.0.0/0":
                net = None
            return net, ts[0].ip_protocol or None
        local, lp = one(self.local_ts)
        remote, rp = one(self.remote_ts)
        return Selector(local=local, remote=remote, protocol=lp or rp)

    def make_sas(self, *, now: float = 0.0, local: str | None = None, remote: str | None = None,
                 inbound_any_source: bool = False, with_selector: bool = True, lifetime=None):
        """(inbound, outbound) ``SecurityAssociation`` for this child.

        ``local``/``remote`` override the outer addresses (e.g. after MOBIKE moved them);
        ``inbound_any_source`` gives the inbound SA a wildcard peer (the GW during handover)."""
        from mipsec.ipsec.sa import Direction, SecurityAssociation, UdpEncap
        local = local or self.local_address
        remote = remote or self.remote_address
        sel = self.selector() if with_selector else None
        enc_in = UdpEncap(local_port=self.local_port, remote_port=self.remote_port) \
            if self.udp_encap else None
        inbound = SecurityAssociation(
            spi=self.spi_in, direction=Direction.INBOUND,
            encryption=self.encryption, encryption_key=self.keys.encr_in,
            integrity=self.integrity, integrity_key=self.keys.integ_in,
            local=local, remote=None if inbound_any_source else remote, esn=self.suite.esn,
            udp_encap=enc_in, selector=sel, lifetime=lifetime, now=now)
        outbound = SecurityAssociation(
            spi=self.spi_out, direction=Direction.OUTBOUND,
            encryption=self.encryption, encryption_key=self.keys.encr_out,
            integrity=self.integrity, integrity_key=self.keys.integ_out,
            local=local, remote=remote, esn=self.suite.esn,
            udp_encap=enc_in, selector=sel, lifetime=lifetime, now=now)
        return inbound, outbound

    def describe(self) -> dict:
        return {"spi_in": f"{self.spi_in:08x}", "spi_out": f"{self.spi_out:08x}",
                "encryption": self.encryption, "key_bits": self.suite.key_bits,
                "integrity": self.integrity, "udp_encap": self.udp_encap,
                "local_ts": [f"{t.start_address}-{t.end_address}" for t in self.local_ts],
                "remote_ts": [f"{t.start_address}-{t.end_address}" for t in self.remote_ts],
                "local": self.local_address, "remote": self.remote_address}
