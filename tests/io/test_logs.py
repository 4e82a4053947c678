"""Log lines that explain: lifecycle INFO lines, a WARNING for every key/identity/address
mismatch on the side that detects it (naming the peer and the reason), DEBUG drops, JSON lines.

Real ``Daemon`` objects around the real roles on in-memory TUN and net fakes (from
daemon_fakes), one configuration of the matching set spoiled per mismatch test.  The WARNING
must come out in the same loop batch that counted the drop: the daemon's loop then waits at most
``HURRY_WAIT_S`` (0.2 s) before the next look, so a real daemon says it within 1 s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import socket

import pytest

from daemon_fakes import close_daemons, pump, start_daemons
from mipsec.config import KeySetLayout, make_key_set
from mipsec.io import logs
from mipsec.io.loop import HURRY_WAIT_S, MAX_IDLE_WAIT_S
from mipsec.lab.lab import lab_key_kwargs

COA = "172.16.2.10"


def build(tmp_path, spoil=None, sa_source="manual"):
    # the lab's default transform for the SA source: AES-GCM with IKEv2, AES-CBC with manual
    # keys (manual keys with an AEAD transform are refused)
    kw = lab_key_kwargs(None, False, sa_source, "siu")
    sets = make_key_set(1, KeySetLayout(run_dir=str(tmp_path)), keys_from=random.Random(5), **kw)
    if spoil is not None:
        name, change = spoil
        sets[name] = change(sets[name])
    return start_daemons(sets)


@pytest.fixture
def lab(tmp_path):
    made = []

    def make(spoil=None, sa_source="manual"):
        d = build(tmp_path, spoil, sa_source)
        made.append(d)
        return d
    yield make
    for daemons in made:
        close_daemons(daemons)


def node(daemon, **changes):
    return dataclasses.replace(daemon, node=dataclasses.replace(daemon.node, **changes))


def flip(key: bytes) -> bytes:
    return bytes([key[0] ^ 1]) + key[1:]


def move(daemons):
    daemons["mn"].handle_command("handover", [COA, "vb0"])
    pump(daemons)


def records(caplog, level, name=None):
    return [r for r in caplog.records if r.levelno == level
            and (name is None or r.getMessage().startswith(name))]


def test_a_handover_logs_the_lifecycle_at_info(lab, caplog):
    caplog.set_level(logging.INFO, logger="mipsec")
    daemons = lab()
    move(daemons)
    assert daemons["mn"].status()["node"]["state"] == "registered"
    text = "\n".join(r.getMessage() for r in records(caplog, logging.INFO))
    assert f"ha:ha: 10.1.0.100 registered at care-of address {COA}, lifetime" in text
    assert "gw:gw: 10.1.0.100 SIU applied" in text
    assert "ha:ha: 10.1.0.100 SIU sent" in text
    assert "mn:mn: 10.1.0.100 care-of address changed" in text
    mn_reg = [r for r in records(caplog, logging.INFO, "mn:") if getattr(r, "event", "") == "registered"]
    assert len(mn_reg) == 1 and "handover took" in mn_reg[0].getMessage()
    assert mn_reg[0].handover_ms >= 0
    assert not records(caplog, logging.WARNING)
    caplog.clear()
    daemons["mn"].handle_command("home", ["home0"])
    pump(daemons)
    text = "\n".join(r.getMessage() for r in records(caplog, logging.INFO))
    assert "ha:ha: 10.1.0.100 deregistered" in text
    assert "mn:mn: 10.1.0.100 deregistered" in text


def test_ikev2_logs_the_ike_sa_with_its_proposal_and_the_child_sa(lab, caplog):
    caplog.set_level(logging.INFO, logger="mipsec")
    daemons = lab(sa_source="ikev2")
    move(daemons)
    up = [r for r in records(caplog, logging.INFO) if getattr(r, "event", "") == "ike-sa-up"]
    assert {r.getMessage().split(":")[0] for r in up} == {"mn", "gw"}
    assert all("proposal ENCR_" in r.getMessage() for r in up)
    text = "\n".join(r.getMessage() for r in records(caplog, logging.INFO))
    assert "child SA installed" in text
    assert not records(caplog, logging.WARNING)


def _warning(caplog, side, reason):
    found = [r for r in records(caplog, logging.WARNING, f"{side}:")
             if getattr(r, "reason", None) == reason]
    assert found, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return found


@pytest.mark.parametrize("case", ["mn-ha key", "siu key", "esp key", "psk", "wrong ha address"])
def test_every_mismatch_gives_a_warning_naming_peer_and_reason(lab, caplog, case):
    caplog.set_level(logging.INFO, logger="mipsec")
    sa_source = "ikev2" if case == "psk" else "manual"
    spoil, side, reason, peer = {
        "mn-ha key": (("mn", lambda c: node(c, msa=dataclasses.replace(
            c.node.msa, key=flip(c.node.msa.key)))), "ha", "mip-authentication-failed", None),
        "siu key": (("gw", lambda c: node(c, home_agents=tuple(
            dataclasses.replace(h, key=flip(h.key)) for h in c.node.home_agents))),
            "gw", "siu-authentication-failed", "ha"),
        # (manual keys are CBC + HMAC: the integrity key is the one the ICV check sees)
        "esp key": (("mn", lambda c: node(c, esp_out=dataclasses.replace(
            c.node.esp_out, integrity_key=flip(c.node.esp_out.integrity_key)))),
            "gw", "icv-mismatch", "SA 0x"),
        "psk": (("mn", lambda c: node(c, ike=dataclasses.replace(
            c.node.ike, psk=flip(c.node.ike.psk)))), "gw", "ike-authentication-failed", None),
        "wrong ha address": (("gw", lambda c: node(
            c, home_agents=tuple(dataclasses.replace(h, address="10.1.0.3")
                                 for h in c.node.home_agents),
            mobiles=tuple(dataclasses.replace(m, home_agent="10.1.0.3")
                          for m in c.node.mobiles))), "gw", "siu-unknown-sender", "ha"),
    }[case]
    daemons = lab(spoil, sa_source)
    move(daemons)
    found = _warning(caplog, side, reason)
    message = found[0].getMessage()
    if peer == "ha":
        peer = daemons["ha"].cfg.node.address
    assert (peer or "from ") in message and "mismatch" in message or "address" in message
    assert found[0].peer != "from unknown"
    # rate-limited: a second failing attempt in the same 10 s gives no second line
    before = len(found)
    move(daemons)
    assert len(_warning(caplog, side, reason)) == before


def test_the_loop_hurries_while_a_drop_check_is_pending(lab):
    daemons = lab()
    gw = daemons["gw"]
    gw.events.on_silent(b"\x45" + bytes(11) + socket.inet_aton("192.0.2.9") + bytes(4))
    assert gw.events.wants_wakeup()
    waits = []
    gw.loop._ready = lambda timeout: waits.append(timeout) or []
    gw.loop.run_once()
    assert waits[0] <= HURRY_WAIT_S < MAX_IDLE_WAIT_S
    assert not gw.events.wants_wakeup()


def test_debug_adds_drops_and_message_level_events(lab, caplog):
    caplog.set_level(logging.DEBUG, logger="mipsec")
    daemons = lab()
    move(daemons)
    debug = [r.getMessage() for r in records(caplog, logging.DEBUG) if r.name == "mipsec.events"]
    assert any("rrq-sent" in m for m in debug) and any("rrq-forwarded" in m for m in debug)
    bogus = b"\x45" + bytes(8) + b"\x32" + bytes(2) + socket.inet_aton("192.0.2.9") \
        + socket.inet_aton(daemons["gw"].cfg.node.outside_address) + (0xdead).to_bytes(4, "big")
    bogus = bogus[:2] + len(bogus + bytes(20)).to_bytes(2, "big") + bogus[4:] + bytes(20)
    daemons["gw"].sender.inject(bogus)
    pump(daemons)
    drops = [r for r in records(caplog, logging.DEBUG) if getattr(r, "event", "") == "drop"]
    assert drops and "192.0.2.9" in drops[0].getMessage()


def test_rate_limiter_counts_what_it_holds_back():
    limiter = logs.RateLimiter(interval=10.0)
    assert limiter.allow("k", 0.0) == (True, 0)
    assert limiter.allow("k", 1.0, 3) == (False, 0)
    assert limiter.allow("other", 1.0) == (True, 0)
    assert limiter.allow("k", 10.5) == (True, 3)


def test_json_format_one_object_per_line_with_fields():
    record = logging.LogRecord("mipsec.events", logging.WARNING, __file__, 1, "gw: %s", ("x",),
                               None)
    record.reason = "icv-mismatch"
    record.peer = "SA 0x00000101"
    line = logs.JsonFormatter().format(record)
    data = json.loads(line)
    assert data["level"] == "WARNING" and data["message"] == "gw: x"
    assert data["reason"] == "icv-mismatch" and data["peer"] == "SA 0x00000101"
    assert data["time"].endswith("+00:00")


def test_log_format_in_config_and_refused_when_unknown(tmp_path):
    from mipsec.config import config_from_dict
    from mipsec.errors import ConfigError
    sets = make_key_set(1, KeySetLayout(run_dir=str(tmp_path)), keys_from=random.Random(1))
    import tomllib

    from mipsec.config import dump_config
    data = tomllib.loads(dump_config(sets["ha"]))
    data["daemon"]["log_format"] = "json"
    assert config_from_dict(data, "ha.toml").daemon.log_format == "json"
    data["daemon"]["log_format"] = "xml"
    with pytest.raises(ConfigError, match=r"ha.toml: \[daemon\] log_format: unknown format"):
        config_from_dict(data, "ha.toml")


def test_a_timeline_cut_short_is_not_logged_again():
    from mipsec.node.actions import TimelineEvent

    class Role:
        timeline = [TimelineEvent(float(i), "gw", "rrq-forwarded", {}) for i in range(10)]
    watcher = logs.RoleWatcher(Role, "gw")
    assert len(watcher._new_events()) == 10
    del Role.timeline[:8]                      # the role forgot its oldest events ...
    Role.timeline.append(TimelineEvent(10.0, "gw", "rrq-forwarded", {}))
    assert [e.time for e in watcher._new_events()] == [10.0]
    Role.timeline[:] = [TimelineEvent(20.0, "gw", "rrq-forwarded", {})]   # ... all of them
    assert [e.time for e in watcher._new_events()] == [20.0]
