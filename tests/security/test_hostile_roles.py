"""Structured attacks on the roles' entry points (failure paths and the daemon data path).

The basic refusals (forged / replayed RRQ and SIU, another MN's home address, forbidden
destination) are in test_handover_failures.py, random mutation in test_roles_fuzz.py.  Here:
messages that are valid except for one field or one extension, delivered straight to
``receive_from_net`` of a registered topology.  Each must return normally, count its specific
DropReason, send nothing, and leave every binding, SA address, sequence number, replay window
and registration state as it was (``status()`` without its drop counters and timeline).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason as R
from mipsec.mip import ipip
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.node.actions import SendToNet
from mipsec.node.packet import a2b, build_udp_packet
from mipsec.sim.scenario import wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4, checksum
from mipsec.wire.mip import (
    EXT_MN_HA_AUTH,
    EXT_NAI,
    Extension,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    auth_extension,
    build_registration_reply,
    build_registration_request,
    nai_extension,
)

_VOLATILE = ("drops", "sad_drops", "timeline")


def _status(role, now):
    try:
        s = role.status(now)
    except TypeError:
        s = role.status()
    return {k: v for k, v in s.items() if k not in _VOLATILE}


@pytest.fixture(scope="module")
def topo():
    t = build_topology(2, internet_delay_s=0.002, seed=21)
    t.move("a", 0)
    t.move("a", 1)
    assert wait_registered(t, 1.0)
    return t


class Refusal:
    """Feeds one input to one role; asserts the reason, no packet out, and no state change."""

    def __init__(self, topo):
        self.topo = topo
        self.roles = topo.roles()

    def __call__(self, role, packet: bytes, reason: R, what: str = "") -> None:
        now = self.topo.sim.now
        before = [_status(r, now) for r in self.roles]
        counted = role.drops[reason]
        actions = role.receive_from_net(packet, now)
        assert not [a for a in actions if isinstance(a, SendToNet)], what
        assert role.drops[reason] == counted + 1, (what, dict(role.drops))
        assert [_status(r, now) for r in self.roles] == before, what


def _rrq_bytes(mn, *, home=None, care_of=None, ident=None, msa=None, before=(), after=(),
               auth_data=None, lifetime=600):
    """An RRQ as MN ``mn`` would send it, with extensions before and after the MN-HA one."""
    msa = msa or mn.msa
    rrq = RegistrationRequest(home_address=home or mn.home_address, home_agent=mn._ha,
                              care_of_address=care_of or mn.care_of,
                              identification=ident if ident is not None
                              else mn.msa.new_identification(mn.wallclock()),
                              lifetime=lifetime, flags=RequestFlags.D | RequestFlags.T,
                              extensions=tuple(before))
    body = build_registration_request(rrq)
    signed = msa.sign(body) if auth_data is None else body + Extension(
        EXT_MN_HA_AUTH, msa.spi.to_bytes(4, "big") + auth_data).encode()
    return signed + b"".join(e.encode() for e in after)


def _to_ha(topo, payload, src="172.16.1.10"):
    return build_udp_packet(a2b(src), a2b(topo.ha.role.address), 434, 434, payload)


def test_rrq_extension_attacks_at_the_home_agent(topo):
    refuse = Refusal(topo)
    ha = topo.ha.role
    a, b = topo.mobiles[0].role, topo.mobiles[1].role
    last = ha._msa_by_spi[a.msa.spi][0].last_accepted_id
    cases = [
        ("zero-length authenticator", _rrq_bytes(a, auth_data=b""), R.MIP_AUTH_FAILED),
        ("12-byte authenticator", _rrq_bytes(a, auth_data=bytes(12)), R.MIP_AUTH_FAILED),
        ("authenticator cut, length field kept", _rrq_bytes(a)[:-4], R.TRUNCATED),
        ("one byte after the authenticator", _rrq_bytes(a) + b"\x00", R.TRUNCATED),
        ("auth extension with 3 bytes of SPI",
         _rrq_bytes(a, auth_data=b"")[:-6] + bytes((EXT_MN_HA_AUTH, 3)) + b"\x00\x00\x01",
         R.MIP_BAD_EXTENSION),
        ("duplicated MN-HA extension", _rrq_bytes(a) * 1 + auth_extension(a.msa.spi, bytes(16))
         .encode(), R.MIP_BAD_EXTENSION),
        ("unknown non-skippable extension before the auth",
         _rrq_bytes(a, before=[Extension(99, b"x")]), R.MIP_BAD_EXTENSION),
        ("unknown non-skippable extension after the auth",
         _rrq_bytes(a, after=[Extension(99, b"x")]), R.MIP_BAD_EXTENSION),
        ("long-format extension we do not know (type 36)",
         _rrq_bytes(a, before=[Extension(36, b"abcd", subtype=1)]), R.MIP_BAD_EXTENSION),
        ("extension length past the end", _rrq_bytes(a) + bytes((200, 40)) + b"short",
         R.TRUNCATED),
        ("empty NAI", _rrq_bytes(a, before=[Extension(EXT_NAI, b"")]), R.MIP_BAD_EXTENSION),
        ("signed with B's key under A's SPI",
         _rrq_bytes(a, msa=MobilitySecurityAssociation(a.msa.spi, b"B's key, not A's")),
         R.MIP_AUTH_FAILED),
        ("A's key, B's home address", _rrq_bytes(a, home=b.home_address),
         R.MIP_HOME_ADDRESS_NOT_OWNED),
        ("A's key, B's home address and B's NAI",
         _rrq_bytes(a, home=b.home_address, before=[nai_extension("b@mipsec")]),
         R.MIP_HOME_ADDRESS_NOT_OWNED),
        ("identification = the last accepted one", _rrq_bytes(a, ident=last), R.MIP_REPLAYED),
        ("identification one below it", _rrq_bytes(a, ident=last - 1), R.MIP_REPLAYED),
        ("identification half the NTP space away", _rrq_bytes(a, ident=(last + 2**63) % 2**64),
         R.MIP_REPLAYED),
        ("identification 0 (years ahead, serial arithmetic)", _rrq_bytes(a, ident=0),
         R.MIP_IDENTIFICATION_MISMATCH),
        ("identification 2**64-1", _rrq_bytes(a, ident=2**64 - 1), R.MIP_IDENTIFICATION_MISMATCH),
        ("identification 8 s ahead", _rrq_bytes(a, ident=last + (8 << 32)),
         R.MIP_IDENTIFICATION_MISMATCH),
        ("not a request (type 3)", b"\x03" + _rrq_bytes(a)[1:], R.MALFORMED),
        ("empty payload", b"", R.MALFORMED),
        ("fixed part only, no authentication", _rrq_bytes(a)[:24], R.MIP_NO_AUTH),
    ]
    for what, payload, reason in cases:
        if reason in (R.MIP_REPLAYED, R.MIP_IDENTIFICATION_MISMATCH):
            # authenticated but stale: answered with code 133 (RFC 5944 §3.8.3.1) through a
            # REJECT SIU, which moves nothing: only the binding state is compared here
            binding = dict(ha.status(topo.sim.now)["bindings"])
            count = ha.drops[reason]
            ha.receive_from_net(_to_ha(topo, payload), topo.sim.now)
            assert ha.drops[reason] == count + 1, what
            assert ha.status(topo.sim.now)["bindings"] == binding, what
            continue
        refuse(ha, _to_ha(topo, payload), reason, what)


def test_another_mns_nai_does_not_make_a_request_speak_for_that_mn(topo):
    """RFC 2794 NAI: identity here is the MSA (SPI + key) and the home address it owns; an NAI
    naming another MN changes nothing for that other MN."""
    ha = topo.ha.role
    a, b = topo.mobiles[0].role, topo.mobiles[1].role
    b_binding = dict(ha.status(topo.sim.now)["bindings"][b.home_address])
    actions = ha.receive_from_net(
        _to_ha(topo, _rrq_bytes(a, before=[nai_extension("b@mipsec")])), topo.sim.now)
    assert any(isinstance(x, SendToNet) for x in actions)          # A's own request is served
    after = ha.status(topo.sim.now)["bindings"]
    assert after[b.home_address] == b_binding
    assert after[a.home_address]["care_of"] == a.care_of


def test_registration_reply_attacks_at_the_mobile_node(topo):
    refuse = Refusal(topo)
    a, b = topo.mobiles[0].role, topo.mobiles[1].role
    ha = topo.ha.role

    def rrp(home, msa, code=ReplyCode.ACCEPTED, ident=1):
        return msa.sign(build_registration_reply(RegistrationReply(
            code=code, home_address=home, home_agent=ha.address, identification=ident,
            lifetime=600)))

    def direct(payload, src=ha.address):
        return build_udp_packet(a2b(src), a2b(a.care_of), 434, 434, payload)

    # nothing pending: every reply is unexpected, before any crypto is spent on it
    assert a.reg.pending_id is None
    for what, payload in [("B's reply", rrp(b.home_address, b.msa)),
                          ("A's reply, never asked for", rrp(a.home_address, a.msa)),
                          ("garbage", os.urandom(40))]:
        refuse(a, direct(payload), R.MIP_UNEXPECTED_REPLY, what)
    refuse(a, direct(rrp(a.home_address, a.msa), src="10.1.0.66"), R.MIP_NOT_FOR_US,
           "reply from an address that is not our HA")


def test_reverse_tunnel_attacks_at_the_home_agent(topo):
    refuse = Refusal(topo)
    ha = topo.ha.role
    a, b = topo.mobiles[0].role, topo.mobiles[1].role
    inner_ok = build_ipv4(Ipv4Header(a.home_address, "10.1.0.10", 17),
                          b"\x00\x01\x00\x02\x00\x0bpay")

    def tunnel(inner, outer_src=a.care_of):
        return ipip.encapsulate(inner, outer_src, ha.address)

    refuse(ha, tunnel(b"\x40" + inner_ok[1:]), R.IPIP_BAD_INNER, "inner IHL 0")
    refuse(ha, tunnel(b"\x4f" + inner_ok[1:]), R.IPIP_BAD_INNER, "inner IHL 15 past the end")
    refuse(ha, tunnel(inner_ok[:19]), R.IPIP_BAD_INNER, "inner shorter than a header")
    refuse(ha, tunnel(inner_ok + b"\x00"), R.IPIP_BAD_INNER, "inner total length short")
    refuse(ha, tunnel(inner_ok, outer_src=b.care_of), R.REVERSE_TUNNEL_SOURCE_MISMATCH,
           "A's packet from B's care-of address")
    spoof = build_ipv4(Ipv4Header(b.home_address, "10.1.0.10", 17), inner_ok[20:])
    refuse(ha, tunnel(spoof), R.REVERSE_TUNNEL_SOURCE_MISMATCH, "B's home address from A's CoA")
    stranger = build_ipv4(Ipv4Header("10.1.0.99", "10.1.0.10", 17), inner_ok[20:])
    refuse(ha, tunnel(stranger), R.IPIP_UNKNOWN_TUNNEL, "home address without a binding")
    frag = bytearray(tunnel(inner_ok))
    frag[6] |= 0x20
    frag[10:12] = b"\0\0"
    frag[10:12] = checksum(bytes(frag[:20])).to_bytes(2, "big")
    refuse(ha, bytes(frag), R.IP_FRAGMENT, "outer fragment")


def test_esp_attacks_at_the_gateway(topo):
    refuse = Refusal(topo)
    gw = topo.gw.role
    a = topo.mobiles[0].role
    inner = build_ipv4(Ipv4Header(a.home_address, "10.1.0.10", 17), b"\x00\x01\x00\x02\x00\x08")
    tunnelled = ipip.encapsulate(inner, a.care_of, a._ha)
    packet = a.outbound.encapsulate(tunnelled, topo.sim.now)
    a.outbound.sequence -= 1          # the MN never sent it: its own state stays consistent
    for spi in (0, 1, 255):
        bad = packet[:20] + spi.to_bytes(4, "big") + packet[24:]
        refuse(gw, bad, R.UNKNOWN_SPI, f"SPI {spi}")
    keepalive = build_udp_packet(a2b(a.care_of), a2b(gw.outside), 4500, 4500, b"\xff",
                                 with_checksum=False)
    refuse(gw, keepalive, R.NAT_KEEPALIVE, "NAT keepalive")
    refuse(gw, packet[:-1], R.BAD_IP_TOTAL_LENGTH, "one byte short")
    # IHL 6 without option bytes: the SPI is read 4 bytes late (the sequence number 1)
    refuse(gw, b"\x46" + packet[1:], R.UNKNOWN_SPI, "IHL 6 claimed")


# --- property: signed RRQs with arbitrary extension lists never raise ---------------------------
_EXT = st.one_of(
    st.builds(Extension, st.integers(0, 255), st.binary(max_size=20)),
    st.builds(lambda t, d: Extension(t, d, subtype=0), st.sampled_from([36, 38]),
              st.binary(max_size=20)),
    st.just(nai_extension("a@mipsec")),
)


@settings(max_examples=examples(150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(before=st.lists(_EXT, max_size=3), after=st.lists(_EXT, max_size=2),
       cut=st.integers(0, 8))
def test_signed_requests_with_any_extensions_never_raise(topo, before, after, cut):
    ha = topo.ha.role
    a = topo.mobiles[0].role
    try:
        payload = _rrq_bytes(a, before=before, after=after)
    except Exception:                 # an extension the builder refuses: not remote input
        return
    if cut:
        payload = payload[:-cut]
    bindings = {h: (v["care_of"]) for h, v in ha.status(topo.sim.now)["bindings"].items()}
    drops = sum(ha.drops.values())
    ha.receive_from_net(_to_ha(topo, payload, src=a.care_of), topo.sim.now)   # never raises
    after_b = {h: (v["care_of"]) for h, v in ha.status(topo.sim.now)["bindings"].items()}
    assert after_b == bindings        # same CoA either way: accepted refresh or refusal
    if sum(ha.drops.values()) == drops and cut:
        assert after                  # accepted although cut: only unauthenticated tail went


def test_siu_carrying_another_mns_reply_is_refused_by_the_mobile_node(topo):
    """docs/protocol.md: the RRP inside an SIU is protected end to end by the MN-HA
    authenticator, and the GW checks its header too (SIU_RRP_MISMATCH).  An
    (HA-signed) SIU for A that carries B's reply is refused by the GW (nothing encrypted to A);
    and should such a reply reach A anyway (a GW without the check: here encrypted with the GW's
    SA directly), A refuses it: with no request pending as MIP_UNEXPECTED_REPLY, with one pending
    as MIP_UNKNOWN_SPI (B's MSA); A's registration state and SAs do not move."""
    from mipsec.mip.siu import SiuSigner
    from mipsec.wire.siu import SiuType

    gw, ha = topo.gw.role, topo.ha.role
    a, b = topo.mobiles[0].role, topo.mobiles[1].role
    mobile = gw.mobiles[a.home_address]
    b_reply = b.msa.sign(build_registration_reply(RegistrationReply(
        code=ReplyCode.ACCEPTED, home_address=b.home_address, home_agent=ha.address,
        identification=a.reg.pending_id or 1, lifetime=600)))
    signer = SiuSigner(ha.address, topo.configs.gateway.home_agents[0].key, 1,
                       first_sequence=gw.verifier.last_sequence[ha.address] + 1)
    for pending in (False, True):
        if pending:
            a.reg.pending_id = a.msa.new_identification(a.wallclock())   # as if an RRQ were out
        siu = signer.build(SiuType.UPDATE, home_address=a.home_address,
                           old_care_of=mobile.care_of, new_care_of=mobile.care_of,
                           gateway_spi=mobile.outbound.spi, lifetime=600, rrp=b_reply,
                           wallclock=0.0, gateway_epoch=gw.epoch)
        out = gw.receive_siu(build_udp_packet(a2b(ha.address), a2b(gw.inside), 4343, 4343,
                                              siu), topo.sim.now)
        esp = [x.packet for x in out if isinstance(x, SendToNet)
               and x.packet[16:20] == a2b(a.care_of)]
        assert esp == [] and gw.drops[R.SIU_RRP_MISMATCH] == 1 + pending
        esp = [mobile.outbound.encapsulate(build_udp_packet(
            a2b(ha.address), a2b(a.care_of), 434, 434, b_reply), topo.sim.now)]
        before = _status(a, topo.sim.now)
        reason = R.MIP_UNKNOWN_SPI if pending else R.MIP_UNEXPECTED_REPLY
        count = a.drops[reason]
        assert a.receive_from_net(esp[0], topo.sim.now) == []
        assert a.drops[reason] == count + 1
        after = _status(a, topo.sim.now)
        # the ESP SA accepted the GW's packet (its window moved); nothing else did
        for s in (before, after):
            s["sas"]["inbound"].pop("replay_window")
            s["sas"]["inbound"].pop("counters")
        assert after == before
    a.reg.pending_id = None


# --- unusable care-of addresses -----------------------------------------------------
def _fresh_registered(seed=3, configs=None):
    t = build_topology(1, internet_delay_s=0.002, seed=seed, **({"configs": configs} if configs else {}))
    t.move("a", 0)
    assert wait_registered(t, 1.0)
    return t


def _send_own_rrq(topo, care_of):
    """The MN's own, correctly authenticated RRQ (fresh identification), through its tunnel."""
    mn = topo.mn.role
    rrq = RegistrationRequest(home_address=mn.home_address, home_agent=mn._ha,
                              care_of_address=care_of,
                              identification=mn.msa.new_identification(mn.wallclock()),
                              lifetime=600, flags=RequestFlags.D | RequestFlags.T)
    data = mn.msa.sign(build_registration_request(rrq))
    inner = build_udp_packet(mn._care_of_b, mn._ha_b, 434, 434, data)
    topo.mn.driver.perform([SendToNet(mn.outbound.encapsulate(inner, topo.sim.now), "a")])


@pytest.mark.parametrize("care_of", ["0.0.0.0", "255.255.255.255", "224.0.0.1", "127.0.0.1",
                                     "240.0.0.1", "10.1.0.2", "10.1.0.1",
                                     "172.16.0.1",    # the HA, the GW inside and outside
                                     "10.1.0.10", "10.1.0.101"])   # on the home prefix
def test_rrq_with_unusable_care_of_is_refused_and_bounded(care_of):
    """Observed before the fix: CoA 0.0.0.0 was bound and started ~5000 SIUs/s of virtual time
    between HA and GW forever; 255.255.255.255 / 224.0.0.1 / 127.0.0.1 / the GW's outside
    address re-pointed the GW's outbound SA there."""
    topo = _fresh_registered()
    ha, gw = topo.ha.role, topo.gw.role
    home = topo.mn.role.home_address
    before_ha = ha.bindings[home].care_of_address
    before_gw = gw.mobiles[home].outbound.remote
    seq_before = dict(ha.status()["siu_next_sequence"])
    _send_own_rrq(topo, care_of)
    topo.sim.run_for(0.5)
    assert ha.bindings[home].care_of_address == before_ha
    assert gw.mobiles[home].outbound.remote == before_gw
    sent = sum(ha.status()["siu_next_sequence"].values()) - sum(seq_before.values())
    assert sent == 0, f"{sent} SIUs sent for a refused request"
    assert ha.drops[R.MIP_BAD_CARE_OF] == 1


def test_gateway_refuses_an_siu_naming_an_unusable_care_of(topo):
    """Defence in depth: a correctly signed UPDATE / REJECT from the HA naming an unusable CoA
    moves nothing and sends nothing to it; the ACK still tells the HA where the SA points."""
    from mipsec.mip.siu import SiuVerifier
    from mipsec.wire.siu import SiuType
    gw, ha = topo.gw.role, topo.ha.role
    home = topo.mobiles[0].role.home_address
    mobile = gw.mobiles[home]
    for kind, bad in [(SiuType.UPDATE, "224.0.0.1"), (SiuType.UPDATE, "172.16.0.1"),
                      (SiuType.UPDATE, "127.0.0.1"), (SiuType.REJECT, "10.1.0.1"),
                      (SiuType.REJECT, "255.255.255.255"), (SiuType.UPDATE, "10.1.0.10")]:
        signer = _ha_signer(topo)
        data = signer.build(kind, home_address=home, old_care_of=mobile.care_of, new_care_of=bad,
                            gateway_spi=mobile.outbound.spi, lifetime=600,
                            rrp=b"\x03" + bytes(19), wallclock=0.0,
                            gateway_epoch=gw.epoch)
        before = (mobile.care_of, mobile.outbound.remote, mobile.outbound.sequence)
        drops = gw.drops[R.MIP_BAD_CARE_OF]
        actions = gw.receive_siu(
            build_udp_packet(a2b(ha.address), a2b(gw.inside), 4343, 4343, data), topo.sim.now)
        assert gw.drops[R.MIP_BAD_CARE_OF] == drops + 1, (kind, bad)
        assert (mobile.care_of, mobile.outbound.remote, mobile.outbound.sequence) == before
        sent = [a for a in actions if isinstance(a, SendToNet)]
        assert len(sent) == 1 and sent[0].packet[16:20] == a2b(ha.address)   # the ACK only
        ack = SiuVerifier({gw.inside: (1, topo.configs.gateway.home_agents[0].key)}).verify(
            gw.inside, sent[0].packet[28:])
        assert ack.type == SiuType.ACK and ack.new_care_of == mobile.care_of


def _ha_signer(topo):
    from mipsec.mip.siu import SiuSigner
    gw, ha = topo.gw.role, topo.ha.role
    return SiuSigner(ha.address, topo.configs.gateway.home_agents[0].key, 1,
                     first_sequence=gw.verifier.last_sequence[ha.address] + 1)


def test_home_agent_sends_one_correction_per_siu_it_originated():
    """An HA that does not know the GW's outside address (a config without
    gateway.outside_address) binds it; the GW refuses the SIU and ACKs its real CoA; the HA
    sends ONE correcting SIU, the GW refuses that too, and the exchange stops there."""
    import dataclasses

    from mipsec.node.config import make_lab_configs
    cfg = make_lab_configs(1)
    ha_cfg = dataclasses.replace(cfg.home_agent, gateways=tuple(
        dataclasses.replace(g, outside_address="") for g in cfg.home_agent.gateways))
    topo = _fresh_registered(configs=dataclasses.replace(cfg, home_agent=ha_cfg))
    ha, gw = topo.ha.role, topo.gw.role
    home = topo.mn.role.home_address
    before_gw = gw.mobiles[home].outbound.remote
    seq_before = sum(ha.status()["siu_next_sequence"].values())
    _send_own_rrq(topo, "172.16.0.1")
    topo.sim.run_for(2.0)
    assert gw.mobiles[home].outbound.remote == before_gw
    assert sum(ha.status()["siu_next_sequence"].values()) - seq_before == 2
    assert gw.drops[R.MIP_BAD_CARE_OF] == 2
    assert [e.kind for e in ha.timeline].count("siu-correction-refused") == 1


# --- unauthenticated input only counts ---------------------------------------------
def test_forged_rrqs_and_sius_change_nothing_but_drop_counters():
    """Observed before the fix: each forged RRQ / SIU appended a timeline event (~380 / ~310
    bytes, up to 200,000 kept per role) and replaced status()["timeline"] (what `mipsec status`
    shows as the last handover) with attacker-chosen addresses."""
    topo = _fresh_registered()
    ha, gw, mn = topo.ha.role, topo.gw.role, topo.mn.role
    now = topo.sim.now
    without = lambda s: {k: v for k, v in s.items() if k not in ("drops", "sad_drops")}  # noqa: E731
    ha_before, gw_before = without(ha.status(now)), without(gw.status())
    ha_events, gw_events = len(ha.timeline), len(gw.timeline)
    signer = _ha_signer(topo)
    for i in range(300):
        # forged RRQs: right SPI and a random authenticator; no authentication; an unknown SPI
        exts = [(auth_extension(mn.msa.spi, os.urandom(16)),), (),
                (auth_extension(0x7777, os.urandom(16)),)][i % 3]
        rrq = RegistrationRequest(home_address=mn.home_address, home_agent=ha.address,
                                  care_of_address=f"192.0.2.{i % 250}", identification=i,
                                  lifetime=600, extensions=exts)
        actions = ha.receive_from_net(build_udp_packet(a2b("172.16.1.10"), a2b(ha.address), 434,
                                                       434, build_registration_request(rrq)), now)
        assert actions == []
        # forged SIUs (random bytes; a bad HMAC; from another sender) to the GW's inside address
        if i % 3 == 0:
            payload, src = os.urandom(40 + i), ha.address
        else:
            from mipsec.wire.siu import SiuType
            payload = bytearray(signer.build(SiuType.UPDATE, home_address=mn.home_address,
                                             old_care_of="172.16.1.10", new_care_of="192.0.2.7",
                                             gateway_spi=0, lifetime=600, rrp=b"", wallclock=0.0))
            payload[-1] ^= 1
            src = ha.address if i % 3 == 1 else "10.1.0.66"
        actions = gw.receive_siu(build_udp_packet(a2b(src), a2b(gw.inside), 4343, 4343,
                                                  bytes(payload)), now)
        assert actions == []
    assert ha.drops[R.MIP_AUTH_FAILED] == 100 and ha.drops[R.MIP_NO_AUTH] == 100
    assert ha.drops[R.MIP_UNKNOWN_SPI] == 100
    assert gw.drops[R.SIU_AUTH_FAILED] + gw.drops[R.SIU_UNKNOWN_SENDER] >= 200
    assert sum(gw.drops.values()) >= 300
    assert (len(ha.timeline), len(gw.timeline)) == (ha_events, gw_events)
    assert without(ha.status(now)) == ha_before
    assert without(gw.status()) == gw_before


# --- the HA's expiry heap -----------------------------------------------------------
def test_re_registrations_do_not_grow_the_expiry_heap():
    """Observed before the fix: 2,000 valid re-registrations of one MN left 2,001 heap entries
    (each superseded one kept until its own expiry: memory = rate x lifetime)."""
    topo = _fresh_registered(seed=21)
    ha, mn = topo.ha.role, topo.mn.role
    for i in range(2000):
        rrq = RegistrationRequest(home_address=mn.home_address, home_agent=mn._ha,
                                  care_of_address=mn.care_of,
                                  identification=mn.msa.new_identification(mn.wallclock()),
                                  lifetime=600 - i % 7, flags=RequestFlags.D | RequestFlags.T)
        data = mn.msa.sign(build_registration_request(rrq))
        ha.receive_from_net(build_udp_packet(a2b(mn.care_of), a2b(ha.address), 434, 434, data),
                            topo.sim.now)
        assert len(ha.machine.expiry) <= 2 * len(ha.bindings) + 16, (i, len(ha.machine.expiry))
    assert not ha.drops
    # the live entry is still there: the binding expires at its latest lifetime, not before
    expires = ha.bindings[mn.home_address].expires
    assert ha.get_timer() <= expires
    ha.handle_timer(expires - 0.001)
    assert mn.home_address in ha.bindings
    ha.handle_timer(expires)
    assert mn.home_address not in ha.bindings


# --- the RRP inside an SIU is checked by the GW -------------------------------------
def _rrp_for(home_address, ha="10.1.0.2"):
    return build_registration_reply(RegistrationReply(
        code=ReplyCode.ACCEPTED, home_address=home_address, home_agent=ha, identification=7,
        lifetime=600))


@pytest.mark.parametrize("which", ["other-mn", "not-a-reply", "a-request-type", "truncated",
                                   "another-home-agent"])
@pytest.mark.parametrize("move", [False, True])
def test_siu_embedding_a_foreign_rrp_is_refused(which, move):
    """Observed before: the GW encrypted whatever the SIU carried to the MN's CoA with the MN's
    SA (another MN's reply, no reply at all).  Now SIU_RRP_MISMATCH: nothing sent to the MN, no
    SA moved (also when the SIU would move it), no ESP sequence number spent."""
    from mipsec.mip.siu import SiuVerifier
    from mipsec.wire.siu import SiuType
    topo = build_topology(2, internet_delay_s=0.002, seed=4)
    topo.move("a", 0)
    topo.move("a", 1)
    assert wait_registered(topo, 1.0)
    gw, ha = topo.gw.role, topo.ha.role
    a_home = topo.mobiles[0].role.home_address
    b_home = topo.mobiles[1].role.home_address
    mobile = gw.mobiles[a_home]
    rrp = {"other-mn": _rrp_for(b_home), "not-a-reply": b"\x00" * 40,
           "a-request-type": b"\x01" + _rrp_for(a_home)[1:], "truncated": _rrp_for(a_home)[:19],
           "another-home-agent": _rrp_for(a_home, ha="10.1.0.3")}[which]
    new = "172.16.2.10" if move else mobile.care_of
    mobile.note_rrq_source(a2b(new), a2b(new), None, topo.sim.now)   # A registered there
    data = _ha_signer(topo).build(SiuType.UPDATE, home_address=a_home,
                                  old_care_of=mobile.care_of, new_care_of=new,
                                  gateway_spi=mobile.outbound.spi, lifetime=600, rrp=rrp,
                                  wallclock=0.0, gateway_epoch=gw.epoch)
    before = (mobile.care_of, mobile.outbound.remote, mobile.outbound.sequence)
    actions = gw.receive_siu(
        build_udp_packet(a2b(ha.address), a2b(gw.inside), 4343, 4343, data), topo.sim.now)
    assert (mobile.care_of, mobile.outbound.remote, mobile.outbound.sequence) == before
    assert gw.drops[R.SIU_RRP_MISMATCH] == 1
    sent = [a for a in actions if isinstance(a, SendToNet)]
    assert len(sent) == 1 and sent[0].packet[16:20] == a2b(ha.address)     # the ACK only
    ack = SiuVerifier({gw.inside: (1, topo.configs.gateway.home_agents[0].key)}).verify(
        gw.inside, sent[0].packet[28:])
    assert ack.new_care_of == before[0]
    # the genuine reply for A in the same kind of SIU is forwarded
    data = _ha_signer(topo).build(SiuType.UPDATE, home_address=a_home,
                                  old_care_of=mobile.care_of, new_care_of=mobile.care_of,
                                  gateway_spi=mobile.outbound.spi, lifetime=600,
                                  rrp=_rrp_for(a_home), wallclock=0.0,
                                  gateway_epoch=gw.epoch)
    actions = gw.receive_siu(
        build_udp_packet(a2b(ha.address), a2b(gw.inside), 4343, 4343, data), topo.sim.now)
    assert [a for a in actions if isinstance(a, SendToNet)
            and a.packet[16:20] == a2b(mobile.care_of)]
