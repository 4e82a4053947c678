#!/usr/bin/env python3
"""ESP tunnel-mode throughput of mipsec's SecurityAssociation against the "crypto floor".

For every transform and inner packet size (64, 512, 1400 bytes) this measures, in one run:

* ours: ``sa.encapsulate`` (sequence number, padding, outer IPv4 header and checksum, counters)
  and ``sa.decapsulate`` (outer checks, replay pre-check, ICV, decryption, padding, window update,
  inner selector check, counters); also the same through ``Spd.protect_outbound`` and
  ``Sad.process_inbound`` (policy lookup / SPI lookup in front);
* the floor: only the ``cryptography`` / ``hashlib`` calls that no ESP implementation can avoid
  for the same packet, on pre-built buffers (no header building, no concatenation), each in
  several idioms, the fastest of which is the floor:
    - AES-CBC + HMAC: one persistent CBC context (``update`` only) plus an unpredictable IV from
      ``os.urandom(16)`` or from a pre-drawn random pool, and the HMAC as precomputed hashlib
      inner/outer states, as ``hmac.digest`` one-shot, or as a copied ``cryptography`` HMAC;
      decapsulation: HMAC + ``hmac.compare_digest`` + persistent CBC decryption;
    - AES-GCM / ChaCha20-Poly1305: one reused AEAD object, ``encrypt``/``decrypt`` or
      ``encrypt_into``/``decrypt_into`` with a pre-allocated buffer;
    - NULL + HMAC: the HMAC (and compare) alone.

The ratio printed is floor time / our time, i.e. our packets/s as a fraction of the floor's.
Targets at 64 bytes: encapsulate >= 0.7; decapsulate >= 0.6 for CBC-HMAC and >= 0.5 for GCM,
one packet per call or in bursts (``sa.decapsulate_many``, the "dec32" row: bursts of 32).  The
"sliced" column (decapsulation) is the floor as a fraction of the same calls with their arguments
cut from a whole outer packet (nonce = salt + IV, ciphertext, AAD; MAC input, ICV, IV +
ciphertext): the ratio a decapsulation that did nothing else would reach.  Times are the
thread's CPU time (``--wall``: the wall clock), best of interleaved rounds.

    python3 benchmarks/bench_esp.py            # full run (about a minute)
    python3 benchmarks/bench_esp.py --quick    # short run, fewer repeats
    python3 benchmarks/bench_esp.py --json out.json   (or --json - for stdout)
    python3 benchmarks/bench_esp.py --only GCM --sizes 64
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import platform
import struct
import sys
from dataclasses import asdict, dataclass, field

try:
    import mipsec  # noqa: F401
except ImportError:  # run from a source tree without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cryptography
from _timing import CPU_CLOCK, WALL_CLOCK, interleaved, write_json
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from mipsec.ipsec.sa import Direction, SecurityAssociation
from mipsec.ipsec.sad import Sad
from mipsec.ipsec.selector import Selector
from mipsec.ipsec.spd import Action, Policy, Spd

GW_OUTSIDE, COA = "172.16.0.1", "172.16.1.10"
CN, MN_HOME = "10.1.0.10", "10.1.0.100"
SIZES = (64, 512, 1400)
SLICED = "from-packet:"   # a floor idiom with its arguments cut from the packet: not the floor
HASHES = {"AUTH_HMAC_SHA1_96": ("sha1", 20, 12), "AUTH_HMAC_SHA2_256_128": ("sha256", 32, 16),
          "AUTH_HMAC_SHA2_384_192": ("sha384", 48, 24),
          "AUTH_HMAC_SHA2_512_256": ("sha512", 64, 32)}
CRYPTO_HASH = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
               "sha512": hashes.SHA512}


@dataclass(frozen=True)
class TransformCase:
    label: str
    encryption: str
    key_bytes: int
    integrity: str | None = None


TRANSFORMS = [
    *(TransformCase(f"AES-CBC-{bits}/{short}", "ENCR_AES_CBC", bits // 8, integ)
      for bits in (128, 192, 256)
      for short, integ in (("HMAC-SHA1-96", "AUTH_HMAC_SHA1_96"),
                           ("HMAC-SHA256-128", "AUTH_HMAC_SHA2_256_128"),
                           ("HMAC-SHA384-192", "AUTH_HMAC_SHA2_384_192"),
                           ("HMAC-SHA512-256", "AUTH_HMAC_SHA2_512_256"))),
    TransformCase("AES-GCM-16-128", "ENCR_AES_GCM_16", 20),
    TransformCase("AES-GCM-16-256", "ENCR_AES_GCM_16", 36),
    TransformCase("ChaCha20-Poly1305", "ENCR_CHACHA20_POLY1305", 36),
    TransformCase("NULL/HMAC-SHA1-96", "ENCR_NULL", 0, "AUTH_HMAC_SHA1_96"),
]


def ip(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


def inner_packet(size: int) -> bytes:
    """A UDP packet CN -> MN home address whose IPv4 total length is ``size``."""
    payload = bytes(size - 28)
    udp = struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0x4000, 64, 17, 0, ip(CN),
                         ip(MN_HOME))
    return header + udp


# --- ours -------------------------------------------------------------------------------------

def make_sa(case: TransformCase, direction: Direction, keys: tuple[bytes, bytes],
            selector: Selector | None = None) -> SecurityAssociation:
    if direction is Direction.OUTBOUND:
        local, remote = GW_OUTSIDE, COA
    else:
        local, remote = COA, None   # the wildcard-source inbound SA of the handover design
    return SecurityAssociation(spi=0x1001, direction=direction, encryption=case.encryption,
                               encryption_key=keys[0], integrity=case.integrity,
                               integrity_key=keys[1], local=local, remote=remote,
                               selector=selector)


# The MN's view: inner packets come from the home network to its home address.
INBOUND_SELECTOR = Selector(MN_HOME, "10.1.0.0/24")


def encap_batch(sa: SecurityAssociation, packet: bytes):
    encapsulate = sa.encapsulate

    def batch(n: int) -> None:
        for _ in range(n):
            encapsulate(packet, 0.0)
    return batch


def spd_encap_batch(spd: Spd, packet: bytes):
    protect = spd.protect_outbound

    def batch(n: int) -> None:
        for _ in range(n):
            protect(packet, 0.0)
    return batch


TARGETS = {"AES-CBC-128/HMAC-SHA1-96": {"encap": 0.7, "decap": 0.6},
           "AES-CBC-128/HMAC-SHA256-128": {"encap": 0.7, "decap": 0.6},
           "AES-GCM-16-128": {"encap": 0.7, "decap": 0.5}}
BURST = 32   # packets per ``sa.decapsulate_many`` call (a recvmmsg drain of the event loop)


class DecapBatch:
    """Decapsulate ``n`` distinct packets through a fresh inbound SA (the replay window is on);
    ``burst``: through ``sa.decapsulate_many`` in bursts of that many packets."""

    def __init__(self, case, keys, packet, through_sad: bool, burst: int = 0):
        self.case, self.keys, self.through_sad, self.burst = case, keys, through_sad, burst
        self.outbound = make_sa(case, Direction.OUTBOUND, keys)
        self.inner = packet
        self.packets: list[bytes] = []
        self.call = None

    def prepare(self, n: int) -> None:
        while len(self.packets) < n:
            self.packets.append(self.outbound.encapsulate(self.inner))
        sa = make_sa(self.case, Direction.INBOUND, self.keys, INBOUND_SELECTOR)
        if self.through_sad:
            self.call = Sad([sa]).process_inbound
        else:
            self.call = sa.decapsulate
        if self.call(self.packets[0], 0.0) != self.inner:   # check once, then start afresh
            raise SystemExit(f"{self.case.label}: decapsulation does not round-trip")
        sa = make_sa(self.case, Direction.INBOUND, self.keys, INBOUND_SELECTOR)
        self.call = Sad([sa]).process_inbound if self.through_sad else sa.decapsulate
        if self.burst:
            if sa.decapsulate_many(self.packets[:2], 0.0) != ([self.inner] * 2, []):
                raise SystemExit(f"{self.case.label}: burst decapsulation does not round-trip")
            sa = make_sa(self.case, Direction.INBOUND, self.keys, INBOUND_SELECTOR)
            self.call = sa.decapsulate_many

    def __call__(self, n: int) -> None:
        call = self.call
        if self.burst:
            packets, burst = self.packets, self.burst
            for at in range(0, n, burst):
                call(packets[at:min(at + burst, n)], 0.0)
            return
        for packet in self.packets[:n]:
            call(packet, 0.0)


# --- the floor ----------------------------------------------------------------------------------

def mac_idioms(integrity: str, key: bytes) -> dict[str, object]:
    """name -> f(data) -> truncated HMAC, in the fastest idioms known."""
    name, _, icv = HASHES[integrity]
    inner_state, outer_state = hashlib.new(name), hashlib.new(name)
    block = inner_state.block_size
    padded = key.ljust(block, b"\x00")
    inner_state.update(bytes(b ^ 0x36 for b in padded))
    outer_state.update(bytes(b ^ 0x5C for b in padded))
    digest = hmac.digest
    keyed = crypto_hmac.HMAC(key, CRYPTO_HASH[name]())

    def precomputed(data: bytes) -> bytes:
        i = inner_state.copy()
        i.update(data)
        o = outer_state.copy()
        o.update(i.digest())
        return o.digest()[:icv]

    def one_shot(data: bytes) -> bytes:
        return digest(key, data, name)[:icv]

    def crypto_copy(data: bytes) -> bytes:
        h = keyed.copy()
        h.update(data)
        return h.finalize()[:icv]

    sample = os.urandom(100)
    assert precomputed(sample) == one_shot(sample) == crypto_copy(sample)
    return {"hashlib-state": precomputed, "hmac.digest": one_shot, "crypto-hmac-copy": crypto_copy}


def floor_batches(case: TransformCase, keys: tuple[bytes, bytes], size: int):
    """(encap floor batches, decap floor batches) for one transform and inner size."""
    enc_key, int_key = keys
    encap: dict[str, object] = {}
    decap: dict[str, object] = {}
    compare = hmac.compare_digest
    if case.encryption in ("ENCR_AES_GCM_16", "ENCR_CHACHA20_POLY1305"):
        cls = AESGCM if case.encryption == "ENCR_AES_GCM_16" else ChaCha20Poly1305
        aead = cls(enc_key[:-4])
        plaintext = bytes(size + (-(size + 2) % 4) + 2)   # RFC 4303 §2.4 padding to 4
        nonce, aad = os.urandom(12), os.urandom(8)
        sealed = aead.encrypt(nonce, plaintext, aad)
        out_buf = bytearray(len(sealed))
        in_buf = bytearray(len(plaintext))
        encrypt, encrypt_into = aead.encrypt, aead.encrypt_into
        decrypt, decrypt_into = aead.decrypt, aead.decrypt_into

        def e_plain(n):
            for _ in range(n):
                encrypt(nonce, plaintext, aad)

        def e_into(n):
            for _ in range(n):
                encrypt_into(nonce, plaintext, aad, out_buf)

        def d_plain(n):
            for _ in range(n):
                decrypt(nonce, sealed, aad)

        def d_into(n):
            for _ in range(n):
                decrypt_into(nonce, sealed, aad, in_buf)

        # the same call with its arguments cut from a whole outer packet, as any decapsulation
        # of bytes must: nonce = salt + explicit IV, the ciphertext, the AAD (not the floor)
        salt = enc_key[-4:]
        packet = bytes(20) + aad + nonce[4:] + aead.encrypt(salt + nonce[4:], plaintext, aad)

        def d_sliced(n):
            for _ in range(n):
                decrypt(salt + packet[28:36], packet[36:], packet[20:28])

        encap.update({"aead.encrypt": e_plain, "aead.encrypt_into": e_into})
        decap.update({"aead.decrypt": d_plain, "aead.decrypt_into": d_into,
                      SLICED + "aead.decrypt": d_sliced})
        return encap, decap

    macs = mac_idioms(case.integrity, int_key)
    if case.encryption == "ENCR_NULL":
        data = os.urandom(8 + size + (-(size + 2) % 4) + 2)
        for mac_name, mac in macs.items():
            tag = mac(data)

            def e_null(n, mac=mac):
                for _ in range(n):
                    mac(data)

            def d_null(n, mac=mac, tag=tag):
                for _ in range(n):
                    compare(mac(data), tag)
            encap[mac_name] = e_null
            decap[mac_name] = d_null
        return encap, decap

    # AES-CBC: one persistent context per direction (style.md item 9)
    iv_and_plaintext = os.urandom(16 + size + (-(size + 2) % 16) + 2)
    enc = Cipher(algorithms.AES(enc_key), modes.CBC(os.urandom(16))).encryptor().update
    dec = Cipher(algorithms.AES(enc_key), modes.CBC(bytes(16))).decryptor().update
    mac_input = os.urandom(8 + len(iv_and_plaintext))   # SPI, seq, IV, ciphertext
    urandom = os.urandom

    for mac_name, mac in macs.items():
        tag = mac(mac_input)

        def e_urandom(n, mac=mac):
            for _ in range(n):
                urandom(16)
                enc(iv_and_plaintext)
                mac(mac_input)

        def d_cbc(n, mac=mac, tag=tag):
            for _ in range(n):
                compare(mac(mac_input), tag)
                dec(iv_and_plaintext)

        packet = bytes(20) + mac_input + tag
        icv_at = len(packet) - len(tag)

        def d_sliced(n, mac=mac, packet=packet, icv_at=icv_at):
            for _ in range(n):
                compare(mac(packet[20:icv_at]), packet[icv_at:])
                dec(packet[28:icv_at])
        encap[f"cbc+urandom-iv+{mac_name}"] = e_urandom
        decap[f"cbc+{mac_name}"] = d_cbc
        decap[f"{SLICED}cbc+{mac_name}"] = d_sliced

    def e_pool(n, mac=macs["hashlib-state"]):
        pool, at = urandom(4096), 0
        for _ in range(n):
            if at == 4096:
                pool, at = urandom(4096), 0
            pool[at:at + 16]
            at += 16
            enc(iv_and_plaintext)
            mac(mac_input)
    encap["cbc+pooled-iv+hashlib-state"] = e_pool
    return encap, decap


# --- the run ------------------------------------------------------------------------------------

@dataclass
class Row:
    transform: str
    size: int
    direction: str
    ours_ns: float
    ours_pps: float
    ours_mbps: float
    via_table_ns: float | None   # through Spd.protect_outbound / Sad.process_inbound
    floor_ns: float
    floor_idiom: str
    ratio: float                 # floor_ns / ours_ns
    ratio_via_table: float | None
    idioms_ns: dict[str, float] = field(default_factory=dict)
    # the floor as a fraction of the same calls with their arguments cut from the packet: what
    # a decapsulation that did nothing else would reach (None: not measured for this one)
    ratio_sliced: float | None = None


def measure(case: TransformCase, size: int, repeat: int, target_ns: int,
            clock=CPU_CLOCK) -> list[Row]:
    keys = (bytes(range(1, case.key_bytes + 1)),
            bytes(range(101, 101 + HASHES[case.integrity][1])) if case.integrity else b"")
    packet = inner_packet(size)
    out_sa = make_sa(case, Direction.OUTBOUND, keys)
    spd = Spd([Policy("mn", Selector("10.1.0.0/24", MN_HOME), Action.PROTECT, sa=out_sa)])
    assert isinstance(spd.protect_outbound(packet), bytes)
    floor_encap, floor_decap = floor_batches(case, keys, size)
    batches = {"ours:encap": encap_batch(out_sa, packet),
               "ours:spd+encap": spd_encap_batch(spd, packet),
               "ours:decap": DecapBatch(case, keys, packet, through_sad=False),
               "ours:sad+decap": DecapBatch(case, keys, packet, through_sad=True),
               f"ours:decap{BURST}": DecapBatch(case, keys, packet, through_sad=False,
                                                burst=BURST)}
    batches.update({f"floor:encap:{k}": v for k, v in floor_encap.items()})
    batches.update({f"floor:decap:{k}": v for k, v in floor_decap.items()})
    best = interleaved(batches, repeat=repeat, target_ns=target_ns, clock=clock)
    rows = []
    for direction, table in (("encap", "spd+encap"), ("decap", "sad+decap")):
        idioms = {k.split(":", 2)[2]: v for k, v in best.items()
                  if k.startswith(f"floor:{direction}:")}
        floor_idiom = min((k for k in idioms if not k.startswith(SLICED)), key=idioms.get)
        floor_ns = idioms[floor_idiom]
        sliced = [v for k, v in idioms.items() if k.startswith(SLICED)]
        ours = best[f"ours:{direction}"]
        via = best[f"ours:{table}"]
        rows.append(Row(case.label, size, direction, ours, 1e9 / ours, size * 8 * 1e3 / ours,
                        via, floor_ns, floor_idiom, floor_ns / ours, floor_ns / via, idioms,
                        floor_ns / min(sliced) if sliced else None))
        if direction == "decap":
            ours = best[f"ours:decap{BURST}"]
            rows.append(Row(case.label, size, f"dec{BURST}", ours, 1e9 / ours,
                            size * 8 * 1e3 / ours, None, floor_ns, floor_idiom, floor_ns / ours,
                            None, idioms))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: fewer, shorter repeats")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON ('-': stdout)")
    parser.add_argument("--only", metavar="TEXT", help="only transforms whose label contains TEXT")
    parser.add_argument("--sizes", metavar="N,N", help="inner sizes (default 64,512,1400)")
    parser.add_argument("--wall", action="store_true",
                        help="time with the wall clock (default: the thread's CPU time, which "
                             "leaves out the time other processes had the core)")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="interleaved rounds (default 9, --quick 3); the best is kept")
    args = parser.parse_args(argv)
    repeat, target_ns = (3, 1_000_000) if args.quick else (9, 4_000_000)
    if args.repeat:
        repeat = args.repeat
    clock = WALL_CLOCK if args.wall else CPU_CLOCK
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else SIZES
    cases = [c for c in TRANSFORMS if not args.only or args.only.lower() in c.label.lower()]
    text_out = sys.stderr if args.json == "-" else sys.stdout
    print(f"# mipsec ESP benchmark: Python {platform.python_version()}, cryptography "
          f"{cryptography.__version__}, {os.cpu_count()} CPUs, best of {repeat}, interleaved, "
          f"{'wall clock' if args.wall else 'thread CPU time'}",
          file=text_out)
    print("# ratio = floor time / our time (our packets/s as a fraction of the crypto floor's)",
          file=text_out)
    header = (f"{'transform':<28}{'size':>5} {'dir':<6}{'ours kpkt/s':>12}{'Mbit/s':>9}"
              f"{'us/pkt':>8}{'floor us':>9}{'ratio':>7}{'via SPD/SAD':>12}{'sliced':>7}"
              f"  floor idiom")
    print(header, file=text_out)
    rows: list[Row] = []
    for case in cases:
        for size in sizes:
            for row in measure(case, size, repeat, target_ns, clock):
                rows.append(row)
                print(f"{row.transform:<28}{row.size:>5} {row.direction:<6}"
                      f"{row.ours_pps / 1e3:>12.1f}{row.ours_mbps:>9.1f}{row.ours_ns / 1e3:>8.2f}"
                      f"{row.floor_ns / 1e3:>9.2f}{row.ratio:>7.2f}"
                      f"{'' if row.ratio_via_table is None else f'{row.ratio_via_table:.2f}':>12}"
                      f"{'' if row.ratio_sliced is None else f'{row.ratio_sliced:.2f}':>7}"
                      f"  {row.floor_idiom}", file=text_out, flush=True)
    checked = [r for r in rows if r.size == 64 and r.transform in TARGETS]
    if checked:
        print("# targets at 64 bytes (encap >= 0.7; decap, one packet or a burst, >= 0.6 for "
              "CBC, >= 0.5 for GCM):", file=text_out)
        for r in checked:
            target = TARGETS[r.transform]["encap" if r.direction == "encap" else "decap"]
            verdict = "met" if r.ratio >= target else "MISSED"
            print(f"#   {r.transform} {r.direction}: {r.ratio:.2f} {verdict}", file=text_out)
    if args.json:
        data = {"python": platform.python_version(), "cryptography": cryptography.__version__,
                "repeat": repeat, "rows": [asdict(r) for r in rows]}
        write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
