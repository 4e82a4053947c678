"""The embedded binding store: one SQLite file (stdlib ``sqlite3``), WAL journal, full sync.

Every write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction; with ``journal_mode=WAL`` and
``synchronous=FULL`` SQLite fsyncs the WAL before ``COMMIT`` returns, so a write that returned
survives kill -9 and a power cut (https://www.sqlite.org/wal.html, "Durability").  A binding is
one row: its home address, its care-of address in a column of its own (the compare-and-swap
reads it) and the whole ``BindingRecord`` as JSON (the value an etcd backend would store).

Files: the database at the configured path (created 0600), and SQLite's ``-wal`` and ``-shm``
files beside it (SQLite gives them the database file's permissions).  The directory is created
0700; an existing directory or file that others may write, or a file others may read, is
refused with a message naming it.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Mapping
from types import TracebackType

from mipsec.store.record import BindingRecord, StoreError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 2.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS bindings (home TEXT PRIMARY KEY, care_of TEXT NOT NULL,
                                     expires_wall REAL NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


def _check_private(path: str, what: str, forbid: int) -> None:
    st = os.stat(path)
    if st.st_mode & forbid:
        raise StoreError(f"binding store: {what} {path} has mode {stat.filemode(st.st_mode)}; "
                         f"it must be private to its owner (chmod {'700' if what == 'directory' else '600'})")
    if st.st_uid != os.geteuid():
        raise StoreError(f"binding store: {what} {path} belongs to uid {st.st_uid}, not to this "
                         f"daemon's uid {os.geteuid()}")


class SqliteStore:
    """``BindingStore`` on one SQLite database file (see the module doc)."""

    def __init__(self, path: str):
        if not path:
            raise StoreError("binding store: no database path")
        self.path = os.path.abspath(path)
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            _check_private(directory, "directory", 0o022)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
            _check_private(self.path, "file", 0o077)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                                       check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"binding store {self.path}: {exc}") from None
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"binding store {self.path}: cannot use a WAL journal ({mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StoreError(f"binding store {self.path}: schema version {version}, this "
                                 f"mipsec knows {SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"binding store {self.path}: {exc}") from None
        except StoreError:
            self._db.close()
            raise
        self.skipped = 0          # rows that did not parse at the last load (left in place)

    # --- reads ----------------------------------------------------------------------------------

    def load(self, now_wall: float) -> list[BindingRecord]:
        out = []
        self.skipped = 0
        try:
            rows = self._db.execute("SELECT home, record FROM bindings ORDER BY home").fetchall()
            with self._transaction():
                self._db.execute("DELETE FROM bindings WHERE expires_wall <= ?", (now_wall,))
        except sqlite3.Error as exc:
            raise StoreError(f"binding store {self.path}: {exc}") from None
        for home, text in rows:
            try:
                record = BindingRecord.from_json(text)
            except (ValueError, TypeError, KeyError):
                self.skipped += 1
                continue
            if record.home_address == home and not record.expired(now_wall):
                out.append(record)
        return out

    def meta(self) -> dict[str, bytes]:
        try:
            return {k: bytes(v) for k, v in self._db.execute("SELECT key, value FROM meta")}
        except sqlite3.Error as exc:
            raise StoreError(f"binding store {self.path}: {exc}") from None

    # --- writes ---------------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self.path)

    def _write(self, record: BindingRecord | None, home: str, meta: Mapping[str, bytes]) -> None:
        if record is None:
            self._db.execute("DELETE FROM bindings WHERE home = ?", (home,))
        else:
            if record.home_address != home:
                raise ValueError(f"record for {record.home_address} stored under {home}")
            self._db.execute("INSERT OR REPLACE INTO bindings VALUES (?, ?, ?, ?)",
                             (home, record.care_of_address, record.expires_wall,
                              record.to_json()))
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             [(k, bytes(v)) for k, v in meta.items()])

    def put(self, record: BindingRecord, meta: Mapping[str, bytes] = {}) -> None:
        with self._transaction():
            self._write(record, record.home_address, meta)

    def compare_and_swap(self, home_address: str, expected_care_of: str | None,
                         record: BindingRecord | None, meta: Mapping[str, bytes] = {}) -> bool:
        with self._transaction():
            row = self._db.execute("SELECT care_of FROM bindings WHERE home = ?",
                                   (home_address,)).fetchone()
            if (row[0] if row is not None else None) != expected_care_of:
                return False
            self._write(record, home_address, meta)
        return True

    def delete(self, home_address: str, meta: Mapping[str, bytes] = {}) -> None:
        with self._transaction():
            self._write(None, home_address, meta)

    def compare_and_swap_meta(self, key: str, expected: bytes | None, value: bytes) -> bool:
        with self._transaction():
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if (bytes(row[0]) if row is not None else None) != expected:
                return False
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, bytes(value)))
        return True

    def close(self) -> None:
        try:
            self._db.close()
        except sqlite3.Error:
            pass


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (durable on return), ``ROLLBACK`` on any error; SQLite
    errors become ``StoreError``."""

    def __init__(self, db: sqlite3.Connection, path: str):
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"binding store {self._path}: {exc}") from None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self._db.execute("COMMIT")
                return
            self._db.execute("ROLLBACK")
        except sqlite3.Error as err:
            raise StoreError(f"binding store {self._path}: {err}") from None
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"binding store {self._path}: {exc}") from None


__all__ = ["SqliteStore"]
