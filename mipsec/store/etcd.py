"""The shared binding store: etcd (Raft-replicated), through its v3 JSON gateway.

Why this client
---------------
etcd serves its v3 API over gRPC and, on the same client port, as JSON over HTTP (the
grpc-gateway, ``POST /v3/kv/range`` and so on; keys and values base64).  We speak the JSON
gateway with the standard library's ``http.client`` on one keep-alive connection:

* no dependency: the gRPC clients on PyPI are ``etcd3`` 0.12 (2020, no longer imports with a
  current ``protobuf``) and its fork ``python3-etcd3`` 0.13 (works, but brings ``grpcio`` and
  ``protobuf``, large native wheels, for five calls);
* the failover is ours to get right: a short timeout on every request
  (``REQUEST_TIMEOUT_S``) and a retry over the endpoint list until ``DEADLINE_S``, so a leader
  election costs about a second (measured 0.6-1.4 s with ``--election-timeout=500``), not the
  7 s a client with a long timeout hangs;
* the price, measured here: 0.3-0.5 ms more per request than gRPC, beside a Raft commit of
  about 1 ms.  The gateway is stable API since etcd 3.4 (``/v3/`` paths).

Semantics (the ``mipsec.store`` contract)
-----------------------------------------
Keys, under a prefix per home network / HA group (``prefix``, e.g. ``/mipsec/ha-home1``)::

    <prefix>/binding/<home address>   the BindingRecord as JSON (absolute expiry inside)
    <prefix>/care-of/<home address>   its care-of address alone: what compare-and-swap compares
    <prefix>/meta/<key>               a metadata value (bytes), no lease
    <prefix>/leader                   the active HA's identity, on its election lease
                                      (several HAs on one prefix: ``mipsec.io.hagroup``)

* every write is one etcd transaction (``/v3/kv/txn``): binding, care-of and metadata change
  together or not at all; etcd answers only after the Raft log entry is committed on a majority
  and applied, so a write is durable when ``put`` returns;
* ``compare_and_swap`` compares the care-of key's value (or ``create_revision == 0``: absent)
  in the same transaction that writes; a stale expectation writes nothing;
* fencing (several HAs on one prefix): with ``fence`` set, every write transaction also
  compares ``<prefix>/leader`` with this HA's identity, so an HA that lost the election (its
  lease expired, a standby took over) can write nothing: its write fails with a
  ``StoreError`` saying so, and the reply that waited for it is not sent;
* ``compare_and_swap_meta`` compares one metadata value (absent: ``create_revision == 0``):
  the HA's SIU sequence blocks are reserved that way;
* the lifetime is the record's absolute ``expires_wall``, enforced by the HA.  A lease only
  collects garbage: etcd resets every lease to its full TTL when the leader changes, so a lease
  is no clock.  Records of one lifetime share a lease granted with TTL
  ``lifetime + LEASE_GRACE_S + LEASE_REUSE_S`` and reused for ``LEASE_REUSE_S``: each key
  outlives its expiry by at least ``LEASE_GRACE_S`` and one lease grant per minute is enough;
* a request that failed ambiguously (timeout, connection lost) may have committed; retrying a
  put or a delete is harmless, and a compare-and-swap retried after such a failure that finds
  exactly the record it meant to write counts as done (its own earlier attempt committed).

Errors: every failure is a ``StoreError`` naming the endpoint(s) and what they answered.
Like every socket user in Python, this relies on SIGPIPE being ignored (the interpreter's
default, which the daemons keep): a write to a member that died is then an error, not a signal.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mipsec.store.record import BindingRecord, StoreError

REQUEST_TIMEOUT_S = 0.3     # one request to one member; an election is ~1 s, retried over members
DEADLINE_S = 5.0            # one store operation, all retries included
RETRY_PAUSE_S = 0.05        # after every member failed once, before the next round
LEASE_GRACE_S = 60          # a key outlives its binding's expiry by at least this
LEASE_REUSE_S = 60          # one lease per lifetime value, granted again after this
RANGE_PAGE = 1000           # keys per range request at load
DEFAULT_PREFIX = "/mipsec/ha"


@dataclass(frozen=True)
class EtcdTls:
    """TLS for ``https://`` endpoints: the CA that signed the members' certificates, and this
    HA's client certificate and key (etcd ``--client-cert-auth``)."""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file or None)
        return ctx


