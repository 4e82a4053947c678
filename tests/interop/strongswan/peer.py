"""The mipsec side of the strongSwan interoperability tests, run inside its network namespace.

    python3 peer.py '<json config>'

Reads one JSON command per line on stdin and answers one JSON line on stdout.  Meanwhile it
drives IKE the way the daemons do (tests/ike_sockets.py: their UDP 500 / 4500 receivers, the
roles' RoleIke glue and raw sender, and the child SA bookkeeping the MN and GW use,
mipsec.ike.book.ChildSaBook), installs every negotiated child SA as a pair of mipsec ESP SAs,
answers ICMP echo requests that arrive through ESP for addresses in its
``inner`` subnet (so strongSwan's side can ping through mipsec's ESP), and can ping through ESP
itself (so traffic is checked in both directions through both implementations).

Commands: initiate, wait {event, count, timeout}, ping {src, dst, count, timeout}, status,
rekey_child, rekey_ike, delete, dpd, move {address} (MOBIKE), quit.
"""

import ipaddress
import json
import os
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.environ.get("MIPSEC_ROOT", "."))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ike_sockets import IkeSockets  # noqa: E402
from mipsec.errors import Dropped  # noqa: E402
from mipsec.ike.book import PairInstalled  # noqa: E402
from mipsec.ike.config import IkeConfig  # noqa: E402
from mipsec.ipsec.sa import esp_sa_uat_record, tshark_esp_sa_fields  # noqa: E402
from mipsec.wire.ipv4 import Ipv4Header, build_ipv4, checksum, parse_ipv4  # noqa: E402


def icmp_echo(src, dst, ident, seq, reply=False, payload=b"mipsec-interop!!"):
    body = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
    return build_ipv4(Ipv4Header(src, dst, 1, identification=seq), body)


