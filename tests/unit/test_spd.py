"""SPD (RFC 4301 §4.4.1): first match in order, index and cache equal to a linear scan, outbound."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.drops import DropReason
from mipsec.errors import ConfigError, Dropped, UsageError
from mipsec.ipsec import spd as spd_module
from mipsec.ipsec.selector import Selector, five_tuple
from mipsec.ipsec.spd import Action, Policy, Spd


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def packet(src: str, dst: str, proto: int = 17, sport: int = 1000, dport: int = 2000) -> bytes:
    body = struct.pack("!HH", sport, dport) + b"data" if proto in (6, 17) else b"data"
    return struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(body), 0, 0, 64, proto, 0,
                       ip(src), ip(dst)) + body


class RecordingSa:
    """Test double for the SPD plumbing: records calls, answers like an SA (real SAs: below)."""

    def __init__(self, spi=0x1000, refuse: DropReason | None = None):
        self.spi, self.refuse, self.calls = spi, refuse, []

    def encapsulate(self, inner, now=0.0):
        self.calls.append((inner, now))
        if self.refuse is not None:
            raise Dropped(self.refuse)
        return b"ESP:" + inner


# --- policies -----------------------------------------------------------------------------------

def test_policy_validation():
    with pytest.raises(ConfigError, match="action"):
        Policy("p", Selector(), "encrypt")
    with pytest.raises(ConfigError, match="only a PROTECT"):
        Policy("p", Selector(), Action.BYPASS, sa=RecordingSa())
    with pytest.raises(ConfigError, match="name"):
        Policy("", Selector(), Action.BYPASS)
    p = Policy("p", "10.1.0.0/24 -> *", "protect")
    assert p.selector == Selector("10.1.0.0/24") and p.action is Action.PROTECT
    with pytest.raises(AttributeError):
        p.action = Action.BYPASS
    p.sa = RecordingSa()
    with pytest.raises(UsageError):
        Policy("b", Selector(), Action.BYPASS).sa = RecordingSa()


def test_add_insert_remove_and_names():
    spd = Spd()
    a = spd.add(Policy("a", Selector(), Action.DISCARD))
    b = spd.insert(0, Policy("b", Selector(protocol="udp"), Action.BYPASS))
    assert [p.name for p in spd] == ["b", "a"] and len(spd) == 2 and "a" in spd
    with pytest.raises(ConfigError, match="already"):
        spd.add(Policy("a", Selector(), Action.BYPASS))
    with pytest.raises(UsageError):
        spd.insert(5, Policy("c", Selector(), Action.BYPASS))
    with pytest.raises(UsageError):
        spd.remove("zzz")
    assert spd.lookup(1, 2, 17, 1, 2) is b
    assert spd.remove("b") is b
    assert spd.lookup(1, 2, 17, 1, 2) is a   # the cached decision was invalidated
    assert spd.get("a") is a and spd.get("b") is None


def test_extend_is_all_or_nothing():
    spd = Spd([Policy("a", Selector(), Action.DISCARD)])
    with pytest.raises(ConfigError, match="twice"):
        spd.extend([Policy("b", Selector(), Action.BYPASS), Policy("b", Selector(), Action.BYPASS)])
    with pytest.raises(ConfigError, match="already"):
        spd.extend([Policy("c", Selector(), Action.BYPASS), Policy("a", Selector(), Action.BYPASS)])
    assert [p.name for p in spd] == ["a"]


def test_first_match_wins_not_most_specific():
    spd = Spd([Policy("broad", Selector("10.0.0.0/8"), Action.BYPASS),
               Policy("narrow", Selector("10.1.0.100"), Action.DISCARD)])
    assert spd.lookup(ip("10.1.0.100"), 0, 1).name == "broad"
    spd.remove("broad")
    spd.insert(1, Policy("broad", Selector("10.0.0.0/8"), Action.BYPASS))
    assert spd.lookup(ip("10.1.0.100"), 0, 1).name == "narrow"


def test_lookup_packet_orientation():
    spd = Spd([Policy("p", Selector("10.1.0.100", "172.16.0.0/16", "udp", None, (500, 500)),
                      Action.BYPASS)])
    assert spd.lookup_packet(packet("10.1.0.100", "172.16.1.1", 17, 9, 500)).name == "p"
    assert spd.lookup_packet(packet("10.1.0.100", "172.16.1.1", 17, 9, 500), inbound=True) is None
    assert spd.lookup_packet(packet("172.16.1.1", "10.1.0.100", 17, 500, 9), inbound=True).name \
        == "p"
    assert spd.lookup_packet(b"\x45\x00") is None


def test_decision_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(spd_module, "DECISION_CACHE_MAX", 4)
    spd = Spd([Policy("odd", Selector(local_ports=(1, 1)), Action.BYPASS),
               Policy("all", Selector(), Action.DISCARD)])
    for port in range(20):
        assert spd.lookup(1, 2, 17, port, 9).name == ("odd" if port == 1 else "all")
        assert len(spd._cache) <= 4
    assert spd.lookup(1, 2, 17, 1, 9).name == "odd"


# --- the index and the cache equal the RFC's linear scan -------------------------------------------

ADDRS = ["10.1.0.1", "10.1.0.100", "10.1.0.200", "10.2.0.5", "172.16.1.10", "172.16.2.10",
         "192.168.0.1"]
PREFIXES = [None, "10.0.0.0/8", "10.1.0.0/24", "10.1.0.100/32", "10.1.0.128/25",
            "172.16.0.0/12", "172.16.1.10/32", "172.16.2.10/32", "0.0.0.0/1", "10.2.0.5/32"]
ports = st.one_of(st.none(), st.sampled_from([(1, 1), (1, 100), (50, 60), (434, 434)]))


@st.composite
def selectors(draw):
    proto = draw(st.sampled_from([None, 1, 6, 17]))
    with_ports = proto != 1
    return Selector(draw(st.sampled_from(PREFIXES)), draw(st.sampled_from(PREFIXES)), proto,
                    draw(ports) if with_ports else None, draw(ports) if with_ports else None)


queries = st.tuples(st.sampled_from(ADDRS), st.sampled_from(ADDRS), st.sampled_from([1, 6, 17]),
                    st.sampled_from([None, 1, 55, 434, 999]),
                    st.sampled_from([None, 1, 55, 434, 999]))
operations = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 40), selectors(),
              st.sampled_from(list(Action))),
    st.tuples(st.just("append"), st.just(10**6), selectors(), st.sampled_from(list(Action))),
    st.tuples(st.just("remove"), st.integers(0, 40)),
    st.tuples(st.just("query"), st.lists(queries, min_size=1, max_size=8)),
)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(operations, max_size=40))
def test_lookup_equals_linear_first_match(ops):
    spd = Spd()
    naive: list[Policy] = []
    counter = 0
    for op in ops:
        if op[0] in ("insert", "append"):
            counter += 1
            pos = min(op[1], len(naive))
            policy = Policy(f"p{counter}", op[2], op[3])
            if op[0] == "append":
                spd.add(policy)     # the incremental index path
            else:
                spd.insert(pos, policy)   # the rebuild path
            naive.insert(pos, policy)
        elif op[0] == "remove" and naive:
            victim = naive.pop(op[1] % len(naive))
            assert spd.remove(victim.name) is victim
        elif op[0] == "query":
            for q in op[1] * 2:       # twice: the second answer comes from the decision cache
                src, dst, proto, sp, dp = ip(q[0]), ip(q[1]), q[2], q[3], q[4]
                expected = next((p for p in naive
                                 if p.selector.matches(src, dst, proto, sp, dp)), None)
                assert spd.lookup(src, dst, proto, sp, dp) is expected
                assert spd.linear_lookup(src, dst, proto, sp, dp) is expected
    assert list(spd) == naive


def test_many_host_policies_share_one_index_group():
    spd = Spd()
    for i in range(2000):
        spd.add(Policy(f"mn{i}", Selector("10.1.0.0/24", str(ipaddress.IPv4Address(0xAC100000 + i))),
                       Action.BYPASS))
    spd.add(Policy("rest", Selector(), Action.DISCARD))
    assert len(spd._groups) == 2
    assert spd.lookup(ip("10.1.0.9"), 0xAC100000 + 1500, 17, 1, 1).name == "mn1500"
    assert spd.lookup(ip("10.1.0.9"), 0xAC100000 + 2500, 17, 1, 1).name == "rest"
    assert spd.lookup(ip("10.2.0.9"), 0xAC100000 + 1500, 17, 1, 1).name == "rest"


# --- outbound processing ------------------------------------------------------------------------

def make_spd(sa):
    return Spd([
        Policy("dns-bypass", Selector.parse("10.1.0.100 -> *:53, udp"), Action.BYPASS),
        Policy("block", Selector("10.1.0.100", "10.9.0.0/16"), Action.DISCARD),
        Policy("nosa", Selector("10.1.0.100", "10.8.0.0/16"), Action.PROTECT),
        Policy("vpn", Selector("10.1.0.100", "*"), Action.PROTECT, sa=sa),
    ])


def test_protect_outbound_actions_and_counters():
    sa = RecordingSa()
    spd = make_spd(sa)
    p = packet("10.1.0.100", "10.1.0.10")
    assert spd.protect_outbound(p, now=3.0) == b"ESP:" + p and sa.calls == [(p, 3.0)]
    dns = packet("10.1.0.100", "8.8.8.8", 17, 3333, 53)
    assert spd.protect_outbound(dns) is dns
    assert spd.protect_outbound(packet("10.1.0.100", "10.9.1.1")) is DropReason.POLICY_DISCARD
    assert spd.protect_outbound(packet("10.1.0.100", "10.8.1.1")) is DropReason.NO_SA
    assert spd.protect_outbound(packet("10.1.0.5", "10.1.0.10")) is DropReason.NO_POLICY
    assert spd.protect_outbound(b"\x45" + bytes(10)) is DropReason.TRUNCATED
    assert spd.protect_outbound(b"") is DropReason.TRUNCATED
    assert spd.protect_outbound(b"\x60" + bytes(40)) is DropReason.BAD_IP_VERSION
    assert spd.protect_outbound(b"\x46" + bytes(20)) is DropReason.BAD_IP_HEADER_LENGTH
    assert spd.drops == {DropReason.POLICY_DISCARD: 1, DropReason.NO_SA: 1,
                         DropReason.NO_POLICY: 1, DropReason.TRUNCATED: 2,
                         DropReason.BAD_IP_VERSION: 1, DropReason.BAD_IP_HEADER_LENGTH: 1}
    assert len(sa.calls) == 1
    status = spd.status()
    assert status["policies"][3] == {"name": "vpn", "selector": "10.1.0.100 -> *",
                                     "action": "protect", "sa": "0x00001000"}
    assert status["drops"]["no-sa"] == 1


def test_protect_outbound_returns_the_sa_refusal_without_raising():
    spd = make_spd(RecordingSa(refuse=DropReason.SA_EXPIRED))
    assert spd.protect_outbound(packet("10.1.0.100", "10.1.0.10")) is DropReason.SA_EXPIRED
    assert not spd.drops   # the SA counts its own refusals


def test_sa_attached_later_is_used_without_invalidation():
    spd = make_spd(None)
    p = packet("10.1.0.100", "10.1.0.10")
    assert spd.protect_outbound(p) is DropReason.NO_SA
    spd.get("vpn").sa = RecordingSa()
    assert spd.protect_outbound(p) == b"ESP:" + p


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=48))
def test_protect_outbound_never_raises_for_any_bytes(data):
    result = make_spd(RecordingSa()).protect_outbound(data)
    assert isinstance(result, (bytes, DropReason))


@settings(max_examples=examples(300), deadline=None)
@given(proto=st.sampled_from([1, 6, 17, 50]), frag=st.sampled_from([0, 0x2000, 0x0001, 0x4000]),
       ihl=st.sampled_from([5, 5, 5, 6, 4]), src=st.sampled_from(ADDRS), dst=st.sampled_from(ADDRS),
       sport=st.sampled_from([1, 53, 434]), dport=st.sampled_from([1, 53, 434]),
       cut=st.integers(0, 40), version=st.sampled_from([4, 4, 4, 6]))
def test_protect_outbound_fast_path_agrees_with_linear_lookup(proto, frag, ihl, src, dst, sport,
                                                             dport, cut, version):
    header = struct.pack("!BBHHHBBHII", (version << 4) | ihl, 0, 0, 0, frag, 64, proto, 0,
                         ip(src), ip(dst)) + bytes(max(0, ihl * 4 - 20))
    pkt = (header + struct.pack("!HH", sport, dport) + b"datadata")[:cut]
    spd = Spd([Policy("dns", Selector.parse("* -> *:53, udp"), Action.BYPASS),
               Policy("tcp", Selector(protocol="tcp", local_ports=(1, 1)), Action.DISCARD),
               Policy("home", Selector("10.1.0.0/24"), Action.BYPASS),
               Policy("nosa", Selector(None, "172.16.0.0/12"), Action.PROTECT)])
    t = five_tuple(pkt)
    policy = None if t is None else spd.linear_lookup(*t)
    result = spd.protect_outbound(pkt)
    if t is None:
        assert isinstance(result, DropReason) and result not in (
            DropReason.NO_POLICY, DropReason.NO_SA, DropReason.POLICY_DISCARD)
    elif policy is None:
        assert result is DropReason.NO_POLICY
    else:
        expected = {Action.BYPASS: pkt, Action.DISCARD: DropReason.POLICY_DISCARD,
                    Action.PROTECT: DropReason.NO_SA}[policy.action]
        assert result is expected