class _Retry(Exception):
    """This member cannot answer now (down, timed out, no leader): try the next one."""


class _Ambiguous(_Retry):
    """The request may have reached the member (and committed) before it failed."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(key: bytes) -> bytes:
    """The range end that selects every key starting with ``key`` (etcd's ``WithPrefix``)."""
    end = bytearray(key)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


class EtcdStore:
    """``BindingStore`` on an etcd v3 cluster (see the module doc)."""

    def __init__(self, endpoints: Sequence[str], prefix: str = DEFAULT_PREFIX,
                 tls: EtcdTls = EtcdTls(), *, request_timeout_s: float = REQUEST_TIMEOUT_S,
                 deadline_s: float = DEADLINE_S):
        if not endpoints:
            raise StoreError("etcd store: no endpoints")
        self._endpoints = []
        for url in endpoints:
            parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise StoreError(f"etcd store: endpoint {url!r} is not http(s)://host:port")
            self._endpoints.append((parts.scheme, parts.hostname, parts.port or 2379))
        self._tls = tls
        self._ssl: ssl.SSLContext | None = None
        if any(scheme == "https" for scheme, _, _ in self._endpoints):
            try:
                self._ssl = tls.context()
            except (OSError, ssl.SSLError) as exc:
                raise StoreError(f"etcd store: TLS files: {exc}") from None
        self.prefix = prefix.rstrip("/")
        if not self.prefix.startswith("/"):
            raise StoreError(f"etcd store: prefix {prefix!r} must start with '/'")
        self.request_timeout_s = request_timeout_s
        self.deadline_s = deadline_s
        self._current = 0                      # index of the member we talk to
        self._conn: http.client.HTTPConnection | None = None
        self._leases: dict[int, tuple[str, float]] = {}   # lifetime -> (lease id, reuse until)
        self.skipped = 0                       # values that did not parse at the last load
        self.failovers = 0                     # times we moved to another member
        # several HAs on one prefix (mipsec.io.hagroup): every write also compares the leader
        # key with ``fence`` (this HA's identity) so that a deposed active writes nothing
        self.leader_key = f"{self.prefix}/leader".encode()
        self.fence: str | None = None
        self.closed = False

    # --- keys -----------------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> bytes:
        return f"{self.prefix}/{kind}/{name}".encode()

    @property
    def endpoint(self) -> str:
        scheme, host, port = self._endpoints[self._current]
        return f"{scheme}://{host}:{port}"

    # --- transport: one request, retried over the members until the deadline ------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is None:
            scheme, host, port = self._endpoints[self._current]
            if scheme == "https":
                self._conn = http.client.HTTPSConnection(host, port, context=self._ssl,
                                                         timeout=self.request_timeout_s)
            else:
                self._conn = http.client.HTTPConnection(host, port,
                                                        timeout=self.request_timeout_s)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _once(self, path: str, body: dict) -> dict:
        conn = self._connect()
        data = json.dumps(body).encode()
        sent = False
        try:
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            sent = True
            resp = conn.getresponse()
            payload = resp.read()
        except ssl.SSLError as exc:            # a certificate problem does not heal by retrying
            self._drop_connection()
            raise StoreError(f"etcd store {self.endpoint}: TLS: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            what = "timed out" if isinstance(exc, TimeoutError) else \
                (str(exc) or type(exc).__name__)
            raise (_Ambiguous if sent else _Retry)(f"{self.endpoint}: {what}") from None
        try:
            answer = json.loads(payload) if payload else {}
        except ValueError:
            answer = {"error": payload[:200].decode(errors="replace")}
        if resp.status == 200 and "error" not in answer:
            return answer
        message = answer.get("message") or answer.get("error") or f"HTTP {resp.status}"
        # gRPC Unavailable / DeadlineExceeded / Internal (no leader, leader changed, stopping)
        if resp.status >= 500 or answer.get("code") in (4, 13, 14):
            self._drop_connection()
            raise _Ambiguous(f"{self.endpoint}: {message}")
        raise StoreError(f"etcd store {self.endpoint}: {path}: {message}")

    def _call(self, path: str, body: dict, ambiguous: list[bool] | None = None) -> dict:
        """POST to the current member; on a member failure move to the next, until the
        deadline.  ``ambiguous`` (if given) gets True when an attempt may have committed."""
        if self.closed:
            raise StoreError("etcd store: closed")
        deadline = time.monotonic() + self.deadline_s
        failures: list[str] = []
        while True:
            for _ in range(len(self._endpoints)):
                try:
                    return self._once(path, body)
                except _Retry as exc:
                    if isinstance(exc, _Ambiguous) and ambiguous is not None:
                        ambiguous.append(True)
                    failures.append(str(exc))
                    self._current = (self._current + 1) % len(self._endpoints)
                    self.failovers += 1
                if time.monotonic() >= deadline:
                    recent = "; ".join(dict.fromkeys(failures[-len(self._endpoints) * 2:]))
                    raise StoreError(f"etcd store: no member answered {path} within "
                                     f"{self.deadline_s:g} s ({recent})")
            time.sleep(RETRY_PAUSE_S)

    # --- reads ----------------------------------------------------------------------------------

    def _range_prefix(self, kind: str) -> list[tuple[bytes, bytes]]:
        start = self._key(kind, "")
        end = _prefix_end(start)
        out: list[tuple[bytes, bytes]] = []
        revision = 0
        while True:
            body = {"key": _b64(start), "range_end": _b64(end), "limit": RANGE_PAGE}
            if revision:                     # later pages: the same snapshot as the first
                body["revision"] = revision
            answer = self._call("/v3/kv/range", body)
            revision = revision or int(answer.get("header", {}).get("revision", 0))
            kvs = [(_unb64(kv["key"]), _unb64(kv.get("value", ""))) for kv in answer.get("kvs", [])]
            out.extend(kvs)
            if not answer.get("more") or not kvs:
                return out
            start = kvs[-1][0] + b"\x00"

    def load(self, now_wall: float) -> list[BindingRecord]:
        self.skipped = 0
        out = []
        base = len(self._key("binding", ""))
        for key, value in self._range_prefix("binding"):
            try:
                record = BindingRecord.from_json(value)
            except (ValueError, TypeError, KeyError):
                self.skipped += 1
                continue
            if record.home_address == key[base:].decode(errors="replace") \
                    and not record.expired(now_wall):
                out.append(record)
        return sorted(out, key=lambda r: r.home_address)

    def meta(self) -> dict[str, bytes]:
        base = len(self._key("meta", ""))
        return {k[base:].decode(): v for k, v in self._range_prefix("meta")}

    # --- writes ---------------------------------------------------------------------------------

    def _lease(self, lifetime: int) -> str:
        lease, until = self._leases.get(lifetime, ("", 0.0))
        if lease and time.monotonic() < until:
            return lease
        ttl = max(int(lifetime), 0) + LEASE_GRACE_S + LEASE_REUSE_S
        answer = self._call("/v3/lease/grant", {"TTL": ttl})
        lease = str(answer["ID"])
        self._leases[lifetime] = (lease, time.monotonic() + LEASE_REUSE_S)
        return lease

    def _ops(self, home: str, record: BindingRecord | None,
             meta: Mapping[str, bytes]) -> list[dict]:
        if record is None:
            ops = [{"request_delete_range": {"key": _b64(self._key(kind, home))}}
                   for kind in ("binding", "care-of")]
        else:
            if record.home_address != home:
                raise ValueError(f"record for {record.home_address} stored under {home}")
            lease = self._lease(record.lifetime)
            ops = [{"request_put": {"key": _b64(self._key("binding", home)),
                                    "value": _b64(record.to_json()), "lease": lease}},
                   {"request_put": {"key": _b64(self._key("care-of", home)),
                                    "value": _b64(record.care_of_address), "lease": lease}}]
        ops += [{"request_put": {"key": _b64(self._key("meta", k)), "value": _b64(bytes(v))}}
                for k, v in meta.items()]
        return ops

    def _fence_compare(self) -> list[dict]:
        if self.fence is None:
            return []
        return [{"key": _b64(self.leader_key), "target": "VALUE", "result": "EQUAL",
                 "value": _b64(self.fence)}]

    def _fenced(self, answer: dict) -> bool:
        """Did a failed transaction fail on the fence (the leader key is not ours)?"""
        if self.fence is None:
            return False
        for resp in answer.get("responses", []) or []:
            for kv in resp.get("response_range", {}).get("kvs", []) or []:
                if _unb64(kv["key"]) == self.leader_key:
                    return _unb64(kv.get("value", "")) != self.fence.encode()
        return True            # no leader key at all: not ours either

    def _not_active(self) -> StoreError:
        return StoreError(f"etcd store: this home agent is not the active one any more (the "
                          f"leader key {self.leader_key.decode()} does not name "
                          f"{self.fence!r}); nothing written")

    def _txn(self, compare: list[dict], home: str, record: BindingRecord | None,
             meta: Mapping[str, bytes], ambiguous: list[bool] | None = None) -> dict:
        failure = [{"request_range": {"key": _b64(self._key("binding", home))}},
                   {"request_range": {"key": _b64(self.leader_key)}}]
        for attempt in (1, 2):
            body = {"compare": compare + self._fence_compare(),
                    "success": self._ops(home, record, meta), "failure": failure}
            try:
                answer = self._call("/v3/kv/txn", body, ambiguous)
            except StoreError as exc:
                # our cached lease is gone (revoked, or expired while unused): take a new one
                if attempt == 1 and record is not None and "lease not found" in str(exc):
                    self._leases.pop(record.lifetime, None)
                    continue
                raise
            if not answer.get("succeeded") and self._fenced(answer):
                raise self._not_active()
            return answer
        raise AssertionError("unreachable")

    def put(self, record: BindingRecord, meta: Mapping[str, bytes] = {}) -> None:
        self._txn([], record.home_address, record, meta)

    def compare_and_swap(self, home_address: str, expected_care_of: str | None,
                         record: BindingRecord | None, meta: Mapping[str, bytes] = {}) -> bool:
        key = _b64(self._key("care-of", home_address))
        if expected_care_of is None:
            compare = [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}]
        else:
            compare = [{"key": key, "target": "VALUE", "result": "EQUAL",
                        "value": _b64(expected_care_of)}]
        ambiguous: list[bool] = []
        answer = self._txn(compare, home_address, record, meta, ambiguous)
        if answer.get("succeeded"):
            return True
        if ambiguous:     # did our own earlier attempt commit before its answer was lost?
            resp = (answer.get("responses") or [{}])[0]
            kvs = resp.get("response_range", {}).get("kvs", [])
            stored = _unb64(kvs[0].get("value", "")) if kvs else None
            if stored == (record.to_json().encode() if record is not None else None):
                return True
        return False

    def delete(self, home_address: str, meta: Mapping[str, bytes] = {}) -> None:
        self._txn([], home_address, None, meta)

    def compare_and_swap_meta(self, key: str, expected: bytes | None, value: bytes) -> bool:
        name = _b64(self._key("meta", key))
        if expected is None:
            compare = [{"key": name, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}]
        else:
            compare = [{"key": name, "target": "VALUE", "result": "EQUAL",
                        "value": _b64(bytes(expected))}]
        body = {"compare": compare + self._fence_compare(),
                "success": [{"request_put": {"key": name, "value": _b64(bytes(value))}}],
                "failure": [{"request_range": {"key": name}},
                            {"request_range": {"key": _b64(self.leader_key)}}]}
        ambiguous: list[bool] = []
        answer = self._call("/v3/kv/txn", body, ambiguous)
        if answer.get("succeeded"):
            return True
        if self._fenced(answer):
            raise self._not_active()
        if ambiguous:     # our own earlier attempt may have committed before its answer was lost
            kvs = (answer.get("responses") or [{}])[0].get("response_range", {}).get("kvs", [])
            if kvs and _unb64(kvs[0].get("value", "")) == bytes(value):
                return True
        return False

    def close(self) -> None:
        self._drop_connection()
        self.closed = True


def store_from_settings(endpoints: Sequence[str], prefix: str, ca_file: str = "",
                        cert_file: str = "", key_file: str = "") -> EtcdStore:
    """The daemon's ``[daemon] store = "etcd"`` settings to a store; the TLS files must exist."""
    for what, path in (("store_ca_file", ca_file), ("store_cert_file", cert_file),
                       ("store_key_file", key_file)):
        if path and not os.path.isfile(path):
            raise StoreError(f"etcd store: {what} {path}: no such file")
    return EtcdStore(endpoints, prefix or DEFAULT_PREFIX, EtcdTls(ca_file, cert_file, key_file))


__all__ = ["EtcdStore", "EtcdTls", "store_from_settings", "REQUEST_TIMEOUT_S", "DEADLINE_S"]
