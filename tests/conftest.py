"""Fixtures shared by several test modules, and the test levels.

The tests are grouped by level, one folder each (README.md, "Developing"): ``vectors``
(published vectors and codecs), ``unit`` (one part at a time), ``sim`` (the roles in the
in-memory network), ``io`` (daemons and adapters on fakes and loopback), ``lab`` (network
namespaces, root), ``interop`` (strongSwan, Scapy, tshark, etcd, the packaging tools) and
``security`` (attacks; its namespace tests count as lab too).  Each test gets its folder's
marker, so ``pytest -m "not lab and not interop"`` runs the fast levels; a test that needs
namespaces (``netns``) is also ``lab`` and one that needs strongSwan is also ``interop``,
wherever it lives.  ruff and mypy (tests/unit/test_guardrails.py) are also ``guardrails``, and
``--hypothesis-profile=fast`` runs the property tests with fewer examples (tests/levels.py): the
fast run of README.md "Developing".  The helpers beside this file (``needs``, ``labs``,
``daemon_fakes``, ...) are importable from every level; ``new_lab`` starts a namespace lab that
is torn down after the test.
"""

from __future__ import annotations

import contextlib
import pathlib

import pytest
from hypothesis import settings

import etcd_cluster
import labs
import levels
from levels import level_of

# ``--hypothesis-profile=fast``: the fast run of README.md "Developing" (tests/levels.py); the
# profile covers the property tests without an example count of their own
settings.register_profile(levels.FAST_PROFILE, max_examples=10)


def pytest_configure(config):
    levels.fast = config.getoption("hypothesis_profile", None) == levels.FAST_PROFILE


def pytest_collection_modifyitems(config, items):
    for item in items:
        level = level_of(pathlib.Path(item.path))
        if level is not None:
            item.add_marker(level)
        if item.get_closest_marker("netns") is not None and level != "lab":
            item.add_marker("lab")
        if item.get_closest_marker("strongswan") is not None and level != "interop":
            item.add_marker("interop")


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    """A 3-member etcd cluster on loopback shared by the tests that leave it whole (each test
    uses its own key prefix); a test that kills members starts its own cluster."""
    cluster = etcd_cluster.start_cluster(str(tmp_path_factory.mktemp("etcd")))
    yield cluster
    cluster.stop()


@pytest.fixture
def new_lab():
    """``new_lab(tag, **up)``: a network-namespace lab of the test's own (prefix ``tag`` + pid),
    started with ``Lab.up(**up)``; needs root (fails in CI, skips elsewhere).  Whatever the test
    does, every lab it started is torn down after it, leaving no namespace (``tests/labs.py``)."""
    with contextlib.ExitStack() as stack:
        yield lambda tag, **up: stack.enter_context(labs.started(labs.prefix(tag), **up))


@pytest.fixture
def sigpipe_ignored():
    """Python's default: SIGPIPE ignored, so a write to a socket whose peer died (an etcd member
    killed under the client) raises EPIPE instead of killing the process.  An in-process
    ``mipsec status`` test sets it to SIG_DFL (for ``| head``); undo that around our tests."""
    import signal
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGPIPE, old)
