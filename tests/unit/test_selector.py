"""Traffic selectors (RFC 4301 §4.4.1.1): wildcards, prefixes, ports, OPAQUE fragments, text form."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levels import examples
from mipsec.errors import ConfigError
from mipsec.ipsec.selector import ANY, Selector, five_tuple


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def packet(src: str, dst: str, proto: int = 17, sport: int = 1000, dport: int = 2000, *,
           frag_offset: int = 0, more_fragments: bool = False, options: bytes = b"",
           payload: bytes = b"hello") -> bytes:
    """A minimal IPv4 packet (checksum left 0: selectors do not look at it)."""
    ihl = 5 + len(options) // 4
    body = struct.pack("!HH", sport, dport) + payload if proto in (6, 17) else payload
    flags = (0x2000 if more_fragments else 0) | frag_offset
    header = struct.pack("!BBHHHBBHII", 0x40 | ihl, 0, ihl * 4 + len(body), 1, flags, 64, proto,
                         0, ip(src), ip(dst))
    return header + options + body


# --- construction ---------------------------------------------------------------------------

def test_defaults_are_wildcards():
    s = Selector()
    assert s.is_any and s == ANY and str(s) == "* -> *"
    assert (s.local_net, s.local_mask, s.remote_net, s.remote_mask) == (0, 0, 0, 0)


def test_prefixes_parsed_once_into_ints():
    s = Selector("10.1.0.0/24", "172.16.1.10")
    assert (s.local_net, s.local_mask) == (ip("10.1.0.0"), 0xFFFFFF00)
    assert (s.remote_net, s.remote_mask) == (ip("172.16.1.10"), 0xFFFFFFFF)
    assert s.remote_host == ip("172.16.1.10") and s.local_host is None
    assert s.local == "10.1.0.0/24" and s.remote == "172.16.1.10/32"


def test_star_and_full_ranges_normalise_to_any():
    assert Selector("*", "0.0.0.0/0", "any", (0, 65535), "*") == ANY


@pytest.mark.parametrize("kwargs, word", [
    ({"local": "10.1.0.1/24"}, "local"),           # host bits set
    ({"remote": "10.1.0.300"}, "remote"),
    ({"remote": "fe80::1"}, "remote"),
    ({"local": 42}, "local"),
    ({"protocol": 256}, "protocol"),
    ({"protocol": "sctpx"}, "protocol"),
    ({"protocol": True}, "protocol"),
    ({"local_ports": (10, 5)}, "local_ports"),
    ({"remote_ports": (0, 70000)}, "remote_ports"),
    ({"remote_ports": "a-b"}, "remote_ports"),
    ({"remote_ports": (1, 2, 3)}, "remote_ports"),
    ({"protocol": "icmp", "remote_ports": 7}, "ports"),
])
def test_bad_configuration_raises_config_error_naming_the_field(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        Selector(**kwargs)


def test_immutable_and_hashable():
    s = Selector("10.0.0.0/8")
    with pytest.raises(AttributeError):
        s.local = "1.2.3.4/32"
    assert {s: 1}[Selector("10.0.0.0/8", None)] == 1
    assert Selector("10.0.0.0/8") != Selector("10.0.0.0/16")


# --- matching ---------------------------------------------------------------------------------

def test_prefix_match_outbound_and_inbound_orientation():
    s = Selector("10.1.0.0/24", "172.16.0.0/16")
    out = packet("10.1.0.100", "172.16.2.10")
    assert s.matches_outbound(out) and not s.matches_inbound(out)
    back = packet("172.16.2.10", "10.1.0.100")
    assert s.matches_inbound(back) and not s.matches_outbound(back)
    assert not s.matches_outbound(packet("10.1.1.100", "172.16.2.10"))
    assert not s.matches_outbound(packet("10.1.0.100", "172.17.2.10"))
    assert s.reversed().matches_outbound(back)


def test_matches_takes_local_first():
    s = Selector("10.1.0.100", "10.1.0.0/24", "udp", None, (434, 434))
    assert s.matches(ip("10.1.0.100"), ip("10.1.0.2"), 17, 5000, 434)
    assert not s.matches(ip("10.1.0.2"), ip("10.1.0.100"), 17, 434, 5000)


def test_protocol():
    s = Selector(protocol="tcp")
    assert s.matches_outbound(packet("1.1.1.1", "2.2.2.2", 6))
    assert not s.matches_outbound(packet("1.1.1.1", "2.2.2.2", 17))
    assert Selector(protocol=1).matches_outbound(packet("1.1.1.1", "2.2.2.2", 1))


def test_port_ranges_per_side():
    s = Selector(protocol="udp", local_ports=(1000, 1000), remote_ports=(2000, 2100))
    assert s.matches_outbound(packet("1.1.1.1", "2.2.2.2", 17, 1000, 2100))
    assert not s.matches_outbound(packet("1.1.1.1", "2.2.2.2", 17, 1000, 2101))
    assert not s.matches_outbound(packet("1.1.1.1", "2.2.2.2", 17, 999, 2000))
    # inbound: the packet's destination port is our local port
    assert s.matches_inbound(packet("2.2.2.2", "1.1.1.1", 17, 2050, 1000))
    assert not s.matches_inbound(packet("2.2.2.2", "1.1.1.1", 17, 1000, 2050))


def test_ports_are_read_after_ip_options():
    s = Selector(remote_ports=(2000, 2000))
    with_options = packet("1.1.1.1", "2.2.2.2", 17, 1000, 2000, options=b"\x01\x01\x01\x00")
    assert s.matches_outbound(with_options)
    assert five_tuple(with_options) == (ip("1.1.1.1"), ip("2.2.2.2"), 17, 1000, 2000)


def test_non_first_fragment_has_opaque_ports():
    # RFC 4301 §4.4.1.1 / §7: ports of a non-first fragment are OPAQUE and match ANY only.
    frag = packet("1.1.1.1", "2.2.2.2", 17, 1000, 2000, frag_offset=185)
    assert five_tuple(frag)[3:] == (None, None)
    assert Selector(protocol="udp").matches_outbound(frag)
    assert not Selector(protocol="udp", remote_ports=(2000, 2000)).matches_outbound(frag)
    assert not Selector(remote_ports=(0, 10)).matches_inbound(frag)
    # a first fragment (MF set, offset 0) still carries the ports
    first = packet("1.1.1.1", "2.2.2.2", 17, 1000, 2000, more_fragments=True)
    assert Selector(protocol="udp", remote_ports=(2000, 2000)).matches_outbound(first)


def test_portless_protocols_only_match_port_wildcards():
    icmp = packet("1.1.1.1", "2.2.2.2", 1, payload=b"\x08\x00\x00\x00")
    assert five_tuple(icmp)[3:] == (None, None)
    assert ANY.matches_outbound(icmp)
    assert not Selector(local_ports=(0, 100)).matches_outbound(icmp)


@pytest.mark.parametrize("selector", [ANY, Selector("1.1.1.1", "2.2.2.2", "udp", 1000, 2000)])
def test_truncated_or_non_ipv4_never_matches(selector):
    good = packet("1.1.1.1", "2.2.2.2", 17, 1000, 2000, options=b"\x01" * 4)
    assert selector.matches_outbound(good)
    header_and_ports = 24 + 4
    assert five_tuple(good[:header_and_ports]) is not None
    for length in range(header_and_ports):  # every cut into the IP header, options or ports
        cut = good[:length]
        assert not selector.matches_outbound(cut) and not selector.matches_inbound(cut)
        assert five_tuple(cut) is None
    ipv6ish = bytes([0x65]) + good[1:]
    assert not selector.matches_outbound(ipv6ish) and five_tuple(ipv6ish) is None
    short_ihl = bytes([0x44]) + good[1:]
    assert not selector.matches_outbound(short_ihl)
    assert not selector.matches_outbound(bytearray(good[:3]))
    assert not selector.matches_inbound(b"")


# --- the inline fast paths agree with five_tuple() + matches() and with ipaddress ---------------

addresses = st.sampled_from(["10.1.0.0", "10.1.0.100", "10.1.0.255", "10.2.0.1", "172.16.1.10",
                             "0.0.0.0", "255.255.255.255", "172.16.0.1"])
prefixes = st.one_of(st.none(), st.sampled_from(
    ["10.0.0.0/8", "10.1.0.0/24", "10.1.0.100/32", "172.16.0.0/12", "172.16.1.10/32",
     "128.0.0.0/1", "10.1.0.128/25"]))
port_ranges = st.one_of(st.none(), st.tuples(st.integers(0, 3000), st.integers(0, 3000))
                        .map(lambda t: (min(t), max(t))))
protocols = st.sampled_from([None, 1, 6, 17, 50])


@st.composite
def selectors(draw):
    proto = draw(protocols)
    with_ports = proto in (None, 6, 17)
    return Selector(draw(prefixes), draw(prefixes), proto,
                    draw(port_ranges) if with_ports else None,
                    draw(port_ranges) if with_ports else None)


def reference(sel: Selector, local: str, remote: str, proto: int, lport, rport) -> bool:
    def in_(addr, prefix):
        return prefix is None or ipaddress.IPv4Address(addr) in ipaddress.IPv4Network(prefix)

    def port_ok(port, rng):
        return rng is None or (port is not None and rng[0] <= port <= rng[1])

    return (in_(local, sel.local) and in_(remote, sel.remote)
            and (sel.protocol is None or sel.protocol == proto)
            and port_ok(lport, sel.local_ports) and port_ok(rport, sel.remote_ports))


@settings(max_examples=examples(400), deadline=None)
@given(sel=selectors(), a=addresses, b=addresses, proto=st.sampled_from([1, 6, 17, 50]),
       sport=st.integers(0, 3000), dport=st.integers(0, 3000), frag=st.sampled_from([0, 0, 1, 77]))
def test_fast_paths_agree_with_reference(sel, a, b, proto, sport, dport, frag):
    pkt = packet(a, b, proto, sport, dport, frag_offset=frag)
    opaque = proto not in (6, 17) or frag
    sp, dp = (None, None) if opaque else (sport, dport)
    assert five_tuple(pkt) == (ip(a), ip(b), proto, sp, dp)
    out = reference(sel, a, b, proto, sp, dp)
    inn = reference(sel, b, a, proto, dp, sp)
    assert sel.matches_outbound(pkt) == out == sel.matches(ip(a), ip(b), proto, sp, dp)
    assert sel.matches_inbound(pkt) == inn == sel.matches(ip(b), ip(a), proto, dp, sp)
    assert sel.reversed().matches_inbound(pkt) == out


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=40))
def test_random_bytes_never_raise(data):
    for sel in (ANY, Selector("10.0.0.0/8", None, "udp", None, (1, 9))):
        sel.matches_outbound(data)
        sel.matches_inbound(data)
    five_tuple(data)


# --- text and dict forms ------------------------------------------------------------------------

def test_parse_examples():
    s = Selector.parse("10.1.0.100 -> 10.1.0.0/24:434, udp")
    assert s == Selector("10.1.0.100/32", "10.1.0.0/24", 17, None, (434, 434))
    assert str(s) == "10.1.0.100 -> 10.1.0.0/24:434, udp"
    assert Selector.parse(" * -> * ") == ANY
    assert Selector.parse("*:1000-1010 -> 10.0.0.0/8:*, 6") == \
        Selector(None, "10.0.0.0/8", "tcp", (1000, 1010), None)
    assert str(Selector(protocol=99)) == "* -> *, 99"


@pytest.mark.parametrize("text", ["", "10.0.0.0/8", "a -> b", "* -> * -> *", "* -> *,",
                                  "* -> *, udp, tcp", " -> *", "*: -> *", "* -> *:99999",
                                  "* -> *, nope", "*:5 -> *, icmp"])
def test_parse_rejects(text):
    with pytest.raises(ConfigError):
        Selector.parse(text)


@settings(max_examples=examples(200), deadline=None)
@given(selectors())
def test_text_and_dict_round_trip(sel):
    assert Selector.parse(str(sel)) == sel
    assert Selector.from_dict(sel.to_dict()) == sel
    assert eval(repr(sel), {"Selector": Selector}) == sel


def test_from_dict_accepts_config_shapes_and_rejects_unknown_keys():
    s = Selector.from_dict({"local": "10.1.0.0/24", "remote": "*", "protocol": "udp",
                            "remote_ports": "434"})
    assert s == Selector.parse("10.1.0.0/24 -> *:434, udp")
    assert Selector.from_dict({"local_ports": [1, 5]}).local_ports == (1, 5)
    with pytest.raises(ConfigError, match="unknown keys"):
        Selector.from_dict({"remote_port": 434})
    with pytest.raises(ConfigError):
        Selector.from_dict(["local"])
