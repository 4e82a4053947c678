"""The binding record, the store interface, the in-memory backend (see ``mipsec.store``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

STORE_KINDS = ("sqlite", "memory", "etcd")


class StoreError(Exception):
    """The store could not make a write durable (disk full, I/O error, a corrupt file)."""


@dataclass(frozen=True, slots=True)
class BindingRecord:
    """One binding as stored: everything the HA needs to serve it again after a restart."""
    home_address: str
    care_of_address: str
    lifetime: int                      # granted lifetime (s)
    expires_wall: float                # absolute expiry, Unix seconds (enforced by the HA)
    previous_care_of: str | None = None   # the CoA before the latest change (SIU "old")
    identification: int = 0            # of the registration that made or refreshed it
    via_gateway: bool = True

    def expired(self, now_wall: float) -> bool:
        return self.expires_wall <= now_wall

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> BindingRecord:
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


class BindingStore(Protocol):
    """The operations of a binding store; each write is durable when it returns."""

    def load(self, now_wall: float) -> list[BindingRecord]: ...

    def meta(self) -> dict[str, bytes]: ...

    def put(self, record: BindingRecord, meta: Mapping[str, bytes] = ...) -> None: ...

    def compare_and_swap(self, home_address: str, expected_care_of: str | None,
                         record: BindingRecord | None,
                         meta: Mapping[str, bytes] = ...) -> bool: ...

    def delete(self, home_address: str, meta: Mapping[str, bytes] = ...) -> None: ...

    def compare_and_swap_meta(self, key: str, expected: bytes | None, value: bytes) -> bool: ...

    def close(self) -> None: ...


class MemoryStore:
    """The in-memory backend: the contract without a disk (tests, the simulator)."""

    def __init__(self) -> None:
        self._bindings: dict[str, BindingRecord] = {}
        self._meta: dict[str, bytes] = {}
        self.writes = 0
        self.closed = False

    def _check_open(self) -> None:
        if self.closed:
            raise StoreError("memory store: closed")

    def load(self, now_wall: float) -> list[BindingRecord]:
        self._check_open()
        for home in [h for h, r in self._bindings.items() if r.expired(now_wall)]:
            del self._bindings[home]
        return sorted(self._bindings.values(), key=lambda r: r.home_address)

    def meta(self) -> dict[str, bytes]:
        self._check_open()
        return dict(self._meta)

    def put(self, record: BindingRecord, meta: Mapping[str, bytes] = {}) -> None:
        self._check_open()
        self._bindings[record.home_address] = record
        self._meta.update(meta)
        self.writes += 1

    def compare_and_swap(self, home_address: str, expected_care_of: str | None,
                         record: BindingRecord | None, meta: Mapping[str, bytes] = {}) -> bool:
        self._check_open()
        current = self._bindings.get(home_address)
        if (current.care_of_address if current is not None else None) != expected_care_of:
            return False
        if record is None:
            self._bindings.pop(home_address, None)
        else:
            _same_home(home_address, record)
            self._bindings[home_address] = record
        self._meta.update(meta)
        self.writes += 1
        return True

    def delete(self, home_address: str, meta: Mapping[str, bytes] = {}) -> None:
        self._check_open()
        self._bindings.pop(home_address, None)
        self._meta.update(meta)
        self.writes += 1

    def compare_and_swap_meta(self, key: str, expected: bytes | None, value: bytes) -> bool:
        self._check_open()
        if self._meta.get(key) != expected:
            return False
        self._meta[key] = bytes(value)
        self.writes += 1
        return True

    def close(self) -> None:
        self.closed = True


def _same_home(home_address: str, record: BindingRecord) -> None:
    if record.home_address != home_address:
        raise ValueError(f"record for {record.home_address} stored under {home_address}")


def open_store(kind: str, path: str = "", etcd: Mapping[str, Any] | None = None) -> Any:
    """A store by configuration name: ``"sqlite"`` (``path`` is the database file),
    ``"memory"``, or ``"etcd"`` (``etcd``: the keyword arguments of
    ``mipsec.store.etcd.store_from_settings``: endpoints, prefix, TLS files)."""
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        from mipsec.store.sqlite import SqliteStore
        return SqliteStore(path)
    if kind == "etcd":
        from mipsec.store.etcd import store_from_settings
        return store_from_settings(**(etcd or {}))
    raise ValueError(f"unknown binding store {kind!r} (one of {', '.join(STORE_KINDS)})")
