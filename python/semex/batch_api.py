"""The provider's Batch API: the same call, sent offline at half price (``mode="batch"``).

An online call sends each request through the engine and has its answer in seconds; a
batch call writes the requests as JSONL (one line per request, its ``custom_id`` the
request's cache key), uploads the file (``POST /files``, ``purpose=batch``), creates a batch
for the endpoint (``POST /batches``), polls it with backoff, downloads the output and error
files and joins the lines back to the rows by ``custom_id``. From there an answer goes
through the same reading, validation and per-row error contract as an online answer: the
caller (``lm._Job``, ``embed._Job``) cannot tell the two apart except by ``Usage.batched``
and the price.

Jobs outlive the process. Every batch is recorded in the cache database (the LM's cache,
or the default one when the LM has none) with the keys of its requests, *before* the call
starts waiting: a re-run of the same call (after Ctrl-C, a crash, a closed laptop) finds
the batches that hold its requests and polls them again instead of paying twice; one that
finished meanwhile is downloaded. ``semex batch status|fetch|cancel`` works on the same
records. With the answer cache on, the answers are stored as they are read, so a later run
needs neither the network nor the batch.

The control plane is a handful of requests per job (upload, create, a poll every few
seconds to a minute, two downloads), so it uses the standard library's HTTP client, with
the LM's TLS settings, key header and proxies (``HTTPS_PROXY``/``NO_PROXY``), rather than
the engine, whose job is thousands of small requests a second. Downloads stream to a
temporary file: an output file of several hundred MB is never held in memory whole.

The steps are one generator (:meth:`_Run.steps`) that yields what it needs done -- a
blocking request, a sleep, an online fallback -- so the synchronous driver and the asyncio
one (requests in a worker thread, sleeps on the loop) share every decision.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import errors as E

logger = logging.getLogger("semex")

__all__ = ["BatchMode", "resolve_mode"]

# OpenAI's documented per-batch limits: 50,000 requests, a 200 MB input file.
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1000 * 1000
# What each status means to the poller.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
_COMPLETION_WINDOWS = ("24h",)


class BatchMode:
    """How a ``mode="batch"`` call runs; ``mode="batch"`` is ``BatchMode()``.

    poll_interval, max_poll_interval: seconds between status checks, growing 1.5x from the
        first to the second (a real batch takes minutes to hours).
    completion_window: the provider's window ("24h", the only one OpenAI offers).
    fallback: what becomes of requests a batch did not answer (it expired or was cancelled,
        or a line came back with a transient error): "error" (those rows fail with a
        ``BatchJobError``; a re-run of the call sends them in a new batch) or "online"
        (they are sent through the online path at once).
    max_requests, max_bytes: split a job into several batches above these (the provider's
        limits; lower them to keep each batch small).
    wait: False returns as soon as the batches are created, raising ``BatchSubmitted``
        (with their ids) unless every row was already answered; re-run the call later
        (or ``semex batch fetch``) to collect.
    discount: the batch price as a fraction of the online price, for ``Usage.cost``
        (0.5: OpenAI's batch price).
    metadata: a dict of strings attached to each batch (shown by the provider's console).
    """

    def __init__(self, *, poll_interval: float = 5.0, max_poll_interval: float = 60.0,
                 completion_window: str = "24h", fallback: str = "error",
                 max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES,
                 wait: bool = True, discount: float = 0.5,
                 metadata: Optional[Dict[str, str]] = None):
        for name, value in (("poll_interval", poll_interval),
                            ("max_poll_interval", max_poll_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not value > 0:
                raise E.ConfigurationError(f"BatchMode({name}=...) must be a positive "
                                           f"number of seconds, got {value!r}")
        if max_poll_interval < poll_interval:
            raise E.ConfigurationError("BatchMode: max_poll_interval is below poll_interval")
        if completion_window not in _COMPLETION_WINDOWS:
            raise E.ConfigurationError(f"BatchMode(completion_window=...) must be one of "
                                       f"{_COMPLETION_WINDOWS}, got {completion_window!r}")
        if fallback not in ("error", "online"):
            raise E.ConfigurationError(
                f"BatchMode(fallback=...) must be 'error' or 'online', got {fallback!r}")
        for name, value in (("max_requests", max_requests), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise E.ConfigurationError(
                    f"BatchMode({name}=...) must be a positive integer, got {value!r}")
        if isinstance(discount, bool) or not isinstance(discount, (int, float)) or \
                not 0 <= discount <= 1:
            raise E.ConfigurationError(
                f"BatchMode(discount=...) must be a number in [0, 1], got {discount!r}")
        if metadata is not None and (not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise E.ConfigurationError("BatchMode(metadata=...) must be a dict of strings")
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.completion_window = completion_window
        self.fallback = fallback
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.wait = bool(wait)
        self.discount = float(discount)
        self.metadata = dict(metadata or {})

    def __repr__(self) -> str:
        return (f"BatchMode(poll_interval={self.poll_interval}, fallback={self.fallback!r}, "
                f"wait={self.wait}, max_requests={self.max_requests})")


def resolve_mode(mode: Any) -> Optional[BatchMode]:
    """None for the online path ("online" or None), else the BatchMode to run."""
    if mode is None or mode == "online":
        return None
    if mode == "batch":
        return BatchMode()
    if isinstance(mode, BatchMode):
        return mode
    raise E.ConfigurationError(
        f"mode must be 'online', 'batch' or a semex.BatchMode, got {mode!r}")


def check_supported(lm: Any, what: str) -> None:
    """Before anything is built: the batch path is OpenAI's Batch API (and servers that
    copy it)."""
    provider = getattr(lm, "provider", None) or "openai"
    if getattr(lm, "_targets", None) is not None:
        raise E.ConfigurationError(
            f"mode='batch' sends to one API base; {what} has several deployments: use the "
            "online mode, or an LM of one deployment for the batch")
    if provider != "openai":
        raise E.ConfigurationError(
            f"mode='batch' speaks OpenAI's Batch API (/files, /batches); {what} uses "
            f"provider={provider!r}, whose batch interface is not supported: use the "
            "online mode")


# -- the control plane ----------------------------------------------------------------------
class _Client:
    """Files and batches of one API base, with an LM's key header and TLS settings."""

    def __init__(self, model: Any):
        self.base = model.api_base.rstrip("/")
        self.headers = {}
        for line in model._headers:
            name, _, value = line.partition(":")
            if name.lower() not in ("content-type", "accept", "expect", "connection"):
                self.headers[name.strip()] = value.strip()
        self.timeout = max(30.0, float(model.timeout or 0))
        self.max_retries = model.max_retries
        self.backoff_base = model.backoff_base
        self.backoff_cap = model.backoff_cap
        self.max_hint_wait = model.max_hint_wait
        self.redact = model._redact
        context = None
        if self.base.startswith("https:"):
            if model.verify_tls is False:
                context = ssl._create_unverified_context()  # the user turned it off
            else:
                context = ssl.create_default_context(cafile=model.ca_file,
                                                     capath=model.ca_path)
        handlers: List[Any] = [urllib.request.ProxyHandler()]  # HTTPS_PROXY, NO_PROXY
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self.opener = urllib.request.build_opener(*handlers)

    # -- one request, retried like the engine retries ------------------------------------
    def request(self, method: str, path: str, body: Any = None,
                content_type: Optional[str] = None, length: Optional[int] = None,
                to_file: bool = False, what: str = "") -> Any:
        """The JSON answer (or, with to_file, the path of a temporary file holding the
        body). Connection errors, 429, 5xx and timeouts are retried with backoff and the
        server's Retry-After (capped at max_hint_wait); anything else raises the typed
        error with the provider's message."""
        url = self.base + path
        attempt = 0
        while True:
            attempt += 1
            data = body() if callable(body) else body
            request = urllib.request.Request(url, data=data, method=method,
                                             headers=dict(self.headers))
            if content_type:
                request.add_header("Content-Type", content_type)
            if length is not None:
                request.add_header("Content-Length", str(length))
            hint = None
            try:
                with self.opener.open(request, timeout=self.timeout) as response:
                    if to_file:
                        return _spool(response)
                    raw = response.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise E.ResponseFormatError(
                        f"{what}: the answer of {method} {path} is not JSON: "
                        f"{self.redact(raw[:200].decode('utf-8', 'replace'))}") from None
            except urllib.error.HTTPError as exc:
                status = exc.code
                raw = exc.read() or b""
                retryable = status == 429 or status >= 500
                hint = _retry_after(exc.headers)
                if not retryable or attempt > self.max_retries:
                    raise self._status_error(status, raw, method, path, what,
                                             attempt) from None
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt > self.max_retries or _refused(reason) and attempt > 2:
                    raise E.APIConnectionError(
                        self.redact(f"{what}: {method} {url} failed: {reason}"),
                        attempts=attempt) from None
            delay = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
            delay *= 0.5 + random.random() / 2  # jitter
            if hint is not None and hint <= self.max_hint_wait:
                delay = max(delay, hint)
            logger.info("%s: %s %s: retrying in %.1f s (attempt %d)", what, method, path,
                        delay, attempt)
            time.sleep(delay)

    def _status_error(self, status: int, raw: bytes, method: str, path: str, what: str,
                      attempts: int) -> E.RequestError:
        from .lm import _provider_message, _status_error_class

        detail = _provider_message(raw) or raw[:200].decode("utf-8", "replace")
        message = self.redact(f"{what}: {method} {path} answered HTTP {status}: {detail}")
        if status == 404 and path in ("/files", "/batches"):
            message += " (does this server offer the Batch API?)"
        return _status_error_class(status)(message, status=status, attempts=attempts,
                                           body=self.redact(raw.decode("utf-8", "replace"))
                                           if raw else None)

    # -- the Batch API ------------------------------------------------------------------------
    def upload(self, path: str, size: int, what: str) -> str:
        boundary = "semex-" + uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
                f"batch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"semex-batch.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
                ).encode("ascii")
        tail = f"\r\n--{boundary}--\r\n".encode("ascii")

        def body() -> Iterator[bytes]:
            yield head
            with open(path, "rb") as f:
                while True:
                    block = f.read(1 << 20)
                    if not block:
                        break
                    yield block
            yield tail
        answer = self.request("POST", "/files", body,
                              f"multipart/form-data; boundary={boundary}",
                              len(head) + size + len(tail), what=what)
        file_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(file_id, str) or not file_id:
            raise E.ResponseFormatError(f"{what}: the file upload's answer has no id: "
                                        f"{str(answer)[:200]}")
        return file_id

    def create(self, file_id: str, endpoint: str, window: str,
               metadata: Dict[str, str], what: str) -> dict:
        payload = {"input_file_id": file_id, "endpoint": endpoint,
                   "completion_window": window}
        if metadata:
            payload["metadata"] = metadata
        return self._batch(self.request("POST", "/batches", json.dumps(payload).encode(),
                                        "application/json", what=what), what)

    def retrieve(self, batch_id: str, what: str) -> dict:
        return self._batch(self.request("GET", "/batches/" + urllib.parse.quote(batch_id),
                                        what=what), what)

    def cancel(self, batch_id: str, what: str) -> dict:
        return self._batch(self.request(
            "POST", "/batches/" + urllib.parse.quote(batch_id) + "/cancel", b"",
            "application/json", what=what), what)

    def find_by_file(self, file_id: str, what: str) -> Optional[dict]:
        """The batch created from `file_id`, if any (a crash can fall between creating it
        and recording its id): the newest 100 batches are looked at."""
        answer = self.request("GET", "/batches?limit=100", what=what)
        for item in (answer.get("data") or []) if isinstance(answer, dict) else []:
            if isinstance(item, dict) and item.get("input_file_id") == file_id:
                return self._batch(item, what)
        return None

    def download(self, file_id: str, what: str) -> str:
        return self.request("GET", "/files/" + urllib.parse.quote(file_id) + "/content",
                            to_file=True, what=what)

    @staticmethod
    def _batch(answer: Any, what: str) -> dict:
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str) or \
                not isinstance(answer.get("status"), str):
            raise E.ResponseFormatError(f"{what}: not a batch object: {str(answer)[:200]}")
        return answer


