"""Each claim of the handover procedure (WO 2004/086718, docs/claims.md) has a check, and each
check is shown to catch a mutation that breaks its claim.

``check_*`` registers an MN in the in-memory network, calls ``breaking`` (nothing, or a
mutation), then runs the step of the procedure the claim is about and asserts the claim.  For every claim
two tests run: the check passes on the code as it is, and it FAILS with the claim broken by one
mutation: a method rewritten in a copy of its module's source (``_mutate``: the replaced text
must occur exactly once, so a mutation can never silently not apply) or a transition-table entry
changed.  docs/claims.md lists claim -> function -> check -> timeline event -> mutation.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable

import pytest

from mipsec.drops import DropReason
from mipsec.mip.security import MobilitySecurityAssociation
from mipsec.mobility.registration import IKE_FALLBACK_ATTEMPTS, TRANSITIONS, Do, RegEvent, RegState
from mipsec.node import gateway as gateway_module
from mipsec.node import gateway_siu as gateway_siu_module
from mipsec.node import home_agent as home_agent_module
from mipsec.node import mobile_node as mobile_node_module
from mipsec.node import mobile_node_registration as mn_registration_module
from mipsec.node import timeline as tl
from mipsec.node.actions import RebindSa, SendToNet
from mipsec.node.packet import a2b, build_udp_packet
from mipsec.sim.scenario import wait_registered
from mipsec.sim.topology import build_topology
from mipsec.wire.mip import RegistrationRequest, RequestFlags, build_registration_request

DELAY_S = 0.005


def _mutate(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType, cls_name: str,
            method: str, old: str, new: str) -> None:
    """Replace ``cls_name.method`` by its version from a copy of ``module`` in which ``old``
    (which must occur exactly once) reads ``new``."""
    source = inspect.getsource(module)
    if source.count(old) != 1:
        # not an AssertionError: a mutation that does not apply must never pass as "caught"
        raise LookupError(f"mutation target not found once in {module.__name__}: {old!r}")
    mutant = types.ModuleType(module.__name__ + "_mutant")
    mutant.__file__ = module.__file__
    monkeypatch.setitem(sys.modules, mutant.__name__, mutant)
    exec(compile(source.replace(old, new), f"{module.__file__} (mutant)", "exec"), mutant.__dict__)
    if method not in vars(getattr(module, cls_name)):
        raise LookupError(f"{cls_name}.{method} is not defined in {module.__name__}")
    monkeypatch.setattr(getattr(module, cls_name), method, vars(getattr(mutant, cls_name))[method])


def _registered_at_a(**kw):
    topo = build_topology(1, internet_delay_s=DELAY_S, seed=11, with_apps=False, **kw)
    topo.move("a")
    assert wait_registered(topo, 2.0)
    return topo


def _during(topo, start: Callable[[], None], run_s: float):
    """Start something (a move), run ``run_s`` of virtual time: the events it caused, merged."""
    roles = (topo.mn.role, topo.gw.role, topo.ha.role)
    marks = [len(r.timeline) for r in roles]
    t0 = topo.sim.now
    start()
    topo.sim.run(until=t0 + run_s)
    return tl.merge(*(r.timeline[m:] for r, m in zip(roles, marks, strict=True)))


def _move_to_b(topo, run_s: float = 0.5):
    return _during(topo, lambda: topo.move("b"), run_s)


def _kinds(events, kind, node=None):
    return [e for e in events if e.kind == kind and (node is None or e.node == node)]


# --- claim 1: the GW's inbound SA has a wildcard source ----------------------------------------
def check_wildcard_source_inbound_sa(breaking: Callable[[], None]) -> None:
    topo = _registered_at_a()
    breaking()
    gw, mn = topo.gw.role, topo.mn.role
    b = topo.care_of["b"][0]
    a = topo.care_of["a"][0]
    for coa, where in ((b, "b"), (a, "a")):              # away and back: any source, each time
        move = _during(topo, lambda where=where: topo.move(where), 0.5)
        forwarded = _kinds(move, "rrq-forwarded")
        assert forwarded and forwarded[0].detail["source"] == coa, tl.format_table(move)
        assert DropReason.OUTER_SOURCE_MISMATCH not in gw.sad.drops
        assert mn.state is RegState.REGISTERED and mn.care_of == coa
    assert gw.mobiles[mn.home_address].inbound.remote is None     # no outer source in the SA


def mutate_check_outer_source(monkeypatch):
    """The GW pins the inbound SA's outer source to the bound CoA (a source-checked SA)."""
    _mutate(monkeypatch, gateway_siu_module, "GatewaySiu", "_repoint",
            "        mobile.care_of = new\n        if mobile.ike_id is not None",
            "        mobile.care_of = new\n        mobile.inbound.rebind(remote=address)\n"
            "        if mobile.ike_id is not None")


