"""A bounded fuzz run of every network entry point, with state and forgery invariants.

Seeds: every packet of two running simulations, captured on every segment: manual keys with two
MNs (ESP both ways, Registration Requests and Replies, SIUs and their ACKs, reverse-tunnelled
IP-in-IP, direct replies at home) and IKEv2 with ESP in UDP (IKE_SA_INIT, IKE_AUTH,
CREATE_CHILD_SA re-keys, INFORMATIONAL, NAT-T ESP), each packet already delivered once.  Hypothesis
mutates them (truncations, extensions, bit flips, byte overwrites, splices of two packets, the
outer protocol and destination rewritten with the IPv4 header checksum and length made good again
so that the mutation reaches the deeper layers) and feeds each result to one entry point:
``receive_from_net`` / ``receive_from_tun`` of the GW, the HA and each MN (so the IKE, SIU,
MIPv4, IP-in-IP and ESP decapsulation paths behind them), and the pure parsers (IKE, SIU,
MIPv4), which may raise nothing but ``ParseError``.

After every input:
* no exception escapes a role;
* nothing an unauthenticated (or replayed) datagram could move has moved: GW bindings and ESP SA
  addresses and replay windows, SIU sequence state, HA bindings and MN-HA identifications, the
  MNs' registration state, every established IKE SA's SPIs, state, message IDs and children;
  half-open IKE SAs stay within the endpoint's limit;
* a datagram that is not forwarded is refused as a ``DropReason`` counted by the role, and every
  counted reason is a ``DropReason``.

The run lasts ``MIPSEC_FUZZ_SECONDS`` (default 40 s, what CI runs; one round of ``BATCH``
examples under ``--hypothesis-profile=fast``); a longer run is one command::

    MIPSEC_FUZZ_MINUTES=30 python -m pytest -q -p no:cacheprovider tests/security/test_fuzz_entry_points.py

(docs/security.md, "Fuzzing").  A failure prints the falsifying example: the seed packet, the
mutations and the entry point.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import levels
from mipsec.drops import DropReason
from mipsec.errors import ParseError
from mipsec.ike import codec
from mipsec.mip.constants import SIU_PORT
from mipsec.node.actions import SendToNet, WriteToTun
from mipsec.sim.scenario import start_streams, wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.mip import MIP_PORT, parse_registration_reply, parse_registration_request
from mipsec.wire.siu import parse_siu

BATCH = 150                 # hypothesis examples per round; rounds repeat until the time is up


def _budget_s() -> float:
    minutes = os.environ.get("MIPSEC_FUZZ_MINUTES")
    if minutes:
        return float(minutes) * 60.0
    # the fast profile (tests/levels.py): one round unless a budget is asked for
    return float(os.environ.get("MIPSEC_FUZZ_SECONDS", "0" if levels.fast else "40"))


# --- the running simulations and their traffic ----------------------------------------------

def _captured(topo, run) -> list[bytes]:
    segments = [topo.home, topo.outside, *topo.visited.values()]
    caps = [seg.start_capture() for seg in segments]
    run()
    for seg in segments:
        seg.capture = None
    return [p for cap in caps for _t, _who, p in cap]


def _manual_lab():
    topo = build_topology(2, internet_delay_s=0.002, seed=21)
    topo.move("a", 0)
    topo.move("a", 1)
    assert wait_registered(topo, 1.0)

    def run():
        start_streams(topo, interval_s=0.01, start=topo.sim.now, stop=topo.sim.now + 0.2)
        topo.move("b", 1)
        topo.sim.run_for(0.5)
        topo.move("home", 1)
        topo.sim.run_for(0.5)
    return topo, _captured(topo, run)


def _ike_lab():
    topo = build_topology(1, internet_delay_s=0.002, seed=22, sa_source="ikev2",
                          ike={"force_encap": True, "child_lifetime_s": 1.0, "dpd_interval_s": 0.3})

    def run():
        topo.move("a", 0)
        assert wait_registered(topo, 2.0)
        start_streams(topo, interval_s=0.01, start=topo.sim.now, stop=topo.sim.now + 1.5)
        topo.sim.run_for(0.7)
        topo.move("b", 0)
        topo.sim.run_for(1.5)          # child re-keys and liveness checks at b
    return topo, _captured(topo, run)


LABS = [_manual_lab(), _ike_lab()]


def _ike_state(role):
    ike = getattr(role, "ike", None)
    if ike is None:
        return None
    ep = ike.endpoint
    sas = sorted((sa.spi_i, sa.spi_r, sa.state.value, sa.local, sa._mid_in, sa._mid_out,
                  tuple(sorted(sa.children))) for sa in ep._by_spi.values()
                 if sa.established_at is not None)
    return sas


def _state(topo):
    gw, ha = topo.gw.role, topo.ha.role
    mns = [m.role for m in topo.mobiles]
    return (
        {h: (m.care_of, m.inbound.spi, m.inbound.local, m.inbound.remote, m.inbound.replay.top,
             m.outbound.spi, m.outbound.local, m.outbound.remote)
         for h, m in gw.mobiles.items() if m.inbound is not None and m.outbound is not None},
        dict(gw.verifier.last_sequence),
        {h: (b.care_of_address, b.expires, b.identification) for h, b in ha.bindings.items()},
        {spi: msa.last_accepted_id for spi, (msa, _o) in ha._msa_by_spi.items()},
        [(m.state, m.care_of, m.reg.pending_id,
          m.inbound.spi if m.inbound else None, m.inbound.local if m.inbound else None,
          m.inbound.replay.top if m.inbound else None,
          m.outbound.local if m.outbound else None, m.outbound.remote if m.outbound else None)
         for m in mns],
        [_ike_state(r) for r in topo.roles()],
    )


def _half_open_ok(topo) -> bool:
    for role in topo.roles():
        ike = getattr(role, "ike", None)
        if ike is not None:
            ep = ike.endpoint
            limit = getattr(ep.config, "max_half_open", None) or 1000
            if len(ep._half_open) > limit:
                return False
    return True


def _drops(role) -> Counter:
    """The role's refusals, and its IKE endpoint's (IKE SAs count into the endpoint's)."""
    out = Counter(role.drops)
    ike = getattr(role, "ike", None)
    if ike is not None:
        out.update(ike.endpoint.drops)
    return out



def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _ip_fixed(b: bytearray) -> bytes:
    """Lengths and checksums made good again (IPv4 total length and header checksum, RFC 791;
    UDP length and checksum, RFC 768), so a mutation gets past the outer framing checks."""
    if len(b) < 20 or b[0] >> 4 != 4:
        return bytes(b)
    ihl = (b[0] & 0x0F) * 4
    if ihl < 20 or ihl > len(b) or len(b) > 0xFFFF:
        return bytes(b)
    struct.pack_into("!H", b, 2, len(b))
    struct.pack_into("!H", b, 10, 0)
    struct.pack_into("!H", b, 10, ~_fold(sum(struct.unpack(f"!{ihl // 2}H", bytes(b[:ihl]))))
                     & 0xFFFF)
    if b[9] == UDP and len(b) >= ihl + 8:
        udp_len = len(b) - ihl
        struct.pack_into("!H", b, ihl + 4, udp_len)
        struct.pack_into("!H", b, ihl + 6, 0)
        seg = bytes(b[ihl:]) + (b"\0" if udp_len % 2 else b"")
        pseudo = bytes(b[12:20]) + struct.pack("!BBH", 0, UDP, udp_len)
        total = _fold(sum(struct.unpack(f"!{(len(pseudo) + len(seg)) // 2}H", pseudo + seg)))
        struct.pack_into("!H", b, ihl + 6, (~total & 0xFFFF) or 0xFFFF)
    return bytes(b)


ESP, UDP = 50, 17


def _fresh_field(b: bytes) -> tuple[int, int] | None:
    """(offset, largest step) of the 32-bit counter that makes a message new to its receiver:
    the ESP sequence number (RFC 4303 §2, also in UDP: RFC 3948), the IKE message ID (RFC 7296
    §3.1: the next one, so a step of 1), the SIU sequence's low half (docs/protocol.md), the
    low half of a Registration Request's or Reply's identification (RFC 5944 §3.3, §3.4)."""
    if len(b) < 28 or b[0] >> 4 != 4:
        return None
    ihl = (b[0] & 0x0F) * 4
    if b[9] == ESP:
        return ihl + 4, 1 << 20
    if b[9] != UDP or len(b) < ihl + 16:
        return None
    dport = struct.unpack_from("!H", b, ihl + 2)[0]
    body = ihl + 8
    if dport == 500:
        return body + 20, 1
    if dport == 4500:
        return (body + 4 + 20, 1) if b[body:body + 4] == bytes(4) else (body + 4, 1 << 20)
    if dport == SIU_PORT:
        return body + 12, 1 << 20
    if dport == MIP_PORT:
        return (body + 20 if b[body] == 1 else body + 16), 1 << 20
    return None


def _mutate(packet: bytes, corpus: list[bytes], addresses: list[bytes],
            rnd: random.Random) -> tuple[bytes, list[str]]:
    """One mutated copy of ``packet`` and the mutations applied (for the failure message)."""
    b = bytearray(packet)
    done = []
    for _ in range(rnd.randrange(1, 4)):
        n = len(b)
        kind = rnd.choice(("cut", "extend", "flip", "flip", "flip", "set", "splice", "proto",
                           "dst", "zero", "seq", "seq"))
        if kind == "cut" and n:
            del b[rnd.randrange(n):]
        elif kind == "extend":
            b += bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 24)))
        elif kind == "flip" and n:
            b[rnd.randrange(n)] ^= 1 << rnd.randrange(8)
        elif kind == "set" and n:
            b[rnd.randrange(n)] = rnd.randrange(256)
        elif kind == "splice":
            other = rnd.choice(corpus)
            cut = rnd.randrange(n + 1)
            b = b[:cut] + bytearray(other[cut:])
        elif kind == "proto" and n >= 20:
            b[9] = rnd.choice((1, 4, 17, 50, 51, 255))
        elif kind == "dst" and n >= 20:
            b[16:20] = rnd.choice(addresses)
        elif kind == "zero" and n:
            start = rnd.randrange(n)
            b[start:start + 16] = bytes(len(b[start:start + 16]))
        elif kind == "seq":
            # a sequence number / message ID / identification never seen: past the replay
            # checks, so the integrity check is what must refuse the (otherwise mutated) packet
            field = _fresh_field(bytes(b))
            if field is None or field[0] + 4 > len(b):
                continue
            at, step = field
            value = (struct.unpack_from("!I", b, at)[0] + rnd.randrange(1, step + 1)) & 0xFFFFFFFF
            struct.pack_into("!I", b, at, value)
            if rnd.random() < 0.8 and len(b) > at + 8:
                b[rnd.randrange(at + 4, len(b))] ^= 1 << rnd.randrange(8)
        else:
            continue
        done.append(kind)
    return (_ip_fixed(b) if rnd.random() < 0.75 else bytes(b)), done


