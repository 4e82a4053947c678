"""The Prometheus endpoint ([metrics] listen), scraped over HTTP from real daemons (in-memory TUN
and net fakes, the endpoint on a loopback TCP port) and parsed with prometheus_client's text
parser; `mipsec status --instance` and `--watch`."""

from __future__ import annotations

import dataclasses
import random
import socket
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_fakes import close_daemons, pump, start_daemons
from mipsec import cli
from mipsec.config import KeySetLayout, MetricsSettings, config_from_dict, dump_config, make_key_set
from mipsec.errors import ConfigError

COA = "172.16.2.10"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def daemons(tmp_path):
    sets = make_key_set(1, KeySetLayout(run_dir=str(tmp_path)), keys_from=random.Random(8))
    out = start_daemons({name: dataclasses.replace(cfg, metrics=MetricsSettings(
        listen=f"127.0.0.1:{free_port()}")) for name, cfg in sets.items()})
    yield out
    close_daemons(out)


def scrape(daemon, path="/metrics"):
    """GET the endpoint while the daemon's loop serves it."""
    host, port = daemon.metrics.address
    result = {}

    def get():
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
                result["status"], result["body"] = r.status, r.read().decode()
        except Exception as exc:             # the 404 case
            result["error"] = exc
    thread = threading.Thread(target=get)
    thread.start()
    while thread.is_alive():
        daemon.loop.run_once(max_wait=0.05)
    return result


def families(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, metric, **labels):
    return sum(v for lab, v in samples.get(metric, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_scraped_metrics_parse_and_count_what_happened(daemons):
    daemons["mn"].handle_command("handover", [COA, "vb0"])
    pump(daemons)
    daemons["mn"].handle_command("handover", ["172.16.3.10", "va0"])
    pump(daemons)
    # one bogus ESP packet at the GW: an unknown SPI
    bogus = (bytes.fromhex("4500002c0000400040320000c0000209ac100001")
             + (0xdead).to_bytes(4, "big") + bytes(20))
    daemons["gw"].sender.inject(bogus)
    pump(daemons)
    mn = families(scrape(daemons["mn"])["body"])
    assert value(mn, "mipsec_handovers_total", role="mn") == 2
    assert value(mn, "mipsec_handover_duration_seconds_count", role="mn") == 2
    assert value(mn, "mipsec_handover_duration_seconds_bucket", le="+Inf") == 2
    assert value(mn, "mipsec_registrations_total") == 2
    assert value(mn, "mipsec_io_packets_total", path="to_net") >= 2
    assert value(mn, "mipsec_sa_packets_total", direction="outbound") >= 2
    gw = families(scrape(daemons["gw"])["body"])
    assert value(gw, "mipsec_siu_applied_total", role="gw", name="gw") == 2
    assert value(gw, "mipsec_drops_total", reason="unknown-spi") == 1
    assert value(gw, "mipsec_mobiles") == 1
    assert value(gw, "mipsec_sa_octets_total", spi="0x10000000", direction="inbound") > 0
    ha = families(scrape(daemons["ha"])["body"])
    assert value(ha, "mipsec_registrations_total", role="ha") == 2
    assert value(ha, "mipsec_bindings") == 1
    assert value(ha, "mipsec_ike_sas") == 0


def test_only_get_metrics_is_served(daemons):
    result = scrape(daemons["gw"], "/other")
    assert "404" in str(result.get("error"))


def test_metrics_off_by_default_and_listen_checked(tmp_path):
    import tomllib
    cfg = make_key_set(1, KeySetLayout(run_dir=str(tmp_path)), keys_from=random.Random(1))["gw"]
    assert cfg.metrics.listen == ""
    data = tomllib.loads(dump_config(cfg))
    assert "metrics" not in data
    data["metrics"] = {"listen": "127.0.0.1:9474"}
    assert config_from_dict(data, "gw.toml").metrics.listen == "127.0.0.1:9474"
    data["metrics"] = {"listen": "localhost"}
    with pytest.raises(ConfigError, match=r"gw.toml: \[metrics\] listen: not an IPv4 addr:port"):
        config_from_dict(data, "gw.toml")


def test_status_instance_and_watch(daemons, monkeypatch, capsys):
    import os

    import mipsec.config as mconfig
    gw = daemons["gw"]
    monkeypatch.setattr(mconfig, "DEFAULT_RUN_DIR", os.path.dirname(gw.cfg.control_socket))
    result = {}
    calls = []

    def fake_sleep(seconds):
        calls.append(seconds)
        if len(calls) == 2:
            raise KeyboardInterrupt

    import time
    monkeypatch.setattr(time, "sleep", fake_sleep)
    done = threading.Event()

    def serve():
        while not done.is_set():
            gw.loop.run_once(max_wait=0.05)
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        result["code"] = cli.main(["status", "--instance", "gw", "--watch", "0.5"])
    finally:
        done.set()
        thread.join()
    assert result["code"] == 0 and calls == [0.5, 0.5]
    out = capsys.readouterr().out
    assert out.count("\033[H\033[2J") == 2 and out.count("gw gw  pid") == 2


def test_status_stays_cheap_with_a_long_timeline(daemons):
    """status carries only the latest STATUS_TIMELINE_EVENTS events; `timeline` has them all."""
    from mipsec.io.daemon import STATUS_TIMELINE_EVENTS
    from mipsec.node.actions import TimelineEvent
    gw = daemons["gw"]
    gw.role.timeline.extend(TimelineEvent(float(i), "gw", "rrq-forwarded", {"i": i})
                            for i in range(STATUS_TIMELINE_EVENTS + 500))
    events = gw.status()["timeline"]
    assert len(events) == STATUS_TIMELINE_EVENTS
    assert events[-1]["detail"] == {"i": STATUS_TIMELINE_EVENTS + 499}
    assert len(gw.handle_command("timeline", [])["timeline"]) == STATUS_TIMELINE_EVENTS + 500
