"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

import etcd_cluster


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    """A 3-member etcd cluster on loopback shared by the tests that leave it whole (each test
    uses its own key prefix); a test that kills members starts its own cluster."""
    cluster = etcd_cluster.start_cluster(str(tmp_path_factory.mktemp("etcd")))
    yield cluster
    cluster.stop()


@pytest.fixture
def sigpipe_ignored():
    """Python's default: SIGPIPE ignored, so a write to a socket whose peer died (an etcd member
    killed under the client) raises EPIPE instead of killing the process.  An in-process
    ``mipsec status`` test sets it to SIG_DFL (for ``| head``); undo that around our tests."""
    import signal
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGPIPE, old)