# --- the fuzz targets --------------------------------------------------------------------------

def _owners(topo) -> dict[bytes, object]:
    out = {}
    for host in (topo.gw, topo.ha, *topo.mobiles):
        for iface in host.interfaces.values():
            out[iface.address_bytes] = host.role
    return out


def _kind(p: bytes) -> tuple[int, int]:
    """(IP protocol, UDP destination port or 0): the seeds are drawn kind by kind, so the few
    SIUs, Registration Requests and IKE messages weigh as much as the many ESP packets."""
    if len(p) >= 28 and p[9] == UDP:
        return UDP, struct.unpack_from("!H", p, (p[0] & 0x0F) * 4 + 2)[0]
    return (p[9] if len(p) > 9 else 0), 0


def _by_kind(packets: list[bytes]) -> list[list[bytes]]:
    groups: dict[tuple[int, int], list[bytes]] = {}
    for p in packets:
        groups.setdefault(_kind(p), []).append(p)
    return [groups[k] for k in sorted(groups)]


KINDS = [_by_kind(packets) for _topo, packets in LABS]
OWNERS = [_owners(topo) for topo, _packets in LABS]
ADDRESSES = [list(o) for o in OWNERS]
BASELINES = [_state(topo) for topo, _packets in LABS]
INPUTS_PER_EXAMPLE = 25
PARSERS = (codec.parse_message, parse_siu, parse_registration_request, parse_registration_reply)