class Peer:
    def __init__(self, cfg):
        self.cfg = cfg
        ike = IkeConfig.from_dict(cfg["ike"])
        self.adapter = IkeSockets(ike, cfg["address"], on_event=self.on_event,
                                  on_esp=self.on_esp)
        self.endpoint = self.adapter.endpoint
        self.book = self.adapter.book  # the ESP SA pairs the IKE events call for
        self.counts = {}
        self.echo_replies = set()
        self.esp_in = self.esp_out = self.echo_answered = 0
        self.esp_drops = {}
        self.log = []
        self.uat = []              # Wireshark esp_sa records of every SA we ever installed

    # --- events ----------------------------------------------------------------------------
    def on_event(self, ev, changes):
        name = type(ev).__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        self.log.append({"event": name, "detail": getattr(ev, "reason", "")})
        for change in changes:
            if isinstance(change, PairInstalled):
                self.uat += [esp_sa_uat_record(tshark_esp_sa_fields(sa))
                             for sa in (change.pair.inbound, change.pair.outbound)]

    # --- ESP ---------------------------------------------------------------------------------
    def on_esp(self, outer):
        ihl = (outer[0] & 0x0F) * 4
        spi = int.from_bytes(outer[ihl + 8:ihl + 12], "big")
        sa = self.book.inbound.get(spi)
        if sa is None:
            self.esp_drops["unknown-spi"] = self.esp_drops.get("unknown-spi", 0) + 1
            return
        try:
            inner = sa.decapsulate(outer, self.adapter.now())
        except Dropped as e:
            self.esp_drops[str(e.reason)] = self.esp_drops.get(str(e.reason), 0) + 1
            return
        self.esp_in += 1
        h, body = parse_ipv4(inner)
        if h.protocol != 1 or len(body) < 8:
            return
        typ, _, _, ident, seq = struct.unpack_from("!BBHHH", body)
        if typ == 8 and ipaddress.IPv4Address(h.destination) in ipaddress.IPv4Network(self.cfg["inner"]):
            reply = icmp_echo(h.destination, h.source, ident, seq, reply=True, payload=body[8:])
            self.send_inner(reply)
            self.echo_answered += 1
        elif typ == 0:
            self.echo_replies.add((h.source, ident, seq))

    def send_inner(self, packet):
        if self.book.outbound is None:
            return False
        self.adapter.send_esp(self.book.outbound.encapsulate(packet, self.adapter.now()))
        self.esp_out += 1
        return True

    # --- commands ----------------------------------------------------------------------------
    def ike_sa(self):
        sas = [s for s in self.endpoint.ike_sas if s.is_established]
        return sas[0] if sas else None

    def wait(self, pred, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            self.adapter.poll(min(0.2, max(0.0, end - time.monotonic())))
        return pred()

    def handle(self, cmd):
        op = cmd["op"]
        a = self.adapter
        if op == "initiate":
            a.initiate((self.cfg["peer"], 500))
            return {"ok": True}
        if op == "wait":
            ok = self.wait(lambda: self.counts.get(cmd["event"], 0) >= cmd.get("count", 1),
                           cmd.get("timeout", 10))
            return {"ok": ok, "counts": self.counts}
        if op == "serve":                     # answer ESP / IKE until n echo requests answered
            ok = self.wait(lambda: self.echo_answered >= cmd.get("answered", 0),
                           cmd.get("timeout", 5))
            return {"ok": ok, "echo_answered": self.echo_answered}
        if op == "ping":
            got = 0
            ident = os.getpid() & 0xFFFF
            for seq in range(cmd.get("count", 3)):
                key = (cmd["dst"], ident, 1000 + seq + self.esp_out)
                self.send_inner(icmp_echo(cmd["src"], cmd["dst"], ident, key[2]))
                if self.wait(lambda key=key: key in self.echo_replies, cmd.get("timeout", 3)):
                    got += 1
            return {"ok": got == cmd.get("count", 3), "received": got}
        if op == "status":
            return {"ok": True, "counts": self.counts, "esp_in": self.esp_in,
                    "esp_out": self.esp_out, "echo_answered": self.echo_answered,
                    "esp_drops": self.esp_drops, "ike": self.endpoint.status(), "uat": self.uat,
                    "children": [c.describe() for c, _, _ in self.book.pairs.values()],
                    "keys": [{"spi_in": f"{c.spi_in:08x}", "spi_out": f"{c.spi_out:08x}",
                              "encr_in": c.keys.encr_in.hex(), "encr_out": c.keys.encr_out.hex(),
                              "integ_in": c.keys.integ_in.hex(), "integ_out": c.keys.integ_out.hex()}
                             for c, _, _ in self.book.pairs.values()]}
        sa = self.ike_sa()
        now = a.now()
        if op == "rekey_child":
            a.run(sa.rekey_child(next(iter(sa.children)), now))
            return {"ok": True}
        if op == "rekey_ike":
            a.run(sa.rekey(now))
            return {"ok": True}
        if op == "delete":
            a.run(sa.delete(now))
            return {"ok": True}
        if op == "dpd":
            a.run(sa.check_liveness(now))
            return {"ok": True}
        if op == "move":
            subprocess.run(["ip", "addr", "add", cmd["address"] + "/24", "dev", cmd["dev"]], check=True)
            a.rebind(cmd["address"])
            self.cfg["address"] = cmd["address"]
            a.run(sa.update_addresses((cmd["address"], 4500), now))
            return {"ok": True}
        if op == "quit":
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op}"}

    def main(self):
        stdin = sys.stdin
        buf = b""
        fd = stdin.fileno()
        os.set_blocking(fd, False)
        print(json.dumps({"ok": True, "ready": True}), flush=True)
        while True:
            ready = self.adapter.poll(0.5, [fd])
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = json.loads(line)
                try:
                    resp = self.handle(cmd)
                except Exception as e:  # report, keep serving: the test decides
                    resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                print(json.dumps(resp), flush=True)
                if cmd["op"] == "quit":
                    return


if __name__ == "__main__":
    Peer(json.loads(sys.argv[1])).main()
