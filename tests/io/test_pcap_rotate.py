"""Captures are bounded and never truncated: a restart rotates the earlier run's file away, a
size limit rotates the current one, and only ``keep`` old files stay."""

from __future__ import annotations

import random

import pytest

from mipsec.config import KeySetLayout, config_from_dict, dump_config, make_key_set
from mipsec.errors import ConfigError
from mipsec.io.pcap import PcapWriter, read_pcap

PACKET = bytes.fromhex("4500001c0000400040110000ac100001ac100002") + bytes(8)


def test_a_restart_keeps_the_earlier_capture(tmp_path):
    path = tmp_path / "gw.pcap"
    first = PcapWriter(path, keep=2)
    first.write(PACKET, 1.0)
    first.close()
    second = PcapWriter(path, keep=2)
    second.write(PACKET, 2.0)
    second.write(PACKET, 3.0)
    second.close()
    assert [t for t, _ in read_pcap(path)] == [2.0, 3.0]
    assert [t for t, _ in read_pcap(f"{path}.1")] == [1.0]
    PcapWriter(path, keep=2).close()
    assert [t for t, _ in read_pcap(f"{path}.2")] == [1.0]
    assert [t for t, _ in read_pcap(f"{path}.1")] == [2.0, 3.0]
    assert read_pcap(path) == []


def test_the_size_limit_rotates_and_bounds_the_total(tmp_path):
    path = tmp_path / "gw.pcap"
    record = 16 + len(PACKET)
    writer = PcapWriter(path, max_bytes=24 + 3 * record, keep=2)
    for i in range(20):
        writer.write(PACKET, float(i))
    writer.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["gw.pcap", "gw.pcap.1", "gw.pcap.2"]
    assert all(f.stat().st_size <= 24 + 3 * record for f in files)
    times = [t for f in (f"{path}.2", f"{path}.1", path) for t, _ in read_pcap(f)]
    assert times == [float(i) for i in range(20 - len(times), 20)]      # newest kept, in order
    assert writer.rotations == 6


def test_no_old_files_with_keep_zero_and_one_packet_bigger_than_the_limit(tmp_path):
    path = tmp_path / "x.pcap"
    PcapWriter(path).close()
    writer = PcapWriter(path, max_bytes=10, keep=0)
    writer.write(PACKET, 1.0)
    writer.write(PACKET, 2.0)
    writer.close()
    assert [f.name for f in tmp_path.iterdir()] == ["x.pcap"]
    assert [t for t, _ in read_pcap(path)] == [2.0]


def test_capture_limits_in_the_configuration(tmp_path):
    import tomllib
    cfg = make_key_set(1, KeySetLayout(run_dir=str(tmp_path), pcap_dir=str(tmp_path)),
                       keys_from=random.Random(2))["gw"]
    assert cfg.daemon.pcap_max_mb > 0 and cfg.daemon.pcap_keep > 0      # bounded by default
    data = tomllib.loads(dump_config(cfg))
    data["daemon"]["pcap_max_mb"] = -1
    with pytest.raises(ConfigError, match=r"gw.toml: \[daemon\] pcap_max_mb: must be 0"):
        config_from_dict(data, "gw.toml")