# --- claim 2: the MN re-points its own SAs, keeping keys and counters --------------------------
def check_mn_repoints_keeping_counters(breaking: Callable[[], None]) -> None:
    topo = _registered_at_a()
    breaking()
    mn, gw = topo.mn.role, topo.gw.role
    b = topo.care_of["b"][0]
    out, inb = mn.outbound, mn.inbound
    spis, sequence = (out.spi, inb.spi), out.sequence
    move = _move_to_b(topo)
    assert (mn.outbound, mn.inbound) == (out, inb)           # the same SA objects, re-pointed
    assert (out.spi, inb.spi) == spis and out.sequence > sequence
    assert _kinds(move, "sa-repointed", "mn")
    assert DropReason.REPLAYED not in gw.sad.drops and DropReason.REPLAYED not in gw.drops
    assert mn.state is RegState.REGISTERED and mn.care_of == b
    assert len(_kinds(move, "rrq-sent", "mn")) == 1          # registered at the first attempt


def mutate_reset_sequence_on_repoint(monkeypatch):
    """The MN's outbound SA starts its sequence numbers again at the new CoA."""
    _mutate(monkeypatch, mobile_node_module, "MobileNode", "_care_of_changed",
            "        self.outbound.rebind(local=coa)\n",
            "        self.outbound.rebind(local=coa)\n        self.outbound.sequence = 0\n")


# --- claim 3: the RRQ travels inside the ESP tunnel --------------------------------------------
def check_rrq_inside_the_tunnel(breaking: Callable[[], None]) -> None:
    topo = _registered_at_a()
    breaking()
    mn = topo.mn.role
    move = _move_to_b(topo)
    assert tl.in_order(move, ["rrq-sent", "rrq-forwarded", "rrq-accepted"]), tl.format_table(move)
    assert _kinds(move, "rrq-forwarded", "gw")                # decrypted from the MN's ESP
    assert mn.state is RegState.REGISTERED


def mutate_rrq_in_the_clear(monkeypatch):
    """The MN sends its Registration Request next to the tunnel instead of inside it."""
    _mutate(monkeypatch, mn_registration_module, "MobileNodeRegistration", "_send_rrq",
            "            return SendToNet(self.outbound.encapsulate(inner, now), self.interface)",
            "            return SendToNet(inner, self.interface)")


# --- claim 4: the GW forwards the RRQ and does not act on it -----------------------------------
def check_gw_forwards_without_acting(breaking: Callable[[], None]) -> None:
    topo = _registered_at_a()
    breaking()
    gw, ha, mn = topo.gw.role, topo.ha.role, topo.mn.role
    a, b = topo.care_of["a"][0], topo.care_of["b"][0]
    spi = mn.config.msa.spi
    # the HA will refuse what the MN sends (its MN-HA key is wrong now): no SIU can come
    ha._msa_by_spi[spi] = (MobilitySecurityAssociation(spi, b"\x55" * 16, "hmac-md5"),
                           ha._msa_by_spi[spi][1])
    move = _move_to_b(topo)
    mobile = gw.mobiles[mn.home_address]
    assert _kinds(move, "rrq-forwarded", "gw")                # forwarded ...
    assert ha.drops[DropReason.MIP_AUTH_FAILED] >= 1          # ... and refused by the HA
    assert mobile.care_of == a and mobile.outbound.remote == a   # the SA did not follow it
    assert not _kinds(move, "gw-sa-repointed") and b != a


def mutate_gw_acts_on_rrq(monkeypatch):
    """The GW moves the MN's SA to where a Registration Request came from, unasked."""
    _mutate(monkeypatch, gateway_module, "VpnGateway", "_forward_rrq",
            "        mobile.note_rrq_source(inner[iihl + 20:iihl + 24], src, port, now)\n",
            "        mobile.note_rrq_source(inner[iihl + 20:iihl + 24], src, port, now)\n"
            "        mobile.outbound.rebind(remote=b2a(src))\n"
            "        mobile.care_of = b2a(src)\n")


