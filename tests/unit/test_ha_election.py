"""Several HAs for one home network, sans-I/O: the election machine and the SIU numbering.

* the election table is the logic: every pair in it is reachable and does what it says, a pair
  not in it is refused;
* fencing, against a model of etcd's lease (expiry = when the server *received* the grant or
  keep-alive + TTL, and any leader change resets it to the full TTL): over thousands of random
  schedules with delays, lost requests and partitions, an HA serves only while its lease is
  alive on the server, so two HAs never serve at once; a healthy active is never fenced;
* the SIU sequence blocks: an HA that takes over from another (with a wall clock behind the old
  one's) continues above every number the old one could have sent, and an old active that runs
  on learns of the new reservation and jumps above it.
"""

from __future__ import annotations

import math
import random

import pytest

from mipsec.errors import ConfigError, UsageError
from mipsec.node import home_agent_store as ha_store_module
from mipsec.node.actions import (
    PersistBinding,
    ReserveSiuSequence,
    SendToNet,
    SiuSequenceNotReserved,
)
from mipsec.node.election import (
    ELECTION_TRANSITIONS,
    Campaign,
    ElectionEvent,
    ElectionState,
    HaElection,
    RenewLease,
    StartServing,
    StopServing,
)
from mipsec.node.home_agent import HomeAgent
from mipsec.node.home_agent_store import META_SIU_SEQUENCE
from mipsec.sim.topology import build_topology
from mipsec.store import MemoryStore
from mipsec.wire.siu import SiuType, parse_siu

TTL, RENEW, MARGIN, CAMPAIGN = 2.0, 0.4, 0.6, 0.5


def _election(name="a", now=0.0) -> HaElection:
    return HaElection(name, ttl_s=TTL, renew_every_s=RENEW, fence_margin_s=MARGIN,
                      campaign_every_s=CAMPAIGN, now=now)


def _in_state(state: ElectionState) -> HaElection:
    e = _election()
    if state is ElectionState.STANDBY:
        return e
    if state is ElectionState.ACTIVE:
        assert e.handle_timer(0.0) == [Campaign("a", TTL)]
        assert e.campaign_result(True, 0.0, 0.01) == [StartServing()]
        return e
    e.stop(0.0)
    return e


def _fire(e: HaElection, event: ElectionEvent, now: float) -> list:
    if event is ElectionEvent.WON:
        e.handle_timer(now)
        return e.campaign_result(True, now, now)
    if event is ElectionEvent.LOST:
        e.handle_timer(now)
        return e.campaign_result(False, now, now)
    if event is ElectionEvent.LEADER_GONE:
        return e.leader_seen(None, now)
    if event is ElectionEvent.RENEWED:
        return e.renew_result(True, now, now)
    if event is ElectionEvent.RENEW_FAILED:
        return e.renew_result(None, now, now)
    if event is ElectionEvent.LEASE_LOST:
        return e.renew_result(False, now, now)
    if event is ElectionEvent.SERVE_DEADLINE:
        return e.handle_timer(e.serve_until)
    return e.stop(now)


@pytest.mark.parametrize("pair", sorted(ELECTION_TRANSITIONS, key=str), ids=str)
def test_every_transition_of_the_table(pair):
    state, event = pair
    new, effect = ELECTION_TRANSITIONS[pair]
    e = _in_state(state)
    actions = _fire(e, event, 0.1)
    assert e.state is new and e.history[-1][1:] == (event.value, new.value)
    kinds = [type(a) for a in actions]
    if effect.value == "serve":
        assert kinds == [StartServing] and e.serve_until == pytest.approx(0.1 + TTL - MARGIN)
    elif effect.value in ("fence", "resign"):
        assert kinds == [StopServing] and actions[0].resign == (effect.value == "resign")
        assert not e.may_serve(0.1)
    elif effect.value == "campaign-now":
        assert kinds == [Campaign]
    else:
        assert StartServing not in kinds and StopServing not in kinds


def test_pairs_not_in_the_table_are_refused():
    e = _in_state(ElectionState.STOPPED)
    for event in ElectionEvent:
        if (ElectionState.STOPPED, event) not in ELECTION_TRANSITIONS:
            with pytest.raises(UsageError):
                e._event(event, 0.0)
    # a standby cannot be renewed: the inputs that do not apply are ignored, not acted on
    s = _election()
    assert s.renew_result(True, 0.0, 0.0) == [] and s.state is ElectionState.STANDBY
    assert ((ElectionState.STANDBY, ElectionEvent.RENEWED) not in ELECTION_TRANSITIONS)