def _feed(lab: int, rnd: random.Random) -> None:
    topo, packets = LABS[lab]
    roles = topo.roles()
    for _ in range(INPUTS_PER_EXAMPLE):
        seed = rnd.choice(rnd.choice(KINDS[lab]))
        packet, mutations = _mutate(seed, packets, ADDRESSES[lab], rnd)
        # mostly the host the packet is addressed to, from the network; sometimes anyone
        role = OWNERS[lab].get(packet[16:20]) if len(packet) >= 20 else None
        if role is None or rnd.random() < 0.25:
            role = rnd.choice(roles)
        from_net = rnd.random() < 0.8
        entry = role.receive_from_net if from_net else role.receive_from_tun
        where = (lab, type(role).__name__, "net" if from_net else "tun", mutations, packet.hex())
        before = _drops(role)
        actions = entry(packet, topo.sim.now + 0.001)       # must not raise
        after = _drops(role)
        assert all(isinstance(k, DropReason) for k in after), (where, after)
        forwarded = any(isinstance(a, (SendToNet, WriteToTun)) for a in actions)
        assert forwarded or sum(after.values()) > sum(before.values()), (where, actions)
        assert _state(topo) == BASELINES[lab], where
        assert _half_open_ok(topo), where


@settings(max_examples=BATCH, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(lab=st.integers(0, len(LABS) - 1), seed=st.integers(0, 2 ** 64 - 1))
def _one_role_batch(lab, seed):
    _feed(lab, random.Random(seed))


@settings(max_examples=BATCH, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(lab=st.integers(0, len(LABS) - 1), seed=st.integers(0, 2 ** 64 - 1),
       parser=st.sampled_from(PARSERS), strip=st.sampled_from((0, 20, 28, 32)))
def _one_parser_batch(lab, seed, parser, strip):
    """The codecs, fed mutated payloads (``strip``: past the IPv4 / UDP / non-ESP headers)."""
    _topo, packets = LABS[lab]
    rnd = random.Random(seed)
    for _ in range(INPUTS_PER_EXAMPLE):
        data, _mutations = _mutate(rnd.choice(rnd.choice(KINDS[lab])), packets, ADDRESSES[lab],
                                   rnd)
        try:
            parser(data[strip:])
        except ParseError:
            pass


def _rounds(target, share: float) -> int:
    """Run hypothesis rounds of ``target`` for ``share`` of the time budget (at least one)."""
    deadline = time.monotonic() + _budget_s() * share
    rounds = 0
    while True:
        target()
        rounds += 1
        if time.monotonic() >= deadline:
            return rounds


def test_seed_corpus_covers_every_entry_point():
    kinds = Counter(_kind(p) for _topo, packets in LABS for p in packets)
    # ESP, IP-in-IP, MIPv4 (434), SIU (4343), IKE (500) and IKE / ESP in UDP (4500)
    for kind in ((ESP, 0), (4, 0), (UDP, 434), (UDP, 4343), (UDP, 500), (UDP, 4500)):
        assert kinds[kind] > 0, (kind, kinds)


def test_fuzz_role_entry_points():
    rounds = _rounds(_one_role_batch, 0.8)
    reasons: Counter = Counter()
    for topo, _packets in LABS:
        for role in topo.roles():
            assert sum(_drops(role).values()) > 0
            reasons.update(_drops(role))
    print(f"\n{rounds * BATCH * INPUTS_PER_EXAMPLE} inputs; refusals by reason: "
          f"{ {str(k): v for k, v in reasons.most_common()} }")
    # the inputs reach past the outer framing: refusals from the ESP, IKE, SIU and MIPv4 layers
    for deep in (DropReason.ICV_MISMATCH, DropReason.REPLAYED, DropReason.SIU_AUTH_FAILED,
                 DropReason.MIP_AUTH_FAILED):
        assert reasons[deep] > 0, (deep, reasons)
    assert any(str(r).startswith("ike-") for r in reasons), reasons


def test_fuzz_parsers_raise_only_parse_errors():
    assert _rounds(_one_parser_batch, 0.2) >= 1
