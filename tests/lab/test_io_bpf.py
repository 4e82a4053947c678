"""The SPI-sharding BPF programs (mipsec.io.bpf) on a real kernel, in a namespace of their own:
two raw ESP sockets each see exactly the SPIs of their worker; in a UDP 4500 SO_REUSEPORT group
IKE (non-ESP marker) and NAT keepalives reach the control socket, ESP the worker its SPI names."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import labs
from mipsec.io import bpf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPIS = list(range(0x1000, 0x1000 + 12)) + [0xFFFFFFFF, 0x12345679]

PROBE = r"""
import json, select, socket, struct, subprocess, sys
from mipsec.io import bpf
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
spis = json.loads(sys.argv[1])
workers = 2
out = {"esp": [], "udp": []}
raw = []
for k in range(workers):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
    bpf.attach(s, bpf.esp_shard_filter(workers, k))
    s.setblocking(False)
    raw.append(s)
udp = []
for k in range(workers + 1):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 4500))
    s.setblocking(False)
    udp.append(s)
bpf.attach(udp[0], bpf.udp_shard_selector(workers), reuseport=True)
send_esp = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
send_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for spi in spis:
    body = struct.pack("!II", spi, 1) + bytes(40)
    send_esp.sendto(body, ("127.0.0.1", 0))
    send_udp.sendto(body, ("127.0.0.1", 4500))
send_udp.sendto(bytes(4) + b"ike", ("127.0.0.1", 4500))      # non-ESP marker
send_udp.sendto(b"\xff", ("127.0.0.1", 4500))                # NAT keepalive
select.select([], [], [], 0.3)
def drain(s, at):
    got = []
    while True:
        try:
            data = s.recv(2048)
        except BlockingIOError:
            return got
        got.append(data[at:at + 4].hex() if len(data) >= at + 4 else data.hex())
out["esp"] = [drain(s, 20) for s in raw]
out["udp"] = [drain(s, 0) for s in udp]
print(json.dumps(out))
"""


def test_programs_refuse_bad_arguments():
    with pytest.raises(ValueError):
        bpf.esp_shard_filter(2, 2)
    with pytest.raises(ValueError):
        bpf.udp_shard_selector(0)
    assert [bpf.worker_of(bpf.spi_for_worker(c, 3, k), 3) for c in (256, 1000, 0xFFFFFFFE)
            for k in range(3)] == [0, 1, 2] * 3
    assert all(bpf.spi_for_worker(c, 4, k) <= 0xFFFFFFFF for c in (0xFFFFFFFF,) for k in range(4))


def test_the_kernel_verifies_both_programs():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        bpf.attach(s, bpf.esp_shard_filter(4, 3))
        with pytest.raises(OSError):
            bpf.attach(s, [(bpf.BPF_JMP | bpf.BPF_JEQ | bpf.BPF_K, 9, 9, 0)])   # jumps out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        bpf.attach(s, bpf.udp_shard_selector(4), reuseport=True)


@pytest.mark.netns
def test_shards_by_spi_in_a_namespace():
    labs.require()
    ns = f"bpf{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE,
                               json.dumps(SPIS)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    hexes = {spi: f"{spi:08x}" for spi in SPIS}
    for k in range(2):
        assert got["esp"][k] == [hexes[s] for s in SPIS if s % 2 == k], got["esp"]
    assert sorted(got["udp"][0]) == sorted(["00000000", "ff"]), got["udp"]
    for k in range(2):
        assert got["udp"][1 + k] == [hexes[s] for s in SPIS if s % 2 == k], got["udp"]
