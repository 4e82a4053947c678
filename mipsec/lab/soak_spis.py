"""SPIs left behind: which of the SPIs a soak run used does each receiver still know?

A sniffer in the GW's namespace (``--sniff IFACE --out FILE``) keeps the first ESP packet of
every SPI seen on the GW's outside link (one packet per SPI: bounded).  At the end of the run
``replay_spis`` sends each of those packets again, from the router's namespace (``--replay``:
hex IPv4 packets on stdin), to its receiver - the GW, or the MN whose care-of address it went
to, at that MN's care-of address of now - and reads the receiver's ``unknown-spi`` counter:
only a current SPI, or one in its grace period after a re-key, may still be known.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from typing import Any

from mipsec.constants import IPPROTO_UDP
from mipsec.lab import stop_on_signals
from mipsec.lab import topology as topo
from mipsec.lab.lab import Lab
from mipsec.wire.esp import esp_spi_of

WRITE_INTERVAL_S = 5.0       # the sniffer's file: rewritten this often (and at each new SPI)
CONTROL_PINGS = 4            # rounds of pings until each receiver's current SPI is captured


# --- the sniffer: first ESP packet of every SPI (runs in the GW's namespace) -------------------

def sniff(iface: str, out: str, stop: list[bool]) -> None:
    # ETH_P_ALL: packets the GW sends reach only the taps of every protocol
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
    sock.bind((iface, 0x0003))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    seen: dict[int, dict[str, Any]] = {}

    def write() -> None:
        with open(out + ".tmp", "w") as f:
            json.dump({f"{k:08x}": v for k, v in seen.items()}, f)
        os.replace(out + ".tmp", out)

    last_write = time.monotonic()
    while not stop[0]:
        for _key, _ in sel.select(0.2):
            while True:
                try:
                    data, addr = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[1] != 0x0800:
                    continue                                 # not IPv4
                spi = esp_spi_of(data)
                if spi is None:
                    continue
                now = time.monotonic()
                entry = seen.get(spi)
                if entry is None:
                    seen[spi] = {"packet": data.hex(), "src": socket.inet_ntoa(data[12:16]),
                                 "dst": socket.inet_ntoa(data[16:20]), "first": now,
                                 "last": now, "count": 1}
                    last_write = 0.0      # a new SPI is written out at once (few: cheap)
                else:
                    entry["last"] = now
                    entry["count"] += 1
        if time.monotonic() - last_write > WRITE_INTERVAL_S:
            write()
            last_write = time.monotonic()
    write()


# --- the replayer: sends raw IPv4 packets read from stdin (runs in the router's namespace) ---

def _ip_checksum(header: bytes) -> int:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def redirect(packet: bytes, dst: str) -> bytes:
    """``packet`` with its outer destination set to ``dst`` (IPv4 checksum redone; an ESP-in-UDP
    checksum zeroed, RFC 3948 §2.1 allows it).  ESP does not cover the outer header."""
    ihl = (packet[0] & 0x0F) * 4
    p = bytearray(packet)
    p[16:20] = socket.inet_aton(dst)
    p[10:12] = b"\0\0"
    p[10:12] = _ip_checksum(bytes(p[:ihl])).to_bytes(2, "big")
    if p[9] == IPPROTO_UDP:
        p[ihl + 6:ihl + 8] = b"\0\0"
    return bytes(p)


def replayer() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for line in sys.stdin:
        packet = bytes.fromhex(line.strip())
        try:
            sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
            print("sent", flush=True)
        except OSError as exc:
            print(f"error {exc}", flush=True)
    return 0


def _mn_inbound(node: dict[str, Any]) -> set[int]:
    sa = (node.get("sas") or {}).get("inbound")
    return {int(sa["spi"], 16)} if sa else set()


def _allowed_spis(lab: Lab, role: str) -> tuple[set[int], set[int]]:
    """(current inbound SPIs, re-keyed ones still in their grace period) of ``role`` (the GW:
    of every MN)."""
    node = lab.status(role).get("node", {})
    if role == "gw":
        current = {int(m["sas"]["inbound"]["spi"], 16) for m in node.get("mobiles", {}).values()}
    else:
        current = _mn_inbound(node)
    return current, {int(s, 16) for s in node.get("inbound_retiring", [])}


def _unknown_spi_count(lab: Lab, role: str) -> int:
    node = lab.status(role).get("node", {})
    return int(node.get("drops", {}).get("unknown-spi", 0)) + \
        int(node.get("sad_drops", {}).get("unknown-spi", 0))


def _any_drop_count(lab: Lab, role: str) -> int:
    node = lab.status(role).get("node", {})
    return sum(node.get("drops", {}).values()) + sum(node.get("sad_drops", {}).values())


def captured(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def control_traffic(lab: Lab, spi_file: str) -> list[dict[str, Any]]:
    """Pings from the CN to each MN until a packet of every receiver's current inbound SPI
    is captured: the replay's control (a current SPI must be known) needs one, and a child SA
    re-keyed after the streams ended has carried nothing yet.  Returns each round (what was
    still missing), for the record."""
    rounds: list[dict[str, Any]] = []
    todo = list(range(1, lab.mobiles + 1))
    for _ in range(CONTROL_PINGS):
        for k in todo:
            lab.exec("cn", "ping", "-c", "3", "-i", "0.2", "-W", "1", lab.home_address(k))
        time.sleep(0.5)
        seen = {int(s, 16) for s in captured(spi_file)}
        missing = [role for role in lab.daemons if role != "ha"
                   and not (_allowed_spis(lab, role)[0] & seen)]
        rounds.append({"pinged": [lab.mn(k) for k in todo], "missing": missing})
        if not missing:
            break
        todo = list(range(1, lab.mobiles + 1)) if "gw" in missing else \
            [k for k in range(1, lab.mobiles + 1) if lab.mn(k) in missing]
    return rounds


def replay_spis(lab: Lab, spis: dict[str, dict[str, Any]],
                places: dict[str, str] | None = None,
                spi_file: str | None = None) -> dict[str, Any]:
    """Send one captured packet of every SPI again (from the router's namespace) to whoever
    received it: the GW, or the MN whose care-of address it went to, at that MN's current
    care-of address (``places``: where each MN is now); which SPIs are still known?

    With ``spi_file`` (the sniffer still running) each receiver first gets a control: fresh
    pings, then the packet of an SPI that is current at that moment is replayed and must be
    known.  Done just before the replay, receiver by receiver, so that a child SA re-keyed
    while the long replay runs (lifetimes of seconds in the tests) cannot leave a receiver
    without a current SPI to show that the replay tells known from unknown."""
    places = places if places is not None else {lab.mn(1): lab.load_state().get("place", "a")}
    current = {role: _allowed_spis(lab, role)[0] for role in lab.daemons if role != "ha"}
    proc = lab.popen("rt", lab.python, "-m", "mipsec.lab.soak_spis", "--replay",
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    replay = _Replayer(lab, proc, places)
    results: list[dict[str, Any]] = []
    try:
        if spi_file is not None:
            results += [dict(r, control=True) for r in replay.controls(spi_file)]
        # newest first: the SPIs of the last traffic are still current when they are replayed
        for spi_hex, entry in sorted(spis.items(), key=lambda kv: -kv[1]["last"]):
            results.append(replay.one(spi_hex, entry))
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    # known is right for a current SPI and for one in its grace period, for no other
    left = [r for r in results if r.get("known") and not r.get("current")
            and not r.get("in_grace")]
    return {"spis": len(spis), "results": results, "left_behind": left,
            "current": {k: [f"{s:08x}" for s in v] for k, v in current.items()}}


class _Replayer:
    """One captured packet at a time through the router's raw-socket replayer, and what the
    receiver's counters made of it."""

    def __init__(self, lab: Lab, proc: subprocess.Popen, places: dict[str, str]):
        self.lab, self.proc, self.places = lab, proc, places
        self.mn_of = {lab.care_of(p, k): lab.mn(k) for k in range(1, lab.mobiles + 1)
                      for p in lab.places}
        self.number = {lab.mn(k): k for k in range(1, lab.mobiles + 1)}

    def role_of(self, entry: dict[str, Any]) -> str | None:
        return "gw" if entry["dst"] == topo.GW_OUTSIDE else self.mn_of.get(entry["dst"])

    def one(self, spi_hex: str, entry: dict[str, Any]) -> dict[str, Any]:
        lab = self.lab
        assert self.proc.stdin is not None and self.proc.stdout is not None
        spi = int(spi_hex, 16)
        role = self.role_of(entry)
        packet = bytes.fromhex(entry["packet"])
        if role is None:
            return {"spi": spi_hex, "role": None,
                    "skipped": f"sent to {entry['dst']}, no MN's care-of address"}
        if role != "gw":
            where = self.places.get(role)
            if where not in lab.places:
                return {"spi": spi_hex, "role": role, "skipped": "MN at home"}
            packet = redirect(packet, lab.care_of(where, self.number[role]))
        cur_before, grace_before = _allowed_spis(lab, role)
        before_unknown = _unknown_spi_count(lab, role)
        before_any = _any_drop_count(lab, role)
        self.proc.stdin.write(packet.hex() + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and _any_drop_count(lab, role) == before_any:
            time.sleep(0.02)
        unknown = _unknown_spi_count(lab, role) > before_unknown
        cur_after, grace_after = _allowed_spis(lab, role)
        return {"spi": spi_hex, "role": role, "sent": answer,
                "known": not unknown, "current": spi in cur_before | cur_after,
                "in_grace": spi in grace_before | grace_after,
                "first": entry["first"], "last": entry["last"], "count": entry["count"]}

    def controls(self, spi_file: str) -> list[dict[str, Any]]:
        """For each receiver away from home: ping, then replay a packet of an SPI it holds as
        current now; again (up to ``CONTROL_PINGS`` rounds) if it re-keyed in between."""
        lab, out = self.lab, []
        away = [k for k in range(1, lab.mobiles + 1)
                if self.places.get(lab.mn(k)) in lab.places]
        receivers = [("gw", away)] + [(lab.mn(k), [k]) for k in away]
        for role, ping in receivers:
            for _ in range(CONTROL_PINGS):
                for k in ping:
                    lab.exec("cn", "ping", "-c", "2", "-i", "0.2", "-W", "1", lab.home_address(k))
                time.sleep(0.3)
                cur = _allowed_spis(lab, role)[0]
                seen = [(s, e) for s, e in captured(spi_file).items()
                        if int(s, 16) in cur and self.role_of(e) == role]
                if not seen:
                    continue
                r = self.one(*seen[0])
                out.append(r)
                if r.get("known") and (r.get("current") or r.get("in_grace")):
                    break
        return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m mipsec.lab.soak_spis",
                                description="helpers of the lab soak run (benchmarks/bench_soak.py)")
    p.add_argument("--sniff", metavar="IFACE", help="keep the first ESP packet of each SPI")
    p.add_argument("--out", help="with --sniff: JSON file")
    p.add_argument("--replay", action="store_true", help="send hex IPv4 packets from stdin")
    a = p.parse_args(argv)
    if a.sniff:
        sniff(a.sniff, a.out, stop_on_signals())
        return 0
    if a.replay:
        return replayer()
    p.error("--sniff IFACE --out FILE or --replay")
    return 2


if __name__ == "__main__":
    sys.exit(main())
