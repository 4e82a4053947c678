"""The runtimes build roles through ``build_role`` and use only the ``Role`` protocol."""

from __future__ import annotations

import inspect
import random

import pytest

from mipsec.errors import UsageError
from mipsec.node.config import make_lab_configs
from mipsec.node.role import Role, build_role

MEMBERS = [name for name in dir(Role) if not name.startswith("_")]


def _roles():
    lab = make_lab_configs(2, keys_from=random.Random(3))
    clock = lambda: 1_800_000_000.0                    # noqa: E731
    return {"mn": build_role("mn", lab.mobiles[0], wallclock=clock, now=5.0),
            "gw": build_role("gw", lab.gateway, wallclock=clock, now=5.0),
            "ha": build_role("ha", lab.home_agent, wallclock=clock, now=5.0)}


def test_every_role_has_every_member_of_the_protocol():
    assert {"receive_from_net", "receive_from_tun", "handle_event", "handle_timer",
            "get_timer", "status", "esp_sas"} <= set(MEMBERS)
    for kind, role in _roles().items():
        for name in MEMBERS:
            assert hasattr(role, name), (kind, name)
        for name in ("name", "timeline", "drops"):
            assert hasattr(role, name), (kind, name)
        assert isinstance(role.status(), dict)


def test_esp_sas_are_the_roles_sas_and_start_at_now():
    roles = _roles()
    mn, gw = roles["mn"], roles["gw"]
    assert mn.esp_sas() == [mn.inbound, mn.outbound]
    assert gw.esp_sas() == [sa for m in gw.mobiles.values() for sa in (m.inbound, m.outbound)]
    assert len(gw.esp_sas()) == 4 and roles["ha"].esp_sas() == []
    assert all(sa.created == 5.0 for sa in mn.esp_sas() + gw.esp_sas())


def test_an_unknown_kind_is_refused_by_name_and_the_daemon_needs_no_reflection():
    with pytest.raises(UsageError, match="unknown role 'cn'"):
        build_role("cn", None, wallclock=lambda: 0.0, now=0.0)
    from mipsec.io import daemon
    source = inspect.getsource(daemon)
    assert "inspect.signature" not in source and "._pairs" not in source
