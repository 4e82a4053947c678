"""The network-namespace lab in tests, in one place: a prefix of our own, the requirement check,
a lab torn down whatever happens (and nothing of it left behind), ``mipsec`` on the command line,
and polling instead of sleeping.  The ``new_lab`` fixture (tests/conftest.py) is built on these.

* ``prefix(tag)``: a namespace prefix no other test process uses (``tag`` + our pid);
* ``require(nft=False)``: root, ``ip``, namespaces (and nftables: a NAT'd visited network, the
  host-filter counters): FAILS in CI, skips elsewhere (``needs.need``);
* ``torn_down(prefix)``: the lab of that prefix, removed before (a leftover of a killed run) and
  after the block; afterwards no namespace of it exists (asserted);
* ``started(prefix, **up)``: the same around ``Lab.up(**up)``;
* ``cli(*args)``: ``python -m mipsec ARGS`` from the repository, its output captured;
* ``wait_until(check)``: ``check()``'s first true result, or its last AssertionError.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import needs
from mipsec.lab import topology
from mipsec.lab.lab import Lab, requirements_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prefix(tag: str) -> str:
    """``tag`` + this process's id (five digits at most, so that interface names stay short)."""
    return f"{tag}{os.getpid() % 100000}-"


def require(nft: bool = False) -> None:
    problem = requirements_problem()
    if problem is None and nft and shutil.which(topology.NFT) is None:
        problem = "nftables is not installed (Debian package nftables)"
    needs.need(problem, f"lab tests are required in CI: {problem}")


@contextlib.contextmanager
def torn_down(lab_prefix: str, *, nft: bool = False) -> Iterator[Lab]:
    require(nft)
    lab = Lab(prefix=lab_prefix)
    lab.down()
    try:
        yield lab
    finally:
        lab.down()
    assert topology.existing_namespaces(lab_prefix) == []


@contextlib.contextmanager
def started(lab_prefix: str, **up: Any) -> Iterator[Lab]:
    with torn_down(lab_prefix, nft=bool(up.get("nat"))) as lab:
        lab.up(**up)
        yield lab


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mipsec", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def wait_until(check: Callable[[], Any], timeout: float = 10.0, every: float = 0.1) -> Any:
    """``check()``'s first true result; fails with its last AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
            problem: Any = result
        except AssertionError as exc:
            problem = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {problem}")
        time.sleep(every)
