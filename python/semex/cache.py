"""The persistent answer cache: every answer semex has paid for, kept on disk, so that a
re-run (after a crash, a SIGKILL or just next morning) sends only what is missing.

It sits between the Python layer and the engine. For each window of requests a call is
about to submit, the caller computes one key per request (:func:`request_key`: a hash of
the endpoint URL and the canonical request body -- model, messages, temperature,
max_tokens, response_format... -- never the API key or other headers), looks the window up
in one query (:meth:`Cache.get_many`; a chat call's hit path uses ``Cache._answers``, which
hands back the window's texts with no Python object per hit, and keys plain-string prompts
in C without building their bodies), submits only the misses and hands the answers to
:meth:`Cache.put_many` as the engine returns them. Errors are never stored.

Storage: one SQLite database (stdlib ``sqlite3``) in WAL mode, safe for several threads and
processes at once. Writes go through one writer thread per :class:`Cache` that commits
whatever arrived since its last commit (at most every ``_COMMIT_S`` seconds), so a SIGKILL
loses at most the last fraction of a second of answers and never corrupts the file (SQLite
commits are atomic). Size: when the database grows past ``max_bytes`` the least recently
used entries are deleted until it is under 90% of it. "Used" has a resolution of
``_TOUCH_S`` (an hour): a hit refreshes an entry's last-use time only when it is older than
that, so a fully cached re-run reads and does not write.

Faults never stop a job: a database that is busy is waited for (``busy_timeout``) and the
rows are kept for the next commit; a disk that is full (or any write error) turns writing
off for this cache with one warning; a database found corrupt is moved aside
(``<path>.corrupt-<time>``) and rebuilt with a warning. A path that cannot be used at all
(not writable, a directory, a file that is not a semex cache) is a clear
:class:`~semex.errors.ConfigurationError` when the cache is opened, before any request.

The interface is generic, for any request/answer pair (chat completions today; embeddings
can store their vectors as bytes in ``value``):

- ``key = request_key(url, body_bytes)``: 16 bytes.
- ``cache.get_many(keys) -> [Entry or None, ...]`` in the order of ``keys``; one query per
  up to ``SQLITE_LIMIT_VARIABLE_NUMBER`` keys.
- ``cache.put_many([(key, value, finish_reason, prompt_tokens, completion_tokens,
  total_tokens), ...])``: queued for the writer thread; returns at once. ``value`` is a
  ``str`` or ``bytes`` and comes back as the same type.
- ``cache.flush(timeout)`` waits until everything queued is committed; ``info()``,
  ``clear()``, ``close()``.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import deque
from typing import (Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

from . import _engine
from .errors import ConfigurationError

logger = logging.getLogger("semex")

__all__ = ["Cache", "Entry", "default_cache_path", "request_key"]

_APPLICATION_ID = 0x73656D78  # "semx" in the SQLite header: this file is a semex cache
_SCHEMA_VERSION = 1
_FILE_NAME = "cache.sqlite3"
DEFAULT_MAX_BYTES = 2 * 1024 ** 3
_COMMIT_S = 0.05       # the writer commits at most this often (more rows per transaction)
_IDLE_S = 5.0         # a writer thread with nothing to do for this long ends
_TOUCH_S = 3600.0      # last-use resolution: a hit rewrites used_at only when older
_BUSY_MS = 10_000      # how long a connection waits for another writer's lock
_ROW_OVERHEAD = 64     # bytes per entry besides its value (key, numbers, b-tree cells)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    value NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    written_at REAL NOT NULL,
    used_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_use ON entries (used_at);
"""
# The provider batches of mode="batch" calls (semex.batch_api), with the keys of their
# requests: another process (a re-run, `semex batch ...`) finds and resumes them. An id is
# "file:<input file id>" between the upload and the batch's creation.
_BATCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    api_base TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    status TEXT NOT NULL,
    requests INTEGER NOT NULL,
    collected INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_requests (
    key BLOB NOT NULL,
    batch TEXT NOT NULL,
    PRIMARY KEY (batch, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_requests_by_key ON batch_requests (key);
"""
# A rowid table, not WITHOUT ROWID: answers are often 1-4 KB, and a WITHOUT ROWID row over
# ~1 KB spills into an overflow page of its own (measured: 4.7 KB per 1 KB answer, against
# ~1.1 KB here).

# SQLite's primary result codes (sqlite3.h) that decide what a failure means
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26


class Entry(NamedTuple):
    """One cached answer, as get_many returns it."""

    value: Union[str, bytes]
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    written_at: float


Row = Tuple[bytes, Union[str, bytes], Optional[str], int, int, int]


class Answers(NamedTuple):
    """What the cache holds for a window of keys (Cache._answers), in the keys' order."""

    values: List[Any]                    # the answer, or None for a miss
    finish_reasons: List[Optional[str]]  # None for a miss
    misses: List[int]                    # offsets of the misses, ascending
    prompt_tokens: int                   # summed over the hits
    completion_tokens: int


# The hit path's query: the keys come as one blob (16 bytes each) that a recursive CTE walks,
# so one parameter is bound and no key object is built; the LEFT JOIN gives one row per key,
# NULL for a miss. The JSON form aggregates a window into one row: its texts, finish reasons
# and token sums, so Python builds no tuple per hit. Measured per key, 300,000 entries, keys
# in random order, windows of 2,000: `key IN (?, ...)` of 8 columns into a dict 5.0 us, the
# rows below 3.3, the JSON form 2.8 (1.8 with keys in the order they were written, as a
# re-run's are), the index search alone 1.3. The first column lists the offsets in the order
# the aggregates took them: the reader checks it is 0,1,...,n-1 (SQLite does not promise an
# aggregate's order) and else reads the rows.
_ANSWERS_STEP = 8192  # keys per query (a window of answers is one string in the JSON form)
_WALK_KEYS = ("WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k "
              "WHERE i + 1 < ?2) ")
_JOIN_KEYS = " FROM k LEFT JOIN entries e ON e.key = substr(?1, 16 * i + 1, 16)"
_ANSWERS_JSON = (
    _WALK_KEYS + "SELECT group_concat(i), json_group_array(e.value), "
    "json_group_array(e.finish_reason), coalesce(sum(e.prompt_tokens), 0), "
    "coalesce(sum(e.completion_tokens), 0), group_concat(CASE WHEN e.id IS NULL THEN i END), "
    "group_concat(CASE WHEN e.used_at < ?3 THEN i END)" + _JOIN_KEYS)
_ANSWERS_ROWS = (_WALK_KEYS + "SELECT i, e.value, e.finish_reason, e.prompt_tokens, "
                 "e.completion_tokens, e.used_at" + _JOIN_KEYS)


@functools.lru_cache(maxsize=8)
def _positions(n: int) -> str:
    """group_concat(i) of offsets 0..n-1 in order (windows come in few sizes)."""
    return ",".join(map(str, range(n)))


def _offsets(text: Optional[str]) -> List[int]:
    """A group_concat of offsets (None: none), ascending."""
    return sorted(map(int, text.split(","))) if text else []


def request_key(url: str, body: Union[bytes, memoryview], kind: bytes = b"chat") -> bytes:
    """The cache key of a request: blake2b-128 of its kind, URL and canonical body."""
    h = hashlib.blake2b(kind + b"\0" + url.encode("utf-8") + b"\0", digest_size=16)
    h.update(body)
    return h.digest()


def default_cache_path() -> str:
    """``$SEMEX_CACHE_DIR/cache.sqlite3``, else ``$XDG_CACHE_HOME/semex/cache.sqlite3``,
    else ``~/.cache/semex/cache.sqlite3``."""
    folder = os.environ.get("SEMEX_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "semex")
    return os.path.abspath(os.path.join(folder, _FILE_NAME))


def _code(exc: BaseException) -> int:
    """SQLite's primary result code of a sqlite3 error (from the message before 3.11)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()
    for needle, value in (("locked", _SQLITE_BUSY), ("malformed", _SQLITE_CORRUPT),
                          ("not a database", _SQLITE_NOTADB)):
        if needle in text:
            return value
    return -1


# Every Cache alive in this process: flushed and closed at exit.
_live: "weakref.WeakSet[Cache]" = weakref.WeakSet()
_shared: Dict[str, "Cache"] = {}
_shared_lock = threading.Lock()


class Cache:
    """A persistent cache of answers at ``path`` (default: :func:`default_cache_path`).

    max_bytes: the database is kept under this size by deleting the least recently used
    entries (default 2 GiB). Opening checks the path at once: a path that cannot hold a
    cache raises :class:`~semex.errors.ConfigurationError`.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]", None] = None, *,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        if path is None:
            path = default_cache_path()
        try:
            path = os.fspath(path)
        except TypeError:
            raise ConfigurationError(
                f"cache path must be a str or os.PathLike, got {type(path).__name__}"
            ) from None
        if not isinstance(path, str) or not path:
            raise ConfigurationError(f"cache path must be a non-empty str, got {path!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or \
                max_bytes < 64 * 1024:
            raise ConfigurationError(
                f"max_bytes must be an integer >= 65536, got {max_bytes!r}")
        self.path = os.path.abspath(os.path.expanduser(path))
        self.max_bytes = max_bytes
        self._lock = threading.Lock()       # guards _reader and the fields below
        self._reader: Optional[sqlite3.Connection] = None
        self._writer: Optional[_Writer] = None
        self._pid = os.getpid()
        self._writes_off = False            # a write failed for good: no more writing
        self._reads_off = False
        self._warned: set = set()
        self._closed = False
        self._rebuilt = False
        self._tuned = False                 # the reader's lookup pragmas are set
        self._json = True                   # SQLite has json_group_array (_answers)
        self._batch_lock = threading.RLock()  # guards _batch_conn (mode="batch" records)
        self._batch_conn: Optional[sqlite3.Connection] = None
        self._reader = self._connect()
        _live.add(self)

    # -- presentation ---------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"Cache({self.path!r}, max_bytes={self.max_bytes})"

    def __getstate__(self):
        return {"path": self.path, "max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["path"], max_bytes=state["max_bytes"])

    # -- opening --------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        """A connection with the schema in place. A path that cannot be used raises
        ConfigurationError; a corrupt semex cache is moved aside and started afresh."""
        folder = os.path.dirname(self.path)
        try:
            # a new folder is private: answers can hold what the documents said
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cache path {self.path}: cannot create the folder {folder} "
                f"({exc.strerror or exc})") from None
        if os.path.isdir(self.path):
            raise ConfigurationError(f"cache path {self.path} is a directory; name a file")
        if os.path.exists(self.path) and not os.access(self.path, os.R_OK | os.W_OK):
            raise ConfigurationError(f"cache path {self.path} is not readable and writable")
        if not os.access(folder, os.W_OK):
            raise ConfigurationError(f"cache path {self.path}: the folder {folder} is not "
                                     "writable")
        try:
            return self._open_schema()
        except sqlite3.DatabaseError as exc:
            code = _code(exc)
            if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) and self._looks_like_ours():
                self._move_aside(f"it is corrupt ({exc})")
                try:
                    return self._open_schema()
                except sqlite3.DatabaseError as again:
                    exc = again
            if code == _SQLITE_NOTADB:
                raise ConfigurationError(
                    f"cache path {self.path} holds a file that is not an SQLite database "
                    "(not a semex cache); remove it or choose another path") from None
            raise ConfigurationError(f"cache path {self.path} cannot be opened: {exc}"
                                     ) from None

    def _looks_like_ours(self) -> bool:
        """A damaged file we may replace: the default cache, or one with our header."""
        if self.path == default_cache_path():
            return True
        try:
            with open(self.path, "rb") as f:
                head = f.read(72)
        except OSError:
            return False
        return head[:16] == b"SQLite format 3\0" and \
            int.from_bytes(head[68:72], "big") == _APPLICATION_ID

    def _move_aside(self, why: str) -> None:
        aside = f"{self.path}.corrupt-{int(time.time())}"
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(self.path + suffix, aside + suffix)
            except FileNotFoundError:
                pass
        logger.warning("semex cache %s: %s; moved it to %s and started a new one",
                       self.path, why, aside)

    def _open_schema(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000.0, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
            # Switching to WAL takes a lock the busy timeout does not wait for: retry it
            # while another process is creating the same file.
            deadline = time.monotonic() + _BUSY_MS / 1000.0
            while True:
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across a crash of
            # this process (a commit is in the OS once written); only a power cut can lose
            # the last commits, never the file
            conn.execute("PRAGMA journal_size_limit = 67108864")
            # Look and create in one write transaction: two processes opening a new file at
            # once must not see each other's half-made schema.
            conn.execute("BEGIN IMMEDIATE")
            try:
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = [r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")]
                if app_id != _APPLICATION_ID and tables:
                    raise ConfigurationError(
                        f"cache path {self.path} is an SQLite database that semex did not "
                        f"create (tables: {', '.join(tables[:5])}); choose another path")
                if app_id == _APPLICATION_ID and version != _SCHEMA_VERSION:
                    logger.warning("semex cache %s has format %d, this semex uses %d: "
                                   "starting it afresh", self.path, version, _SCHEMA_VERSION)
                    conn.execute("DROP TABLE IF EXISTS entries")
                if app_id != _APPLICATION_ID or version != _SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                else:
                    conn.execute("SELECT 1 FROM entries LIMIT 1").fetchall()
                if not {"batches", "batch_requests"} <= set(tables):  # added in 0.1
                    for statement in _BATCH_SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_process(self) -> None:
        """After fork(): the parent's connections and writer thread are not ours to use."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._reader = None   # never close a connection inherited over fork
                    self._batch_conn = None
                    self._writer = None
                    self._pid = os.getpid()

    def _reader_conn(self) -> Optional[sqlite3.Connection]:
        if self._reader is None and not self._reads_off and not self._closed:
            try:
                self._reader = self._connect()
            except (ConfigurationError, sqlite3.Error) as exc:
                self._reads_off = True
                self._warn("open", "semex cache %s cannot be opened (%s); continuing "
                           "without it", self.path, exc)
        return self._reader

    def _warn(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(message, *args)

    # -- reading --------------------------------------------------------------------------
    def get_many(self, keys: Sequence[bytes]) -> List[Optional[Entry]]:
        """The entries of `keys` (None for a miss), in order. Never raises for a database
        fault: the cache is then off for reading (one warning) and everything misses."""
        get = self._lookup(keys).get
        out: List[Optional[Entry]] = []
        for key in keys:
            row = get(key)
            out.append(None if row is None else
                       Entry(row[1], row[2], row[3], row[4], row[5], row[6]))
        return out

    def _lookup(self, keys: Sequence[bytes]) -> Dict[bytes, tuple]:
        """{key: (key, value, finish_reason, prompt_tokens, completion_tokens, total_tokens,
        written_at, used_at)} of the keys found; queues a touch of the stale ones."""
        self._check_process()
        found: Dict[bytes, tuple] = {}
        if keys and not self._reads_off:
            with self._lock:
                try:
                    self._select(keys, found)
                except sqlite3.Error as exc:
                    self._read_failed(exc)
                    found = {}
        if found:
            horizon = time.time() - _TOUCH_S
            stale = [key for key, row in found.items() if row[7] < horizon]
            if stale:
                self._writer_for().touch(stale)
        return found

    def _select(self, keys: Sequence[bytes], found: Dict[bytes, tuple]) -> None:
        conn = self._reader_conn()
        if conn is None:
            return
        self._tune(conn)
        step = _variable_limit(conn)
        for first in range(0, len(keys), step):
            chunk = keys[first:first + step]
            for row in conn.execute(
                    "SELECT key, value, finish_reason, prompt_tokens, completion_tokens, "
                    "total_tokens, written_at, used_at FROM entries WHERE key IN ("
                    + ",".join("?" * len(chunk)) + ")", chunk):
                found[row[0]] = row

    def _answers(self, keys: bytes) -> Optional[Answers]:
        """The text answers of the 16-byte keys concatenated in `keys`, in order, for a
        call's hit path: a query per _ANSWERS_STEP keys, no Python object per hit but its
        text (see _ANSWERS_JSON). None when the cache cannot be read (everything misses);
        queues a touch of the stale entries found."""
        n = len(keys) // 16
        self._check_process()
        if not n or self._reads_off:
            return None
        horizon = time.time() - _TOUCH_S
        parts = []
        with self._lock:
            try:
                for first in range(0, n, _ANSWERS_STEP):
                    part = self._select_answers(
                        keys[16 * first:16 * (first + _ANSWERS_STEP)], horizon)
                    if part is None:
                        return None
                    parts.append((first, part))
            except sqlite3.Error as exc:
                self._read_failed(exc)
                return None
        if len(parts) == 1:
            answers, stale = parts[0][1]
        else:
            answers = Answers([], [], [], 0, 0)
            stale = []
            for first, (part, part_stale) in parts:
                answers.values.extend(part.values)
                answers.finish_reasons.extend(part.finish_reasons)
                answers.misses.extend(first + o for o in part.misses)
                stale.extend(first + o for o in part_stale)
                answers = answers._replace(
                    prompt_tokens=answers.prompt_tokens + part.prompt_tokens,
                    completion_tokens=answers.completion_tokens + part.completion_tokens)
        if stale:
            self._writer_for().touch([keys[16 * o:16 * o + 16] for o in stale])
        return answers

    def _select_answers(self, keys: bytes, horizon: float
                        ) -> Optional[Tuple[Answers, List[int]]]:
        """[_lock held] (answers, offsets of the stale entries) of one query's keys."""
        n = len(keys) // 16
        conn = self._reader_conn()
        if conn is None:
            return None
        self._tune(conn)
        if self._json:
            try:
                row = conn.execute(_ANSWERS_JSON, (keys, n, horizon)).fetchone()
            except sqlite3.OperationalError as exc:
                if "no such function" in str(exc):
                    self._json = False  # an SQLite built without JSON: rows, from now on
                row = None  # else e.g. a BLOB value (not JSON text): this window by rows
            if row is not None and row[0] == _positions(n):
                values = json.loads(row[1])
                return (Answers(values, json.loads(row[2]), _offsets(row[5]), row[3],
                                row[4]), _offsets(row[6]))
        # One row per key, each with its offset (nothing above is assumed about order).
        values: List[Any] = [None] * n
        reasons: List[Optional[str]] = [None] * n
        misses: List[int] = []
        stale: List[int] = []
        prompt = completion = 0
        for i, value, reason, p, c, used_at in conn.execute(_ANSWERS_ROWS, (keys, n)):
            if value is None:
                misses.append(i)
                continue
            values[i] = value
            reasons[i] = reason
            prompt += p
            completion += c
            if used_at < horizon:
                stale.append(i)
        misses.sort()
        return Answers(values, reasons, misses, prompt, completion), sorted(stale)

    def _tune(self, conn: sqlite3.Connection) -> None:
        if not self._tuned:
            # lookups of hash keys land on random pages: a larger page cache and reads
            # through mmap (no pread per page) took 100,000 lookups from 0.36 to 0.27 s
            conn.execute("PRAGMA cache_size = -65536")
            conn.execute("PRAGMA mmap_size = 268435456")
            self._tuned = True

    def _read_failed(self, exc: sqlite3.Error) -> None:
        """[_lock held]"""
        if _code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB) and not self._rebuilt:
            self._rebuilt = True
            self._reader = None
            try:
                self._move_aside(f"it is corrupt ({exc})")
                self._reader = self._connect()
                if self._writer is not None:
                    self._writer.reconnect = True
                return
            except (ConfigurationError, sqlite3.Error, OSError) as again:
                exc = again  # type: ignore[assignment]
        self._reads_off = True
        self._warn("read", "semex cache %s cannot be read (%s); continuing without it",
                   self.path, exc)

    # -- writing --------------------------------------------------------------------------
    def put_many(self, rows: Iterable[Row]) -> None:
        """Queue (key, value, finish_reason, prompt_tokens, completion_tokens, total_tokens)
        rows for the writer thread; returns at once."""
        if self._writes_off or self._closed:
            return
        rows = list(rows)
        if rows:
            self._check_process()
            while not self._writer_for().put(rows):
                pass  # it had just ended for idleness: the next one takes them

    def _writer_for(self) -> "_Writer":
        writer = self._writer
        if writer is None or writer.ended:
            with self._lock:
                if self._writer is None or self._writer.ended:
                    self._writer = _Writer(self)
                writer = self._writer
        return writer

    def flush(self, timeout: Optional[float] = 30.0) -> bool:
        """Wait until every row queued so far is committed (or dropped because writing is
        off); False if `timeout` seconds passed first."""
        writer = self._writer
        if writer is None or self._pid != os.getpid():
            return True
        return writer.flush(timeout)

    def _write_failed(self, exc: BaseException) -> None:
        self._writes_off = True
        self._warn("write", "semex cache %s: writing failed (%s); the job continues "
                   "without caching new answers", self.path, exc)

    # -- administration -------------------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        """Path, entries, bytes used (by entries) and on disk (with the WAL), max_bytes,
        oldest and newest write (epoch seconds), and token totals of the entries."""
        self.flush()
        conn = self._connect()
        try:
            n, oldest, newest, tokens = conn.execute(
                "SELECT count(*), min(written_at), max(written_at), "
                "coalesce(sum(total_tokens), 0) FROM entries").fetchone()
            used = _used_bytes(conn)
        finally:
            conn.close()
        on_disk = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                on_disk += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return {"path": self.path, "entries": n, "bytes_used": used, "bytes_on_disk": on_disk,
                "max_bytes": self.max_bytes, "oldest": oldest, "newest": newest,
                "total_tokens": tokens}

    def clear(self) -> int:
        """Delete every entry and give the space back; returns how many there were."""
        self.flush()
        conn = self._connect()
        try:
            n = conn.execute("DELETE FROM entries").rowcount
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        return n

    # -- the batches of mode="batch" calls (semex.batch_api) -------------------------------
    def _batches(self) -> sqlite3.Connection:
        self._check_process()
        conn = self._batch_conn
        if conn is None:
            conn = self._batch_conn = self._connect()
        return conn

    def _batch_keys_query(self, sql: str, keys: Sequence[bytes], *args: Any) -> List[tuple]:
        with self._batch_lock:
            conn = self._batches()
            step = max(1, _variable_limit(conn) - len(args) - 4)
            rows: List[tuple] = []
            for at in range(0, len(keys), step):
                part = keys[at:at + step]
                marks = ",".join("?" * len(part))
                rows += conn.execute(sql.format(marks=marks), (*part, *args)).fetchall()
            return rows

    def batches_holding(self, keys: Sequence[bytes], api_base: str,
                        endpoint: str) -> List[Dict[str, Any]]:
        """The recorded batches of `api_base`/`endpoint` that hold any of `keys`, oldest
        first (failed ones are not kept)."""
        ids = {row[0] for row in self._batch_keys_query(
            "SELECT DISTINCT batch FROM batch_requests WHERE key IN ({marks})", keys)}
        if not ids:
            return []
        with self._batch_lock:
            conn = self._batches()
            found = []
            for batch_id in ids:
                row = conn.execute(
                    "SELECT id, input_file_id, status, requests, created_at, collected "
                    "FROM batches WHERE id = ? AND api_base = ? AND endpoint = ?",
                    (batch_id, api_base, endpoint)).fetchone()
                if row is not None:
                    found.append({"id": row[0], "input_file_id": row[1], "status": row[2],
                                  "requests": row[3], "created_at": row[4],
                                  "collected": bool(row[5])})
        return sorted(found, key=lambda r: r["created_at"])

    def keys_in_batches(self, keys: Sequence[bytes], batch_ids: Sequence[str]) -> set:
        if not batch_ids or not keys:
            return set()
        wanted = set(batch_ids)
        return {row[0] for row in self._batch_keys_query(
            "SELECT key, batch FROM batch_requests WHERE key IN ({marks})", keys)
            if row[1] in wanted}

    def keys_of_batch(self, batch_id: str) -> List[bytes]:
        with self._batch_lock:
            return [row[0] for row in self._batches().execute(
                "SELECT key FROM batch_requests WHERE batch = ?", (batch_id,))]

    def record_batch(self, batch_id: str, api_base: str, endpoint: str,
                     input_file_id: Optional[str], keys: Sequence[bytes],
                     status: str) -> None:
        now = time.time()
        with self._batch_lock:
            conn = self._batches()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT OR REPLACE INTO batches (id, api_base, endpoint, "
                             "input_file_id, status, requests, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (batch_id, api_base, endpoint, input_file_id, status, len(keys),
                              now, now))
                conn.executemany("INSERT OR IGNORE INTO batch_requests (key, batch) "
                                 "VALUES (?, ?)", [(k, batch_id) for k in keys])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def adopt_batch(self, old_id: str, batch_id: str, status: str) -> None:
        """The placeholder `old_id` (file:...) is now the provider's batch `batch_id`."""
        with self._batch_lock:
            conn = self._batches()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("UPDATE batches SET id = ?, status = ?, updated_at = ? "
                             "WHERE id = ?", (batch_id, status, time.time(), old_id))
                conn.execute("UPDATE batch_requests SET batch = ? WHERE batch = ?",
                             (batch_id, old_id))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def update_batch(self, batch: Dict[str, Any]) -> None:
        """Keep a batch object's status and file ids (as the provider last said)."""
        with self._batch_lock:
            self._batches().execute(
                "UPDATE batches SET status = ?, output_file_id = ?, error_file_id = ?, "
                "updated_at = ? WHERE id = ?",
                (batch.get("status"), batch.get("output_file_id"),
                 batch.get("error_file_id"), time.time(), batch.get("id")))

    def mark_collected(self, batch_id: str) -> None:
        with self._batch_lock:
            self._batches().execute("UPDATE batches SET collected = 1 WHERE id = ?",
                                    (batch_id,))

    def forget_batch(self, batch_id: str) -> None:
        with self._batch_lock:
            conn = self._batches()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM batch_requests WHERE batch = ?", (batch_id,))
                conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def list_batches(self) -> List[Dict[str, Any]]:
        """Every recorded batch, newest first (for `semex batch status`)."""
        with self._batch_lock:
            rows = self._batches().execute(
                "SELECT id, api_base, endpoint, status, requests, collected, created_at, "
                "updated_at, input_file_id, output_file_id, error_file_id FROM batches "
                "ORDER BY created_at DESC").fetchall()
        names = ("id", "api_base", "endpoint", "status", "requests", "collected",
                 "created_at", "updated_at", "input_file_id", "output_file_id",
                 "error_file_id")
        return [dict(zip(names, row)) for row in rows]

    def close(self, timeout: Optional[float] = 30.0) -> None:
        """Commit what is queued, stop the writer thread and close the connections."""
        if self._closed:
            return
        writer = self._writer
        if writer is not None and self._pid == os.getpid():
            writer.stop(timeout)
        with self._lock:
            self._closed = True
            self._writer = None
            if self._reader is not None and self._pid == os.getpid():
                self._reader.close()
            self._reader = None
        with self._batch_lock:
            if self._batch_conn is not None and self._pid == os.getpid():
                self._batch_conn.close()
            self._batch_conn = None
        with _shared_lock:
            for name, cache in list(_shared.items()):
                if cache is self:
                    del _shared[name]


def _variable_limit(conn: sqlite3.Connection) -> int:
    getlimit = getattr(conn, "getlimit", None)
    if getlimit is not None:
        return max(1, min(32766, getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)))
    return 999  # the smallest limit any SQLite build has


def _used_bytes(conn: sqlite3.Connection) -> int:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return (pages - free) * size


class _Writer:
    """The thread that commits a Cache's queued rows: one transaction per turn, holding
    everything that arrived since the last, and evicts after a commit that crossed
    max_bytes. It runs only SQLite (the sqlite3 module releases the GIL inside it)."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.cond = threading.Condition()
        self.rows: "deque[List[Row]]" = deque()
        self.touches: "deque[List[bytes]]" = deque()
        self.queued = 0       # batches put so far
        self.committed = 0    # batches committed (or dropped) so far
        self.stopping = False
        self.ended = False    # idle for _IDLE_S and gone: put() refuses, a new one starts
        self.reconnect = False
        self.thread = threading.Thread(target=self._run, name="semex-cache-writer",
                                       daemon=True)
        self.thread.start()

    def put(self, rows: List[Row]) -> bool:
        with self.cond:
            if self.ended:
                return False
            self.rows.append(rows)
            self.queued += 1
            self.cond.notify_all()
            return True

    def touch(self, keys: List[bytes]) -> None:
        with self.cond:
            if not self.ended:  # best effort: a touch may be lost, never an answer
                self.touches.append(keys)
                self.cond.notify_all()

    def flush(self, timeout: Optional[float]) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            target = self.queued
            self.cond.notify_all()
            while self.committed < target and self.thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def stop(self, timeout: Optional[float]) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout)

    def _run(self) -> None:
        cache = self.cache
        conn: Optional[sqlite3.Connection] = None
        try:
            while True:
                with self.cond:
                    while not self.rows and not self.touches and not self.stopping:
                        if not self.cond.wait(_IDLE_S) and not self.rows and \
                                not self.touches:
                            self.ended = True  # no thread (nor connection) kept idle
                            return
                    if not self.rows and not self.touches:
                        return  # stopping, nothing left
                    batches = list(self.rows)
                    touches = list(self.touches)
                    self.rows.clear()
                    self.touches.clear()
                done = len(batches)
                if cache._writes_off:
                    self._committed(done)
                    continue
                try:
                    if conn is None or self.reconnect:
                        self.reconnect = False
                        conn = cache._connect()
                    self._commit(conn, batches, touches)
                except sqlite3.Error as exc:
                    if _code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED) and not self.stopping:
                        with self.cond:  # another writer held the lock for _BUSY_MS: retry
                            self.rows.extendleft(reversed(batches))
                        time.sleep(_COMMIT_S)
                        continue
                    cache._write_failed(exc)
                except (ConfigurationError, OSError) as exc:
                    cache._write_failed(exc)
                self._committed(done)
                if not self.stopping:
                    time.sleep(_COMMIT_S)  # let the next transaction gather more rows
        finally:
            if conn is not None:
                conn.close()
            with self.cond:
                self.ended = True
                self.committed = self.queued
                self.cond.notify_all()

    def _committed(self, n: int) -> None:
        with self.cond:
            self.committed += n
            self.cond.notify_all()

    def _commit(self, conn: sqlite3.Connection, batches: List[List[Row]],
                touches: List[List[bytes]]) -> None:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for rows in batches:
                conn.executemany(
                    "INSERT OR REPLACE INTO entries (key, value, finish_reason, "
                    "prompt_tokens, completion_tokens, total_tokens, written_at, used_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(k, v, f, p, c, t, now, now) for k, v, f, p, c, t in rows])
            for keys in touches:
                conn.executemany("UPDATE entries SET used_at = ? WHERE key = ?",
                                 [(now, k) for k in keys])
            if _used_bytes(conn) > self.cache.max_bytes:
                self._evict(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _evict(self, conn: sqlite3.Connection) -> None:
        """Delete least recently used entries (oldest written first among equals) until the
        entries take under 90% of max_bytes."""
        limit = self.cache.max_bytes
        used = _used_bytes(conn)
        count = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        while used > limit * 0.9 and count > 0:
            per_entry = max(1.0, used / count)
            n = max(1, int((used - limit * 0.9) / per_entry) + 1)
            conn.execute("DELETE FROM entries WHERE id IN (SELECT id FROM entries "
                         "ORDER BY used_at, written_at LIMIT ?)", (n,))
            count -= n
            after = _used_bytes(conn)
            if after >= used:
                # freed cells stay inside partly used pages: the page count falls only
                # once whole pages empty; delete on by the same estimate
                used -= int(n * per_entry)
            else:
                used = after


# -- one LM call's use of a cache ----------------------------------------------------------
_STREAM_FIELDS = ("stream", "stream_options")
_FLUSH_S = 0.2  # while a call waits, answers of unfinished windows are queued this often


def chat_key_head(url: str, fields: Dict[str, Any]) -> bytes:
    """What every chat key of one call hashes first (see JobCache)."""
    canonical = json.dumps({k: v for k, v in fields.items() if k not in _STREAM_FIELDS},
                           sort_keys=True, ensure_ascii=False)
    return b"chat\0" + url.encode("utf-8") + b"\0" + canonical.encode("utf-8") + b"\0"


def chat_key_base(url: str, fields: Dict[str, Any]) -> "hashlib.blake2b":
    """The hash state every chat key of one call starts from."""
    return hashlib.blake2b(chat_key_head(url, fields), digest_size=16)


def chat_keys(base: "hashlib.blake2b", skip: int, bodies: Sequence[bytes]) -> List[bytes]:
    """The key of each body: `base` + the body after its first `skip` bytes."""
    copy, view = base.copy, memoryview
    keys = []
    for body in bodies:
        h = copy()
        h.update(view(body)[skip:])
        keys.append(h.digest())
    return keys


class JobCache:
    """The cache seam of one chat call (lm._Job): keys a window's rows, answers its hits,
    remembers which rows the engine got, and queues answers for writing as they arrive.

    The key of a body is ``request_key(url, canonical_fields + b"\\0" + messages_part)``:
    `canonical_fields` is the JSON of every request field but the messages, keys sorted,
    without ``stream``/``stream_options`` (a streamed answer is the same answer); the
    messages part is the body after its first `skip` bytes (the shared prefix). A plain
    prompt's body is `user_open` + its JSON string + `user_close`: the engine's
    prompt_keys hashes those parts (csrc/jsonstr.h) for a window of plain prompts at once,
    and only the bodies of the misses are built."""

    def __init__(self, cache: Cache, url: str, fields: Dict[str, Any], skip: int,
                 user_open: Optional[str] = None, user_close: str = ""):
        self.cache = cache
        head = chat_key_head(url, fields)
        self.base = hashlib.blake2b(head, digest_size=16)
        self.skip = skip
        # a plain prompt's key: this, its JSON string, then user_close
        self.prompt_head: Optional[bytes] = None
        opening = None if user_open is None else user_open.encode("utf-8")
        if opening is not None and len(opening) >= skip:
            self.prompt_head = head + opening[skip:]
        self.prompt_close = user_close.encode("utf-8")
        # start -> [rows sent, their keys, written flags, completions seen, rows in all]
        self.windows: Dict[int, list] = {}
        self.hits = 0
        self.last_flush = time.monotonic()

    def split(self, start: int, items: Sequence[Any],
              bodies_at: Callable[[Sequence[int]], List[bytes]]
              ) -> Tuple[List[bytes], Optional[Answers]]:
        """(the bodies to send, what the cache answered or None) of the window of `items`
        at `start`; bodies_at(rows) builds the bodies of those rows."""
        n = len(items)
        bodies = None
        keys = None
        if self.prompt_head is not None:  # None if any is not a str: keyed by its body
            keys = _engine.prompt_keys(self.prompt_head, self.prompt_close, items)
        if keys is None:
            bodies = bodies_at(range(start, start + n))
            keys = b"".join(chat_keys(self.base, self.skip, bodies))
        found = self.cache._answers(keys)
        misses: Sequence[int] = range(n) if found is None else found.misses
        if bodies is not None and len(misses) == n:
            sent = bodies
        elif bodies is not None:
            sent = [bodies[o] for o in misses]
        else:
            sent = bodies_at([start + o for o in misses])
        self.hits += n - len(misses)
        self.windows[start] = [[start + o for o in misses],
                               [keys[16 * o:16 * o + 16] for o in misses],
                               bytearray(len(misses)), 0, n]
        return sent, (found if found is not None and len(misses) < n else None)

    def rows(self, start: int) -> List[int]:
        """The rows of the window at `start` that were sent, in the batch's order."""
        return self.windows[start][0]

    def size(self, start: int) -> int:
        """How many rows the window at `start` has (sent and answered by the cache)."""
        return self.windows[start][4]

    def store(self, start: int, answers: List[Tuple[int, tuple]]) -> None:
        """Queue [(offset in the batch, (content, finish_reason, prompt, completion, total
        tokens))] of a collected window and forget the window."""
        _, keys, written, _, _ = self.windows.pop(start)
        rows = [(keys[o], a[0], a[1], a[2], a[3], a[4]) for o, a in answers if not written[o]]
        self.cache.put_many(rows)

    def flush_pending(self, pending: Iterable[Tuple[int, Any]], ok_state: int,
                      force: bool = False) -> None:
        """Queue the answers that finished in windows still in flight (at most every
        _FLUSH_S unless `force`), so a killed process loses only the last fraction of a
        second, and an interrupted call (Ctrl-C, an exception) nothing it received."""
        now = time.monotonic()
        if now - self.last_flush < _FLUSH_S and not force:
            return
        self.last_flush = now
        for start, batch in pending:
            window = self.windows.get(start)
            if window is None:
                continue
            completed = batch.completed
            if completed <= window[3]:
                continue
            window[3] = completed
            keys, written = window[1], window[2]
            rows = []
            for offset, slot in enumerate(batch.chat_results()):
                chat = slot[6]
                if slot[0] == ok_state and chat is not None and chat[0] is not None and \
                        not written[offset]:
                    written[offset] = 1
                    rows.append((keys[offset], chat[0], chat[1], chat[2], chat[3], chat[4]))
            self.cache.put_many(rows)


# -- how LM and settings name a cache -----------------------------------------------------
def resolve(option: Any, name: str = "cache") -> Union[Cache, bool, None]:
    """A cache option as LM(cache=...) / settings.configure(cache=...) take it: None
    (follow the setting), False (off), True (the default path), a path, or a Cache."""
    if option is None or option is False:
        return option
    if isinstance(option, Cache):
        return option
    if option is True:
        path = default_cache_path()
    elif isinstance(option, (str, os.PathLike)):
        path = os.path.abspath(os.path.expanduser(os.fspath(option)))
    else:
        raise ConfigurationError(
            f"{name} must be True, False, None, a path or a semex.Cache, got "
            f"{type(option).__name__}")
    with _shared_lock:
        cache = _shared.get(path)
        if cache is None or cache._closed:
            cache = _shared[path] = Cache(path)
        return cache


@atexit.register
def _close_all() -> None:
    for cache in list(_live):
        try:
            cache.close(timeout=10.0)
        except Exception:  # noqa: BLE001 - never fail interpreter exit
            pass


def _after_fork_in_child() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