# --- claim 5: the HA validates and sends an SIU (old CoA, new CoA, RRP) to the GW -------------
def check_ha_sends_siu_with_reply(breaking: Callable[[], None]) -> None:
    topo = _registered_at_a()
    breaking()
    mn = topo.mn.role
    a, b = topo.care_of["a"][0], topo.care_of["b"][0]
    move = _move_to_b(topo)
    accepted = _kinds(move, "rrq-accepted", "ha")
    assert accepted and accepted[0].detail["via_gateway"] is True
    siu = _kinds(move, "siu-sent", "ha")
    assert siu and (siu[0].detail["type"], siu[0].detail["old"], siu[0].detail["new"]) == \
        ("update", a, b)
    assert [e.detail["care_of"] for e in _kinds(move, "rrp-forwarded", "gw")] == [b]
    assert [e.detail["via"] for e in _kinds(move, "rrp-received", "mn")] == ["tunnel"]
    assert mn.state is RegState.REGISTERED


def mutate_ha_replies_directly(monkeypatch):
    """The HA answers a request that came through the GW directly, with no SIU."""
    _mutate(monkeypatch, home_agent_module, "HomeAgent", "_registration",
            "via_gateway = through is not None or not in_prefix(src, *self._home_net)",
            "via_gateway = False")


# --- claim 6: the GW re-points its outbound SA BEFORE it sends the RRP -------------------------
def check_gw_repoints_before_reply(breaking: Callable[[], None]) -> None:
    topo = _registered_at_a()
    breaking()
    mn = topo.mn.role
    b = topo.care_of["b"][0]
    start = len(topo.gw.driver.log)
    move = _move_to_b(topo)
    actions = [a for _t, a in topo.gw.driver.log[start:]]
    rebinds = [i for i, a in enumerate(actions) if isinstance(a, RebindSa) and a.remote == b]
    ha = a2b(topo.ha.role.address)
    esp = [i for i, a in enumerate(actions) if isinstance(a, SendToNet)
           and a.packet[16:20] != ha]                             # to the MN (not the ACK)
    assert rebinds and esp and rebinds[0] < esp[0] and actions[esp[0]].packet[16:20] == a2b(b)
    assert [e.detail["care_of"] for e in _kinds(move, "rrp-forwarded", "gw")] == [b]
    assert len(_kinds(move, "rrq-sent", "mn")) == 1 and mn.state is RegState.REGISTERED


def mutate_repoint_after_forwarding(monkeypatch):
    """The GW sends the embedded reply first and re-points the SA afterwards."""
    _mutate(monkeypatch, gateway_siu_module, "GatewaySiu", "_apply_siu",
            "            actions += self._repoint(mobile, new, target, now, sequence=siu.sequence)\n"
            "            mobile.mobike_moved = False\n",
            "            if rrp and mobile.care_of is not None:   # a move\n"
            "                actions += self._forward_rrp(mobile, rrp, now)\n"
            "            rrp = b''\n"
            "            actions += self._repoint(mobile, new, target, now, sequence=siu.sequence)\n"
            "            mobile.mobike_moved = False\n")


# --- claim 7: an invalid RRQ gets no reply and changes nothing ---------------------------------
def check_invalid_rrq_no_reply(breaking: Callable[[], None]) -> None:
    topo = _registered_at_a()
    breaking()
    ha, mn = topo.ha.role, topo.mn.role
    a, b = topo.care_of["a"][0], topo.care_of["b"][0]
    forged = MobilitySecurityAssociation(mn.config.msa.spi, b"\x55" * 16, "hmac-md5")
    rrq = RegistrationRequest(home_address=mn.home_address, home_agent=ha.address,
                              care_of_address=b, lifetime=600,
                              identification=forged.new_identification(mn.wallclock()),
                              flags=RequestFlags.D | RequestFlags.T)
    packet = build_udp_packet(a2b(b), a2b(ha.address), 434, 434,
                              forged.sign(build_registration_request(rrq)))
    actions = ha.receive_from_net(packet, topo.sim.now)
    assert [x for x in actions if isinstance(x, SendToNet)] == []    # no reply, no SIU
    assert ha.drops[DropReason.MIP_AUTH_FAILED] == 1
    assert ha.bindings[mn.home_address].care_of_address == a


