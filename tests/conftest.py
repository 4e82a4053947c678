"""Fixtures shared by several test modules."""

from __future__ import annotations

import etcd_cluster
import pytest


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    """A 3-member etcd cluster on loopback shared by the tests that leave it whole (each test
    uses its own key prefix); a test that kills members starts its own cluster."""
    cluster = etcd_cluster.start_cluster(str(tmp_path_factory.mktemp("etcd")))
    yield cluster
    cluster.stop()