def _spool(response: Any) -> str:
    fd, path = tempfile.mkstemp(prefix="semex-batch-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as f:
            while True:
                block = response.read(1 << 20)
                if not block:
                    break
                f.write(block)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _retry_after(headers: Any) -> Optional[float]:
    value = headers.get("Retry-After") if headers is not None else None
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _refused(reason: Any) -> bool:
    return isinstance(reason, ConnectionRefusedError) or "refused" in str(reason).lower()


# -- reading output files ---------------------------------------------------------------------
class Line:
    """One line of an output or error file."""

    __slots__ = ("key", "status", "body", "error")

    def __init__(self, key: bytes, status: int, body: Any, error: Any):
        self.key = key
        self.status = status
        self.body = body
        self.error = error


def read_lines(path: str, what: str) -> Tuple[List[Line], int]:
    """The lines of a downloaded file (deleted after reading) and how many were unreadable
    (logged: a line that does not parse can only fail its row by being absent)."""
    lines: List[Line] = []
    bad = 0
    try:
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    item = json.loads(raw)
                    key = bytes.fromhex(item["custom_id"])
                except (ValueError, KeyError, TypeError, RecursionError):
                    bad += 1
                    continue
                response = item.get("response") or {}
                status = response.get("status_code") if isinstance(response, dict) else None
                body = response.get("body") if isinstance(response, dict) else None
                lines.append(Line(key, status if isinstance(status, int) else 0, body,
                                  item.get("error")))
    finally:
        os.unlink(path)
    if bad:
        logger.warning("%s: %d lines of a batch file could not be read", what, bad)
    return lines, bad


def line_error(line: Line, batch_id: str) -> Tuple[type, str, int, Optional[bytes]]:
    """(error class, message, status, body) of a line that is not a 200 answer."""
    from .lm import _provider_message, _status_error_class

    error = line.error
    if isinstance(error, dict) and error:
        code = error.get("code") or "error"
        return (E.BatchJobError, f"batch {batch_id}: {code}: {error.get('message') or ''}"
                .rstrip(": "), 0, None)
    raw = json.dumps(line.body).encode() if line.body is not None else None
    detail = _provider_message(raw) if raw else None
    status = line.status
    cls = _status_error_class(status) if status else E.BatchJobError
    return (cls, f"HTTP {status} in batch {batch_id}" + (f": {detail}" if detail else ""),
            status, raw)


def transient(line: Line) -> bool:
    """A line the batch did not really answer: worth another try (online, or next run)."""
    error = line.error
    if isinstance(error, dict) and error.get("code") in ("batch_expired", "batch_cancelled"):
        return True
    return line.status == 429 or line.status >= 500


# -- the steps of one batch call ---------------------------------------------------------------
class Request:
    """What the batch path needs of one unique request: its key, its body, its rows."""

    __slots__ = ("key", "body", "rows")

    def __init__(self, key: bytes, body: bytes, row: int):
        self.key = key
        self.body = body
        self.rows = [row]


class Plan:
    """What a caller hands the batch run: the endpoint, the unique requests (already
    without the ones the answer cache had), and what to do with each answer."""

    def __init__(self, model: Any, endpoint: str, requests: List[Request],
                 absorb: Callable[[Request, Any, int, bool], None],
                 fail: Callable[[Request, type, str, int, Optional[bytes]], None],
                 online: Callable[[List[Request]], Any], progress: Callable[[int], None],
                 what: str, store: Any):
        self.model = model
        self.endpoint = endpoint
        self.requests = requests
        # (request, answer dict, status, paid): paid is False for the answers of a batch an
        # earlier call already collected (and reported): this call counts them as saved
        self.absorb = absorb
        self.fail = fail           # (request, error class, message, status, body)
        self.online = online       # the online fallback: a job to drive for these requests
        self.progress = progress   # (requests finished so far)
        self.what = what
        self.store = store         # a semex.Cache: where batches are recorded


class _Run:
    def __init__(self, plan: Plan, mode: BatchMode):
        self.plan = plan
        self.mode = mode
        self.client = _Client(plan.model)
        self.base = self.client.base
        self.pending: Dict[bytes, Request] = {r.key: r for r in plan.requests}
        self.active: Dict[str, dict] = {}      # batch id -> its last batch object
        self.sizes: Dict[str, int] = {}        # batch id -> its number of requests
        self.retry: Dict[bytes, Tuple[type, str, int, Optional[bytes]]] = {}
        self.done = 0

    def steps(self) -> Iterator[tuple]:
        """Yields ("io", fn) for a blocking request (sent back: its result), ("sleep", s),
        ("online", requests). Returns when every request has its outcome."""
        plan, mode, store, what = self.plan, self.mode, self.plan.store, self.plan.what
        client = self.client
        if not self.pending:
            return
        # 1. Batches of earlier runs that hold some of these requests.
        earlier = store.batches_holding(list(self.pending), self.base, plan.endpoint)
        for record in earlier:
            batch_id = record["id"]
            if batch_id.startswith("file:"):  # created, but the process died before the id
                found = yield ("io", lambda r=record: client.find_by_file(
                    r["input_file_id"], what))
                if found is None:
                    store.forget_batch(batch_id)
                    continue
                store.adopt_batch(batch_id, found["id"], found["status"])
                batch_id = found["id"]
                logger.info("%s: found batch %s (created before an interruption)", what,
                            batch_id)
            batch = yield ("io", lambda b=batch_id: client.retrieve(b, what))
            store.update_batch(batch)
            logger.info("%s: resuming batch %s (%s, %d requests)", what, batch_id,
                        batch["status"], record["requests"])
            self.sizes[batch_id] = record["requests"]
            if batch["status"] in TERMINAL:
                yield from self.collect(batch, final=False, paid=not record["collected"])
            else:
                self.active[batch_id] = batch
        held = store.keys_in_batches(list(self.pending), list(self.active))
        # 2. New batches for what no batch holds (nor answered, above).
        todo = [r for k, r in self.pending.items() if k not in held]
        for chunk in _chunks(todo, mode.max_requests, mode.max_bytes, plan.endpoint):
            path, size = _write_jsonl(chunk, plan.endpoint)
            try:
                file_id = yield ("io", lambda: client.upload(path, size, what))
            finally:
                os.unlink(path)
            keys = [r.key for r in chunk]
            store.record_batch("file:" + file_id, self.base, plan.endpoint, file_id, keys,
                               "uploaded")
            batch = yield ("io", lambda: client.create(file_id, plan.endpoint,
                                                        mode.completion_window,
                                                        mode.metadata, what))
            store.adopt_batch("file:" + file_id, batch["id"], batch["status"])
            logger.info("%s: created batch %s with %d requests (file %s)", what,
                        batch["id"], len(chunk), file_id)
            self.sizes[batch["id"]] = len(chunk)
            self.active[batch["id"]] = batch
        if self.active and not mode.wait:
            raise E.BatchSubmitted(list(self.active))
        # 3. Poll until every batch has ended.
        delay = mode.poll_interval
        while self.active:
            self.report()
            yield ("sleep", delay)
            delay = min(mode.max_poll_interval, delay * 1.5)
            for batch_id in list(self.active):
                batch = yield ("io", lambda b=batch_id: client.retrieve(b, what))
                store.update_batch(batch)
                self.active[batch_id] = batch
                if batch["status"] in TERMINAL:
                    del self.active[batch_id]
                    yield from self.collect(batch, final=True)
        self.report()
        # 4. What no batch answered.
        if self.pending and mode.fallback == "online":
            rest = list(self.pending.values())
            logger.info("%s: %d requests the batch did not answer go online", what, len(rest))
            self.pending = {}
            yield ("online", plan.online(rest))
        for request in list(self.pending.values()):
            cls, message, status, body = self.retry.get(request.key) or (
                E.BatchJobError, "no batch answered this request", 0, None)
            plan.fail(request, cls, message, status, body)
        self.pending = {}

    def collect(self, batch: dict, final: bool, paid: bool = True) -> Iterator[tuple]:
        """Read a batch that has ended: every line answers its request; lines the batch
        did not really answer (expired, cancelled, 429/5xx) are left for the fallback. In a
        batch of an earlier run (not `final`) only the answers count: a request that failed
        there is sent again, as an online re-run retries its errors."""
        plan, what, client = self.plan, self.plan.what, self.client
        batch_id, status = batch["id"], batch["status"]
        counts = batch.get("request_counts") or {}
        logger.info("%s: batch %s %s (%s)", what, batch_id, status,
                    ", ".join(f"{k} {v}" for k, v in counts.items()))
        answered = 0
        for field in ("output_file_id", "error_file_id"):
            file_id = batch.get(field)
            if not file_id:
                continue
            try:
                path = yield ("io", lambda f=file_id: client.download(f, what))
            except E.APIStatusError as exc:
                if exc.status != 404:
                    raise
                # An old batch whose files the provider has deleted: its requests are
                # sent again.
                logger.warning("%s: batch %s: its %s is gone at the provider (%s); its "
                               "requests are sent again", what, batch_id, field, exc)
                plan.store.forget_batch(batch_id)
                return
            lines, _ = read_lines(path, what)
            for line in lines:
                request = self.pending.get(line.key)
                if request is None:
                    continue
                if line.status == 200 and line.error is None and isinstance(line.body, dict):
                    del self.pending[line.key]
                    plan.absorb(request, line.body, 200, paid)
                    answered += 1
                elif not final:
                    continue  # an earlier run's failure: this run sends it again
                elif transient(line):
                    self.retry[line.key] = line_error(line, batch_id)
                else:
                    del self.pending[line.key]
                    cls, message, code, body = line_error(line, batch_id)
                    plan.fail(request, cls, message, code, body)
                    answered += 1
        self.done += answered
        if status == "failed":
            problems = ((batch.get("errors") or {}).get("data") or []) \
                if isinstance(batch.get("errors"), dict) else []
            text = "; ".join(f"{p.get('code')}: {p.get('message')}" for p in problems[:3]
                             if isinstance(p, dict)) or "no reason given"
            keys = plan.store.keys_of_batch(batch_id)
            for key in keys:
                request = self.pending.pop(key, None)
                if request is not None:
                    plan.fail(request, E.BatchJobError,
                              f"batch {batch_id} failed validation: {text}", 0, None)
                    self.done += 1
            plan.store.forget_batch(batch_id)  # nothing in it was processed
        elif status in ("expired", "cancelled"):
            for key in plan.store.keys_of_batch(batch_id):
                if key in self.pending and key not in self.retry:
                    self.retry[key] = (E.BatchJobError,
                                       f"batch {batch_id} {status} before answering this "
                                       "request", 0, None)
        plan.store.mark_collected(batch_id)

    def report(self) -> None:
        running = 0
        for batch_id, batch in self.active.items():
            counts = batch.get("request_counts") or {}
            done = counts.get("completed", 0) + counts.get("failed", 0)
            if isinstance(done, int):
                running += min(done, self.sizes.get(batch_id, done))
        self.plan.progress(self.done + running)


def _chunks(requests: List[Request], max_requests: int, max_bytes: int,
            endpoint: str) -> Iterator[List[Request]]:
    chunk: List[Request] = []
    size = 0
    for request in requests:
        n = len(request.body) + len(endpoint) + 90  # the line around the body
        if n > max_bytes:
            raise E.ConfigurationError(
                f"a request of {len(request.body):,} bytes (row {request.rows[0]}) is above "
                f"the batch file limit max_bytes={max_bytes:,}")
        if chunk and (len(chunk) >= max_requests or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(request)
        size += n
    if chunk:
        yield chunk


def _write_jsonl(requests: List[Request], endpoint: str) -> Tuple[str, int]:
    fd, path = tempfile.mkstemp(prefix="semex-batch-in-", suffix=".jsonl")
    head = b'{"custom_id": "'
    middle = ('", "method": "POST", "url": ' + json.dumps(endpoint) + ', "body": ').encode()
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for request in requests:
                line = head + request.key.hex().encode() + middle + request.body + b"}\n"
                f.write(line)
                size += len(line)
    except BaseException:
        os.unlink(path)
        raise
    return path, size


# -- drivers --------------------------------------------------------------------------------
def drive_sync(plan: Plan, mode: BatchMode, run_online: Callable[[Any], Any]) -> None:
    """Run a batch call on this thread: requests block, sleeps honour Ctrl-C (the batches
    keep running at the provider; the same call run again collects them)."""
    run = _Run(plan, mode)
    steps = run.steps()
    sent: Any = None
    thrown: Optional[BaseException] = None
    try:
        while True:
            try:
                kind, arg = steps.throw(thrown) if thrown is not None else steps.send(sent)
            except StopIteration:
                return
            sent = thrown = None
            if kind == "io":
                try:
                    sent = arg()
                except Exception as exc:  # noqa: BLE001 - handed to the steps
                    thrown = exc
            elif kind == "sleep":
                time.sleep(arg)
            else:
                job, merge = arg
                merge(run_online(job))
    except BaseException as exc:
        if not isinstance(exc, E.BatchSubmitted):
            _left_running(run)
        steps.close()
        raise


async def drive_async(plan: Plan, mode: BatchMode,
                      run_online: Callable[[Any], Any]) -> None:
    """drive_sync on a running loop: requests in a worker thread, sleeps on the loop;
    cancelling the awaiting task leaves the batches running (re-run to collect)."""
    run = _Run(plan, mode)
    steps = run.steps()
    loop = asyncio.get_running_loop()
    sent: Any = None
    thrown: Optional[BaseException] = None
    try:
        while True:
            try:
                kind, arg = steps.throw(thrown) if thrown is not None else steps.send(sent)
            except StopIteration:
                return
            sent = thrown = None
            if kind == "io":
                try:
                    sent = await loop.run_in_executor(None, arg)
                except Exception as exc:  # noqa: BLE001 - handed to the steps
                    thrown = exc
            elif kind == "sleep":
                await asyncio.sleep(arg)
            else:
                job, merge = arg
                merge(await run_online(job))
    except BaseException as exc:
        if not isinstance(exc, E.BatchSubmitted):
            _left_running(run)
        steps.close()
        raise


def _left_running(run: _Run) -> None:
    if run.active:
        logger.warning("%s: batches %s are still running at the provider; run the same "
                       "call again to collect them (or: semex batch status / fetch / "
                       "cancel)", run.plan.what, ", ".join(run.active))


# -- the `semex batch` commands -----------------------------------------------------------------
def refresh(store: Any, model_for: Callable[[str], Any],
            ids: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """The recorded batches (those named by `ids`, else all), each asked of its provider
    unless it has ended (the provider's word is stored); a batch the provider cannot be
    asked about keeps its recorded status, with the reason in "problem"."""
    records = store.list_batches()
    if ids:
        known = {r["id"] for r in records}
        missing = [i for i in ids if i not in known]
        if missing:
            raise E.ConfigurationError(
                f"no batch {', '.join(missing)} in the cache database {store.path}")
        records = [r for r in records if r["id"] in set(ids)]
    for record in records:
        if record["id"].startswith("file:") or record["status"] in TERMINAL:
            continue
        try:
            batch = _Client(model_for(record["api_base"])).retrieve(record["id"], "semex batch")
        except E.SemexError as exc:
            record["problem"] = str(exc)
            continue
        store.update_batch(batch)
        record.update(status=batch["status"], output_file_id=batch.get("output_file_id"),
                      error_file_id=batch.get("error_file_id"),
                      counts=batch.get("request_counts"))
    return records


def fetch_into_cache(store: Any, model_for: Callable[[str], Any],
                     ids: Optional[Sequence[str]] = None) -> List[Tuple[str, int, str]]:
    """Download the answers of every ended chat batch (or those of `ids`) into the answer
    cache, so that the call (or `semex extract` command) run again answers from the cache
    without the network. [(batch id, answers stored, note)]."""
    done = []
    for record in refresh(store, model_for, ids):
        batch_id = record["id"]
        if record["endpoint"] != "/v1/chat/completions":
            done.append((batch_id, 0, f"{record['endpoint']} answers are collected by "
                                      "running the call again"))
            continue
        if record["status"] not in TERMINAL or record["status"] == "failed":
            done.append((batch_id, 0, record["status"]))
            continue
        file_id = record.get("output_file_id")
        if not file_id:
            done.append((batch_id, 0, f"{record['status']}, no output file"))
            continue
        client = _Client(model_for(record["api_base"]))
        lines, _ = read_lines(client.download(file_id, "semex batch fetch"),
                              "semex batch fetch")
        from .lm import openai_answer

        rows = []
        for line in lines:
            if line.status != 200:
                continue
            try:
                chat = openai_answer(line.body)
            except (KeyError, IndexError, TypeError, AttributeError):
                continue
            if isinstance(chat[0], str):
                rows.append((line.key, *chat))
        store.put_many(rows)
        store.flush()
        store.mark_collected(batch_id)
        done.append((batch_id, len(rows), record["status"]))
    return done


def cancel(store: Any, model_for: Callable[[str], Any], ids: Sequence[str]) -> List[dict]:
    """Ask the provider to cancel each batch; the finished part stays usable."""
    out = []
    for record in refresh(store, model_for, ids):
        if record["id"].startswith("file:"):
            raise E.ConfigurationError(f"{record['id']} was never created as a batch")
        batch = _Client(model_for(record["api_base"])).cancel(record["id"], "semex batch cancel")
        store.update_batch(batch)
        out.append(batch)
    return out