def test_a_lagging_watch_does_not_fence_a_new_active():
    e = _election()
    e.handle_timer(0.0)
    e.campaign_result(True, 0.0, 0.01, revision=42)
    # the watch's range read from before our win still showed no leader key
    assert e.leader_seen(None, 0.02, revision=40) == [] and e.may_serve(0.02)
    # once it reports our own key's revision or later, a change is news
    assert e.leader_seen("a", 0.03, revision=42) == [] and e.may_serve(0.03)
    assert e.leader_seen("b", 0.04, revision=43) == [StopServing("the leader key names 'b'")]


def test_settings_that_would_fence_a_healthy_active_are_refused():
    with pytest.raises(ConfigError, match="ha_renew_every_s"):
        HaElection("a", ttl_s=2.0, renew_every_s=1.5, fence_margin_s=0.6)
    with pytest.raises(ConfigError, match="ha_fence_margin_s"):
        HaElection("a", ttl_s=2.0, fence_margin_s=2.0)


def test_a_standbys_lost_campaigns_are_recorded_once_per_run():
    e = _election()
    for i in range(10):
        e.handle_timer(i * CAMPAIGN)
        e.campaign_result(False, i * CAMPAIGN, i * CAMPAIGN)
    e.leader_seen(None, 6.0)
    e.campaign_result(False, 6.0, 6.0)
    assert [h[1] for h in e.history] == ["lost", "leader-gone", "lost"]


def test_a_late_answer_never_moves_the_deadline_back():
    e = _in_state(ElectionState.ACTIVE)
    e.renew_result(True, 1.0, 1.05)
    until = e.serve_until
    e.renew_result(True, 0.5, 1.10)          # an answer to an older keep-alive
    assert e.serve_until == until


class _LeaseServer:
    """etcd as far as the election sees it: a key created if absent on a lease; the lease
    expires TTL after the server received its grant or latest keep-alive, and a leader change
    resets every lease to its full TTL (etcd 3.4, measured)."""

    def __init__(self):
        self.holder: str | None = None
        self.expires = -math.inf

    def tick(self, now: float) -> None:
        if self.holder is not None and now >= self.expires:
            self.holder = None

    def campaign(self, who: str, at: float) -> bool:
        self.tick(at)
        if self.holder is None:
            self.holder, self.expires = who, at + TTL
            return True
        return False

    def keepalive(self, who: str, at: float) -> bool:
        self.tick(at)
        if self.holder == who:
            self.expires = at + TTL
            return True
        return False

    def leader_change(self, at: float) -> None:
        self.tick(at)
        if self.holder is not None:
            self.expires = at + TTL


def _run_schedule(seed: int, duration: float = 20.0) -> tuple[int, int]:
    """Two HAs against the lease server with random request delays, losses, partitions and
    etcd leader changes.  Asserts at every step: an HA that may serve holds the live lease.
    Returns (takeovers, fences)."""
    rng = random.Random(seed)
    server = _LeaseServer()
    has = {n: _election(n, now=rng.uniform(0, 0.3)) for n in ("a", "b")}
    cut: dict[str, float] = {"a": -1.0, "b": -1.0}       # partitioned until
    inflight: list[tuple[float, str, str, float, float]] = []  # (answer at, who, kind, sent, ok)
    now, step = 0.0, 0.01
    takeovers = fences = 0

    def act(who: str, actions: list, now: float) -> None:
        nonlocal takeovers, fences
        for a in actions:
            if isinstance(a, StartServing):
                takeovers += 1
            elif isinstance(a, StopServing):
                fences += 1
            elif isinstance(a, (Campaign, RenewLease)):
                kind = "campaign" if isinstance(a, Campaign) else "renew"
                lost = now < cut[who] or rng.random() < 0.05
                arrive = now + rng.uniform(0.0, 0.15)
                if lost:
                    inflight.append((now + 0.3, who, kind, now, None))   # a timeout
                else:
                    ok = (server.campaign(who, arrive) if kind == "campaign"
                          else server.keepalive(who, arrive))
                    inflight.append((arrive + rng.uniform(0.0, 0.15), who, kind, now, ok))

    while now < duration:
        now += step
        if rng.random() < 0.002:
            cut[rng.choice("ab")] = now + rng.uniform(0.5, 5.0)
        if rng.random() < 0.001:
            server.leader_change(now)
        server.tick(now)
        for item in [i for i in inflight if i[0] <= now]:
            inflight.remove(item)
            _at, who, kind, sent, ok = item
            e = has[who]
            if kind == "campaign":
                act(who, e.campaign_result(bool(ok), sent, now), now)
            else:
                act(who, e.renew_result(ok, sent, now), now)
        for who, e in has.items():
            t = e.get_timer()
            if t is not None and t <= now:
                act(who, e.handle_timer(now), now)
            if e.may_serve(now):
                # the invariant: whoever serves holds the lease, and it is alive on the server
                assert server.holder == who and server.expires > now, (seed, now, who)
    return takeovers, fences


def test_never_two_serving_over_random_schedules():
    takeovers = fences = 0
    for seed in range(40):
        t, f = _run_schedule(seed)
        takeovers += t
        fences += f
    # the schedules exercised takeovers and fencing, not only a quiet active
    assert takeovers > 40 and fences > 5