def mutate_answer_invalid_rrq(monkeypatch):
    """The HA answers a request whose authenticator fails (code 131)."""
    _mutate(monkeypatch, home_agent_module, "HomeAgent", "_registration",
            "            msa.verify(data)\n        except ParseError as exc:\n"
            "            return self._drop(exc.reason)\n",
            "            msa.verify(data)\n        except ParseError as exc:\n"
            "            return self._deny(now, rrq, msa, self._mobiles[owner], src, sport,\n"
            "                              not in_prefix(src, *self._home_net),\n"
            "                              ReplyCode.HA_MOBILE_NODE_FAILED_AUTHENTICATION,\n"
            "                              exc.reason)\n")


# --- claim 8: without a reply the MN retries, then re-establishes the tunnel -------------------
def check_mn_retries_then_reestablishes(breaking: Callable[[], None]) -> None:
    topo = _registered_at_a(sa_source="ikev2", ike={"dpd_interval_s": 0})
    breaking()
    mn, ha = topo.mn.role, topo.ha.role
    spi = mn.config.msa.spi
    ha._msa_by_spi[spi] = (MobilitySecurityAssociation(spi, b"\x55" * 16, "hmac-md5"),
                           ha._msa_by_spi[spi][1])           # the HA stays silent
    events = [e for e in _during(topo, lambda: topo.move("b"), 60.0) if e.node == mn.name]
    kinds = [e.kind for e in events]
    assert "reestablish-requested" in kinds and "ike-reestablish" in kinds, kinds
    first = kinds.index("reestablish-requested")
    retries = min(IKE_FALLBACK_ATTEMPTS, mn.config.max_attempts)     # through SAs that may
    assert kinds[:first].count("rrq-sent") == retries > 1             # point elsewhere: retried


def mutate_never_reestablish(monkeypatch):
    """The registration table retries for ever instead of re-establishing the tunnel."""
    monkeypatch.setitem(TRANSITIONS, (RegState.REGISTERING, RegEvent.NO_REPLY_ROUND),
                        (RegState.REGISTERING, Do.SEND_AGAIN))


# --- claim 9: the MN at home is answered directly ----------------------------------------------
def check_mn_at_home_direct_reply(breaking: Callable[[], None]) -> None:
    topo = _registered_at_a()
    breaking()
    mn = topo.mn.role
    events = _during(topo, lambda: topo.move("home"), 0.5)
    accepted = _kinds(events, "rrq-accepted", "ha")
    assert accepted and accepted[0].detail["via_gateway"] is False
    assert [e.detail["via"] for e in _kinds(events, "rrp-received", "mn")] == ["direct"]
    assert mn.state is RegState.AT_HOME


def mutate_reply_through_gw_at_home(monkeypatch):
    """The HA sends every reply through the GW, also to an MN on the home link."""
    _mutate(monkeypatch, home_agent_module, "HomeAgent", "_registration",
            "via_gateway = through is not None or not in_prefix(src, *self._home_net)",
            "via_gateway = True")


CLAIMS: dict[str, tuple[Callable[[], None], Callable[[pytest.MonkeyPatch], None]]] = {
    "1-wildcard-source-sa": (check_wildcard_source_inbound_sa, mutate_check_outer_source),
    "2-mn-repoints-keeping-counters": (check_mn_repoints_keeping_counters,
                                       mutate_reset_sequence_on_repoint),
    "3-rrq-inside-tunnel": (check_rrq_inside_the_tunnel, mutate_rrq_in_the_clear),
    "4-gw-forwards-without-acting": (check_gw_forwards_without_acting, mutate_gw_acts_on_rrq),
    "5-ha-siu-with-reply": (check_ha_sends_siu_with_reply, mutate_ha_replies_directly),
    "6-repoint-before-reply": (check_gw_repoints_before_reply, mutate_repoint_after_forwarding),
    "7-invalid-rrq-no-reply": (check_invalid_rrq_no_reply, mutate_answer_invalid_rrq),
    "8-retry-then-reestablish": (check_mn_retries_then_reestablishes, mutate_never_reestablish),
    "9-at-home-direct-reply": (check_mn_at_home_direct_reply, mutate_reply_through_gw_at_home),
}


@pytest.mark.parametrize("claim", list(CLAIMS))
def test_claim_holds(claim):
    check, _mutation = CLAIMS[claim]
    check(lambda: None)


@pytest.mark.parametrize("claim", list(CLAIMS))
def test_claim_check_catches_its_mutation(claim, monkeypatch):
    """The mutation is applied once the MN is registered (the first registration works), so
    what fails is the claim on the move (or the refused request) that follows."""
    check, mutation = CLAIMS[claim]
    with pytest.raises(AssertionError):
        check(lambda: mutation(monkeypatch))