def test_a_healthy_active_is_never_fenced():
    server = _LeaseServer()
    e = _election()
    now, served = 0.0, []
    pending: list[tuple[float, str, float]] = []
    for a in e.handle_timer(0.0):
        assert isinstance(a, Campaign)
        pending.append((0.002, "campaign", 0.0))
    while now < 60.0:
        now = round(now + 0.01, 3)
        for item in [p for p in pending if p[0] <= now]:
            pending.remove(item)
            _at, kind, sent = item
            acts = (e.campaign_result(server.campaign("a", sent + 0.001), sent, now)
                    if kind == "campaign" else
                    e.renew_result(server.keepalive("a", sent + 0.001), sent, now))
            assert not any(isinstance(a, StopServing) for a in acts)
        for a in e.handle_timer(now) if (e.get_timer() or math.inf) <= now else []:
            assert isinstance(a, RenewLease), a
            pending.append((now + 0.002, "renew", now))
        served.append(e.may_serve(now))
    assert all(served[1:])


# --- SIU numbering across HAs -----------------------------------------------------------------

def _carry(ha: HomeAgent, store: MemoryStore, actions: list, now: float) -> list[bytes]:
    """What the daemon does with the HA's store actions; returns the SIUs that left."""
    sent, skipping = [], False
    for a in actions:
        if isinstance(a, PersistBinding):
            skipping = False
            if a.record is not None:
                store.put(a.record, dict(a.meta))
        elif isinstance(a, ReserveSiuSequence):
            if not store.compare_and_swap_meta(a.key, a.expected, a.end.to_bytes(8, "big")):
                skipping = True
                ha.handle_event(SiuSequenceNotReserved(a.gateway, store.meta().get(a.key),
                                                       "taken"), now)
        elif isinstance(a, SendToNet) and not skipping and a.packet[9] == 17:
            sent.append(a.packet[28:])
    return sent


def test_a_new_active_never_sends_a_number_the_gw_has_seen(monkeypatch):
    monkeypatch.setattr(ha_store_module, "SIU_SEQUENCE_BLOCK", 16)     # small blocks, same logic
    SIU_SEQUENCE_BLOCK = 16
    topo = build_topology(1, seed=5)
    config, gw = topo.ha.role.config, topo.ha.role.config.gateways[0].address
    home = config.mobiles[0].home_address
    store = MemoryStore()
    wall = [1_000_000.0]
    old = HomeAgent(config, wallclock=lambda: wall[0])
    old.restore([], store.meta(), 0.0)
    sent: list[int] = []
    # the old active sends more SIUs than one block holds (resends of an unacknowledged SIU)
    acts = old._siu(0.0, SiuType.UPDATE,
                    old._mobiles[home], None, "172.16.1.10", 600, b"")
    for _ in range(SIU_SEQUENCE_BLOCK + 10):
        sent += [parse_siu(d).sequence for d in _carry(old, store, acts, 0.0)]
        acts = old._siu(0.0, SiuType.UPDATE, old._mobiles[home],
                        None, "172.16.1.10", 600, b"")
    assert old.counters["siu-sequence-reserved"] == 2
    assert len(sent) == SIU_SEQUENCE_BLOCK + 10 and sent == sorted(set(sent))
    # a standby whose wall clock is an hour behind takes over: it continues above every number
    new = HomeAgent(config, wallclock=lambda: wall[0] - 3600.0)
    new.restore(store.load(0.0), store.meta(), 0.0)
    first = [parse_siu(d).sequence for d in _carry(
        new, store, new._siu(0.0, SiuType.UPDATE, new._mobiles[home],
                             None, "172.16.1.10", 600, b""), 0.0)]
    assert first and first[0] > max(sent)
    assert new._ack_verifier.floor > max(sent)       # ACKs of the old active's SIUs are old
    # the old active, still running (a partition), reaches the end of its block: its
    # reservation finds the new one's, the SIU is not sent, and it jumps above the new block
    before = len(sent)
    for _ in range(SIU_SEQUENCE_BLOCK):
        acts = old._siu(0.0, SiuType.UPDATE, old._mobiles[home],
                        None, "172.16.1.10", 600, b"")
        sent += [parse_siu(d).sequence for d in _carry(old, store, acts, 0.0)]
        if old.counters["siu-sequence-not-reserved"]:
            break
    assert old.counters["siu-sequence-not-reserved"] == 1
    assert all(n < first[0] for n in sent[before:])     # only numbers of its own old block
    assert old._signers[gw].next_sequence >= int.from_bytes(
        store.meta()[META_SIU_SEQUENCE + gw], "big") - SIU_SEQUENCE_BLOCK
    assert old.timeline[-1].kind == "siu-sequence-not-reserved"
