"""Embeddings on the C engine: ``EmbeddingModel``, ``embed`` and ``embed_async``.

``embed(texts)`` returns a C-contiguous ``float32`` array of shape ``(len(texts), dim)`` in
input order. Identical texts are requested once. Many texts share one ``POST /embeddings``
request (split by input count and by an estimated token budget); the requests run
concurrently under the engine's limits and retries, exactly as chat requests do. Answers
are read in C (csrc/embedjson.h) straight into the array's memory with the GIL released;
what that fast reader does not handle is read with json.loads here, with the same rules.

Failures follow sem_extract's contract: a row whose request failed after its retries, or
whose answer lacked (or garbled) its vector, is reported with its index and a typed error;
the other rows keep their vectors. ``on_error="raise"`` (the default) raises one
``BatchError`` after the run carrying the whole array (failed rows NaN) and the per-row
errors; ``on_error="return"`` returns the array with NaN rows and one
PartialFailureWarning.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Sequence

from . import _engine
from . import batch_api as _batch_api
from . import cache as _cache
from . import errors as E
from ._runtime import EngineHolder, Windows, wait_async, wait_sync
from .lm import (_KIND_CLASSES, _POLL_S, Usage, _check_int, _provider_message,
                 _status_error_class, _token_count)
from .providers import DEFAULT_BASE as _DEFAULT_BASE, is_local as _is_local
from .progress import ProgressBar

logger = logging.getLogger("semex")

__all__ = ["EmbeddingModel", "EmbeddingOutput", "embed", "embed_async"]

_ROW_OK, _ROW_MISSING, _ROW_DUPLICATE, _ROW_BAD_LENGTH = 1, 0, 2, 3
_C_READER = True  # False reads every answer with json.loads: the reference, for tests
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode


def _np():
    import numpy  # lazily: `import semex` stays light

    return numpy


def _estimate_tokens(text: str) -> int:
    """A cheap upper-leaning token estimate: ~4 ASCII characters per token, and one token
    per character for other scripts (CJK text is about that)."""
    return max(1, (len(text) + 3) // 4 if text.isascii() else len(text))


@dataclass
class EmbeddingOutput:
    """One call's result: ``embeddings`` (float32, one row per text, NaN rows where
    ``errors[i]`` is set), ``errors`` (None or the row's typed error) and ``usage``."""

    embeddings: Any
    errors: List[Optional[E.RequestError]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)

    @property
    def ok(self) -> bool:
        return not any(self.errors)


class EmbeddingModel:
    """An OpenAI-compatible embeddings model (``POST {api_base}/embeddings``) on the engine.

    Parameters
    ----------
    model:
        Model name. Defaults to ``$SEMEX_EMBEDDING_MODEL`` or ``text-embedding-3-small``.
    api_base, api_key:
        As for :class:`semex.LM` (``$OPENAI_BASE_URL``, ``$OPENAI_API_KEY``); the key is never
        shown in reprs, logs or errors.
    dimensions:
        Asked of the provider (OpenAI's ``dimensions``); a server that answers with another
        length is an error naming this parameter.
    max_batch_inputs:
        Most texts in one request (OpenAI accepts 2,048).
    max_batch_tokens:
        Estimated-token budget of one request (OpenAI refuses more than 300,000).
    max_input_tokens:
        A text estimated above this (OpenAI's models take 8,192) is that row's
        ``InputTooLargeError``, without a request.
    encoding_format:
        "base64" (default, as openai-python sends: a quarter of the bytes of JSON numbers)
        or "float"; None sends no encoding_format. Either answer shape is read.
    max_concurrency, rpm, tpm, max_retries, timeout, connect_timeout, workers,
    adaptive_concurrency, verify_tls, backoff_base, backoff_cap, extra_body, extra_headers:
        As for :class:`semex.LM`; tpm counts the estimated tokens of each request.
    max_response_bytes:
        Cap on one answer (a request of 2,048 x 3,072 floats as JSON is ~140 MB).
    price_per_million:
        Price per million input tokens, for ``usage.cost``.
    cache:
        The persistent cache (semex.cache), as for :class:`semex.LM`: None follows
        ``settings.configure(cache=...)``, False is off, True the default file, a path or a
        ``semex.Cache``. Each text's vector is stored (float32) under a key of the URL, the
        model, ``dimensions`` and the other request fields and the text; a re-run embeds only
        the texts it has not seen.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        api_base: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        dimensions: Optional[int] = None,
        max_batch_inputs: int = 256,
        max_batch_tokens: int = 250_000,
        max_input_tokens: int = 8191,
        encoding_format: Optional[str] = "base64",
        rpm: Optional[float] = None,
        tpm: Optional[float] = None,
        max_concurrency: int = 16,
        max_retries: int = 6,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        workers: int = 1,
        adaptive_concurrency: bool = True,
        max_response_bytes: int = 256 * 1024 * 1024,
        verify_tls: bool = True,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        extra_body: Optional[Mapping[str, Any]] = None,
        extra_headers: Optional[Mapping[str, str]] = None,
        price_per_million: Optional[float] = None,
        cache: Any = None,
    ):
        self.model = model or os.environ.get("SEMEX_EMBEDDING_MODEL") or "text-embedding-3-small"
        if not isinstance(self.model, str):
            raise E.ConfigurationError(f"model must be a str, got {type(model).__name__}")
        base = api_base or os.environ.get("OPENAI_BASE_URL") or _DEFAULT_BASE
        if not isinstance(base, str) or not base.startswith(("http://", "https://")):
            raise E.ConfigurationError(
                f"api_base must be an http:// or https:// URL, got {base!r}")
        self.api_base = base.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.__api_key = key or None
        if api_key is None and not key and not _is_local(self.api_base):  # as LM does
            raise E.ConfigurationError(
                f"no API key for {self.api_base}: set OPENAI_API_KEY or pass api_key=... "
                "(a server on this machine or your network needs none; api_key='' sends "
                "none on purpose)")
        if dimensions is not None:
            _check_int("dimensions", dimensions, 1)
        _check_int("max_batch_inputs", max_batch_inputs, 1)
        _check_int("max_batch_tokens", max_batch_tokens, 1)
        _check_int("max_input_tokens", max_input_tokens, 1)
        _check_int("max_concurrency", max_concurrency, 1)
        _check_int("max_retries", max_retries, 0)
        _check_int("workers", workers, 1)
        _check_int("max_response_bytes", max_response_bytes, 1)
        if encoding_format not in ("base64", "float", None):
            raise E.ConfigurationError(
                f"encoding_format must be 'base64', 'float' or None, got {encoding_format!r}")
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise E.ConfigurationError(f"{name} must be a positive number or None, "
                                           f"got {value!r}")
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise E.ConfigurationError(f"{name} must be a positive number of seconds, "
                                           f"got {value!r}")
        self.dimensions = dimensions
        self.max_batch_inputs = max_batch_inputs
        self.max_batch_tokens = max_batch_tokens
        self.max_input_tokens = max_input_tokens
        self.encoding_format = encoding_format
        self.max_concurrency = max_concurrency
        self.rpm, self.tpm = rpm, tpm
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_response_bytes = max_response_bytes
        self.verify_tls = verify_tls
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.extra_body = dict(extra_body or {})
        self.extra_headers = dict(extra_headers or {})
        self.price_per_million = price_per_million
        for name, value in self.extra_headers.items():
            if "\n" in f"{name}{value}" or "\r" in f"{name}{value}":
                raise E.ConfigurationError(f"extra_headers[{name!r}] contains a line break")
        fields = {"model": self.model}
        if dimensions is not None:
            fields["dimensions"] = dimensions
        if encoding_format is not None:
            fields["encoding_format"] = encoding_format
        fields.update(self.extra_body)
        fields.pop("input", None)
        try:
            encoded = json.dumps(fields, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise E.ConfigurationError(f"extra_body is not JSON-serializable: {exc}") from None
        self._prefix = encoded[:-1] + ', "input": '
        # what every cache key of this model starts from: the answer's fields, not its
        # encoding (base64 and JSON numbers carry the same float32 values)
        canonical = json.dumps({k: v for k, v in fields.items() if k != "encoding_format"},
                               sort_keys=True, ensure_ascii=False)
        self._key_base = hashlib.blake2b(b"embed\0" + self.url.encode("utf-8") + b"\0"
                                         + canonical.encode("utf-8") + b"\0", digest_size=16)
        self._cache = _cache.resolve(cache)
        self.ca_file = self.ca_path = None
        self.max_hint_wait = 300.0
        self._dim: Optional[int] = dimensions  # learnt from the first answer otherwise
        self.total_usage = Usage()
        self._usage_lock = threading.Lock()
        headers = ["Content-Type: application/json", "Accept: application/json"]
        if self.__api_key:
            headers.append(f"Authorization: Bearer {self.__api_key}")
        headers.extend(f"{k}: {v}" for k, v in self.extra_headers.items())
        self._headers = headers
        self._engine = EngineHolder(workers=workers, max_in_flight=max_concurrency,
                                    rpm=float(rpm or 0), tpm=float(tpm or 0),
                                    adaptive=adaptive_concurrency)

    def __repr__(self) -> str:
        return (f"EmbeddingModel(model={self.model!r}, api_base={self.api_base!r}, "
                f"api_key={'<set>' if self.__api_key else None}, "
                f"dimensions={self.dimensions}, max_concurrency={self.max_concurrency})")

    def __getstate__(self):
        raise TypeError("EmbeddingModel objects are not picklable (they hold an API key and "
                        "threads); build one in each process")

    @property
    def url(self) -> str:
        return self.api_base + "/embeddings"

    @property
    def cache(self) -> Optional[_cache.Cache]:
        """The cache this model's calls use now (its own, else the configured one)."""
        option = self._cache
        if option is None:
            from .settings import settings
            option = settings.cache
        return option if isinstance(option, _cache.Cache) else None

    def _keys(self, texts: Sequence[str]) -> List[bytes]:
        copy = self._key_base.copy
        keys = []
        for text in texts:
            h = copy()
            h.update(text.encode("utf-8", "surrogatepass"))
            keys.append(h.digest())
        return keys

    def _redact(self, text: str) -> str:
        key = self.__api_key
        if key and key in text:
            text = text.replace(key, "***")
        return text

    def close(self) -> None:
        """Stop the engine's threads now (they also stop at interpreter exit)."""
        self._engine.close()

    def __enter__(self) -> "EmbeddingModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def engine_stats(self) -> dict:
        return self._engine.stats()

    def _record_usage(self, usage: Usage) -> None:
        with self._usage_lock:
            self.total_usage.add(usage)

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, texts: Sequence[str], *, batch_size: Optional[int] = None,
                 max_concurrent: Optional[int] = None, progress: Any = False,
                 mode: Any = None) -> EmbeddingOutput:
        """Embed ``texts``; block until done (works inside a running loop: none is used).
        Ctrl-C cancels the outstanding requests and raises KeyboardInterrupt.
        ``mode="batch"`` (or a ``semex.BatchMode``) sends them through the provider's Batch
        API and returns when the batch has ended (see :func:`semex.embed`)."""
        return _drive_sync(_Job(self, texts, batch_size, max_concurrent, progress, mode))

    async def async_call(self, texts: Sequence[str], *, batch_size: Optional[int] = None,
                         max_concurrent: Optional[int] = None, progress: Any = False,
                         mode: Any = None) -> EmbeddingOutput:
        """Awaitable twin of ``model(texts)`` on any running loop; cancelling the awaiting
        task cancels the in-flight requests (a batch keeps running at the provider)."""
        return await _drive_async(_Job(self, texts, batch_size, max_concurrent, progress,
                                       mode))


def _drive_sync(job: "_Job") -> EmbeddingOutput:
    try:
        if job.batch_mode is not None:
            if job.nreq:
                _batch_api.drive_sync(job.batch_plan(), job.batch_mode, _drive_sync)
        elif job.windows is not None:
            for start, batch in job.windows:
                wait_sync(batch, job.tick, interval=_POLL_S)
                job.collect(start, batch)
    finally:
        job.close()
    return job.finish()


async def _drive_async(job: "_Job") -> EmbeddingOutput:
    try:
        if job.batch_mode is not None:
            if job.nreq:
                await _batch_api.drive_async(job.batch_plan(), job.batch_mode, _drive_async)
        elif job.windows is not None:
            for start, batch in job.windows:
                await wait_async(batch, job.tick, interval=_POLL_S)
                job.collect(start, batch)
    finally:
        job.close()
    return job.finish()


def _first_dim(answer: Any) -> Optional[int]:
    """The length of the first vector of an answer, or None."""
    try:
        vec = answer["data"][0]["embedding"]
        dim = (len(base64.b64decode(vec)) // 4) if isinstance(vec, str) else len(vec)
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return dim if dim >= 1 else None


def check_texts(texts: Any, name: str = "texts") -> List[str]:
    """The texts as a list of str, or a ConfigurationError naming the first bad row."""
    if isinstance(texts, (str, bytes)):
        raise E.ConfigurationError(f"{name} must be a list of strings, not a single string")
    if isinstance(texts, Mapping) or not hasattr(texts, "__iter__"):
        raise E.ConfigurationError(
            f"{name} must be a list of strings, got {type(texts).__name__}")
    out = list(texts)
    if not out:
        raise E.ConfigurationError(f"{name} is empty: nothing to embed")
    for i, text in enumerate(out):
        if type(text) is str:
            if not text:
                raise E.ConfigurationError(
                    f"{name}[{i}] is an empty string (providers refuse empty inputs)")
            continue
        if text is None:
            raise E.ConfigurationError(f"{name}[{i}] is None (a missing value)")
        if isinstance(text, float) and math.isnan(text):
            raise E.ConfigurationError(f"{name}[{i}] is NaN (a missing value)")
        if isinstance(text, str):  # a str subclass (numpy.str_): the plain value
            if not text:
                raise E.ConfigurationError(
                    f"{name}[{i}] is an empty string (providers refuse empty inputs)")
            out[i] = str(text)
            continue
        raise E.ConfigurationError(
            f"{name}[{i}] must be a str, got {type(text).__name__}: {text!r:.60}")
    return out


class _Job:
    """One embed call: checks and plans up front, submits windows of requests, reads the
    answers into the output array, and reports per-row errors."""

    def __init__(self, model: EmbeddingModel, texts: Any, batch_size: Optional[int],
                 max_concurrent: Optional[int], progress: Any, mode: Any = None):
        np = _np()
        self.batch_mode = _batch_api.resolve_mode(mode)
        self.remake = (batch_size, max_concurrent)
        self.record = True  # add this call's usage to model.total_usage
        if batch_size is not None:
            _check_int("batch_size", batch_size, 1)
        if max_concurrent is not None:
            _check_int("max_concurrent", max_concurrent, 1)
        self.model = model
        self.texts = texts = check_texts(texts)
        self.n = n = len(texts)
        # Identical texts are requested once: row_of[u] is unique text u's first row.
        first: dict = {}
        first_rows: List[int] = []
        inverse = np.empty(n, dtype=np.int64)
        for i, text in enumerate(texts):
            u = first.setdefault(text, len(first))
            if u == len(first_rows):
                first_rows.append(i)
            inverse[i] = u
        self.inverse = inverse
        self.unique = list(first)  # insertion order: first occurrences
        nu = len(self.unique)
        row_of = np.asarray(first_rows, dtype=np.int64)
        self.row_of = row_of
        self.errors: List[Optional[E.RequestError]] = [None] * n
        self.unique_errors: dict = {}  # u -> error
        self.usage = Usage(cache_hits=n - nu)
        # The persistent cache: texts it has a vector for are not sent.
        self.cache = cache = model.cache
        self.keys: Optional[List[bytes]] = None
        hits: dict = {}  # u -> vector
        if cache is not None and nu:
            self.keys = model._keys(self.unique)
            found = cache._lookup(self.keys)
            want = model._dim
            for u, key in enumerate(self.keys):
                row = found.get(key)
                if row is None or not isinstance(row[1], bytes) or len(row[1]) % 4:
                    continue
                vec = np.frombuffer(row[1], dtype="<f4")
                if want is None:
                    want = vec.shape[0]
                if vec.shape[0] == want and want:
                    hits[u] = (vec, row[3])
            if hits:
                model._dim = want
            self.usage.cached = len(hits)
            self.usage.cached_prompt_tokens = sum(t for _, t in hits.values())
        # Plan requests over the unique texts: by count and by estimated tokens.
        per_request = min(batch_size or model.max_batch_inputs, model.max_batch_inputs)
        budget = model.max_batch_tokens
        plan: List[int] = []       # unique indices, request after request
        offsets = [0]
        costs: List[float] = []
        count = tokens = 0
        for u, text in enumerate(self.unique):
            if u in hits:
                continue
            t = _estimate_tokens(text)
            if t > model.max_input_tokens:
                self.unique_errors[u] = (E.InputTooLargeError, (
                    f"is about {t:,} tokens, above max_input_tokens={model.max_input_tokens:,}"
                    " (split it into smaller chunks); not sent"), 0, 0)
                continue
            if count and (count >= per_request or tokens + t > budget):
                offsets.append(len(plan))
                costs.append(float(tokens))
                count = tokens = 0
            plan.append(u)
            count += 1
            tokens += t
        if count:
            offsets.append(len(plan))
            costs.append(float(tokens))
        self.plan = np.asarray(plan, dtype=np.int64)
        self.plan_rows = row_of[self.plan] if plan else np.empty(0, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.costs = costs
        self.nreq = len(offsets) - 1
        self.out = None
        if model._dim is not None:
            self._allocate(model._dim)
        for u, (vec, _) in hits.items():
            self.out[row_of[u]] = vec
        self.n_cached = len(hits)
        self.max_concurrent = max_concurrent or 0
        self.cap_holder: Optional[_engine.Batch] = None
        self.bar = None
        self.callback: Optional[Callable[[int, int], None]] = None
        if callable(progress):
            self.callback = progress
        elif progress:
            self.bar = ProgressBar(n, "Embedding", enabled=True)
        # A window is one concurrency's worth of requests; two are submitted and a third
        # only while the oldest waits for a straggler. Their answers are what an embed call
        # holds besides the array (a request's answer is ~5.4 bytes per float in base64):
        # at 16 x 256 inputs x 1,536 dimensions that is ~100 MB, whatever the number of
        # texts. LM's windows go deeper (8) because its answers are small.
        size = max(1, self.max_concurrent or model.max_concurrency)
        self.windows = (Windows(self._submit, self.nreq, size, first=1, max_depth=3)
                        if self.nreq and self.batch_mode is None else None)
        self.done_inputs = 0
        self.batched_tokens = 0

    # -- mode="batch": the provider's Batch API ------------------------------------------------
    def batch_plan(self) -> "_batch_api.Plan":
        """One batch line per planned request (keyed by its body), read with the same rules
        as an online answer; what a batch leaves unanswered can go online."""
        np = _np()
        model = self.model
        prefix, unique, plan, offsets = model._prefix, self.unique, self.plan, self.offsets
        base = hashlib.blake2b(b"embed-batch\0" + model.url.encode("utf-8") + b"\0",
                               digest_size=16)
        requests = []
        for r in range(self.nreq):
            chunk = [unique[u] for u in plan[offsets[r]:offsets[r + 1]].tolist()]
            body = (prefix + _ENCODE(chunk) + "}").encode("utf-8")
            h = base.copy()
            h.update(body)
            requests.append(_batch_api.Request(h.digest(), body, r))
        usage = self.usage

        def absorb(request: _batch_api.Request, answer: Any, status: int,
                   paid: bool) -> None:
            r = request.rows[0]
            a, b = int(offsets[r]), int(offsets[r + 1])
            if self.out is None:
                dim = _first_dim(answer)
                if dim is None:
                    self._fail_rows(r, E.ResponseFormatError,
                                    "the provider's answer has no readable vector", status, 1,
                                    None)
                    return
                model._dim = dim
                self._allocate(dim)
            state = np.zeros(b - a, dtype=np.uint8)
            read = self._read_parsed(r, answer, self.plan_rows[a:b], state, status, 1)
            if read is None:
                return
            prompt_tokens, total_tokens, _vectors, out_of_range, bad_length = read
            if paid:
                usage.requests += 1
                usage.prompt_tokens += prompt_tokens
                usage.total_tokens += total_tokens
                usage.batched += 1
                self.batched_tokens += prompt_tokens
            else:  # an earlier call's batch, reported then: saved now
                usage.cached += b - a
                usage.cached_prompt_tokens += prompt_tokens
            for k in np.flatnonzero(state != _ROW_OK).tolist():
                self._row_problem(r, k, int(state[k]), out_of_range, bad_length, b - a,
                                  status, 1)
            if self.cache is not None:
                self._store(a, b, state, prompt_tokens)

        def fail(request: _batch_api.Request, cls: type, message: str, status: int,
                 body: Optional[bytes]) -> None:
            self._fail_rows(request.rows[0], cls, message, status, 1, body)

        def online(rest: List[_batch_api.Request]):
            units = [int(u) for req in rest
                     for u in plan[offsets[req.rows[0]]:offsets[req.rows[0] + 1]].tolist()]
            batch_size, max_concurrent = self.remake
            sub = _Job(model, [unique[u] for u in units], batch_size, max_concurrent, False)
            sub.record = False

            def merge(output: EmbeddingOutput) -> None:
                usage.add(output.usage)
                if self.out is None:
                    self._allocate(output.embeddings.shape[1])
                for k, u in enumerate(units):
                    error = output.errors[k]
                    if error is None:
                        self.out[self.row_of[u]] = output.embeddings[k]
                    else:
                        text = str(error).split(": ", 1)[-1]
                        self.unique_errors[u] = (type(error), text, error.status,
                                                 error.attempts)
            return sub, merge

        def report(done: int) -> None:
            if self.callback is not None or self.bar is not None:
                inputs = int(offsets[min(done, self.nreq)]) + self.n_cached
                if self.callback is not None:
                    self.callback(inputs, self.n)
                else:
                    self.bar.update_to(inputs)

        store = self.cache if self.cache is not None else _cache.resolve(True)
        return _batch_api.Plan(model, "/v1/embeddings", requests, absorb, fail, online,
                               report, f"EmbeddingModel({model.model!r}) batch", store)

    def _allocate(self, dim: int) -> None:
        np = _np()
        self.dim = dim
        self.out = np.empty((self.n, dim), dtype=np.float32)

    def _submit(self, start: int, end: int) -> _engine.Batch:
        model = self.model
        prefix, unique, plan, offsets = model._prefix, self.unique, self.plan, self.offsets
        bodies = []
        for r in range(start, end):
            chunk = [unique[u] for u in plan[offsets[r]:offsets[r + 1]].tolist()]
            bodies.append((prefix + _ENCODE(chunk) + "}").encode("utf-8"))
        tokens = self.costs[start:end] if model.tpm else None
        batch = model._engine.get().submit(
            model.url, model._headers, bodies, tokens, timeout=model.timeout,
            connect_timeout=model.connect_timeout, max_retries=model.max_retries,
            max_body=model.max_response_bytes, verify=model.verify_tls,
            backoff_base=model.backoff_base, backoff_cap=model.backoff_cap,
            notify_each=self.bar is not None or self.callback is not None,
            max_in_flight=self.max_concurrent, share_cap_with=self.cap_holder)
        if self.max_concurrent and self.cap_holder is None:
            self.cap_holder = batch
        return batch

    def tick(self) -> None:
        windows = self.windows
        windows.top_up()
        if self.bar is None and self.callback is None:
            return
        # Progress in inputs: requests finished so far, counted by their sizes.
        done_requests = windows.completed()
        inputs = int(self.offsets[min(done_requests, self.nreq)]) + self.n_cached
        if self.callback is not None:
            self.callback(inputs, self.n)
        else:
            stats = self.model.engine_stats()
            self.bar.update_to(inputs, {"admitted": stats.get("admitted", 0),
                                        "retries": stats.get("retries", 0),
                                        "http_429": stats.get("http_429", 0),
                                        "tokens": self.usage.prompt_tokens,
                                        "errors": self.usage.failed})

    def collect(self, start: int, batch: _engine.Batch) -> None:
        np = _np()
        nslots = len(batch)
        lo, hi = int(self.offsets[start]), int(self.offsets[start + nslots])
        if self.out is None:  # the first answer tells the dimension
            dim = self._learn_dim(batch)
            if dim is None:  # no readable answer in this window: its rows fail
                self._fail_unread(start, batch)
                return
            self._allocate(dim)
        rows = self.plan_rows[lo:hi]
        offsets = self.offsets[start:start + nslots + 1] - lo
        state = np.zeros(hi - lo, dtype=np.uint8)
        usage = self.usage
        if _C_READER:
            results = batch.read_embeddings(self.out, rows, offsets, state)
        else:  # every answer through json.loads (tests compare the two readers)
            results = [r[:6] + (None,) for r in batch.results()]
        used = []  # (offset, prompt, completion, total tokens) of the answers read
        for j, (st, kind, status, body, error, attempts, read) in enumerate(results):
            r = start + j
            usage.requests += attempts
            if attempts > 1:
                usage.retries += attempts - 1
            a, b = int(offsets[j]), int(offsets[j + 1])
            if st != _engine.OK:
                self._fail_request(r, st, kind, status, body, error, attempts)
                continue
            if read is None:
                read = self._read_json(r, body, rows[a:b], state[a:b], status, attempts)
                if read is None:
                    continue
            prompt_tokens, total_tokens, _vectors, out_of_range, bad_length = read
            usage.prompt_tokens += prompt_tokens
            usage.total_tokens += total_tokens
            used.append((j, prompt_tokens, 0, total_tokens))  # the reservation: an estimate
            bad = np.flatnonzero(state[a:b] != _ROW_OK)
            for k in bad.tolist():
                self._row_problem(r, k, int(state[a + k]), out_of_range, bad_length, b - a,
                                  status, attempts)
            if self.cache is not None:
                self._store(lo + a, lo + b, state[a:b], prompt_tokens)
        if used:
            batch.settle(used)
        progress = batch.progress()
        usage.rate_limited += progress[5]
        self.done_inputs = hi

    def _store(self, lo: int, hi: int, state: Any, prompt_tokens: int) -> None:
        """Queue the vectors of plan positions lo..hi that were read well for the cache,
        each with its share of the request's prompt tokens."""
        np = _np()
        good = np.flatnonzero(state == _ROW_OK)
        if not good.size:
            return
        units = self.plan[lo:hi]
        shares = [_estimate_tokens(self.unique[u]) for u in units.tolist()]
        scale = prompt_tokens / max(1, sum(shares))
        out, row_of, keys = self.out, self.row_of, self.keys
        rows = []
        for k in good.tolist():
            u = int(units[k])
            tokens = int(round(shares[k] * scale))
            rows.append((keys[u], out[row_of[u]].tobytes(), None, tokens, 0, tokens))
        self.cache.put_many(rows)

    def _learn_dim(self, batch: _engine.Batch) -> Optional[int]:
        """The dimension, from the first successful answer of the first window (or the
        model's `dimensions`)."""
        model = self.model
        for st, _kind, _status, body, _error, _attempts, _lat in batch.results():
            if st != _engine.OK or not body:
                continue
            try:
                data = json.loads(body)["data"]
                vec = data[0]["embedding"]
                dim = (len(base64.b64decode(vec)) // 4) if isinstance(vec, str) else len(vec)
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            if dim >= 1:
                model._dim = dim
                return dim
        return None

    def _fail_unread(self, start: int, batch: _engine.Batch) -> None:
        for j, (st, kind, status, body, error, attempts, _lat) in enumerate(batch.results()):
            self.usage.requests += attempts
            if st != _engine.OK:
                self._fail_request(start + j, st, kind, status, body, error, attempts)
            else:
                self._fail_rows(start + j, E.ResponseFormatError,
                                "the provider's answer has no readable vector", status,
                                attempts, body)

    def _read_json(self, r: int, body: bytes, rows, state, status: int,
                   attempts: int) -> Optional[tuple]:
        """An answer the C reader left to json.loads, with the same rules."""
        logger.debug("the answer to embeddings request %d is read with json.loads", r)
        try:
            answer = json.loads(body)
        except (ValueError, TypeError, RecursionError) as exc:  # TypeError: no body
            self._fail_rows(r, E.ResponseFormatError, (
                f"the provider's answer could not be read ({type(exc).__name__}: {exc})"),
                status, attempts, body)
            return None
        return self._read_parsed(r, answer, rows, state, status, attempts, body)

    def _read_parsed(self, r: int, answer: Any, rows, state, status: int, attempts: int,
                     body: Optional[bytes] = None) -> Optional[tuple]:
        """_read_json of an answer already parsed (a batch output line's body)."""
        np = _np()
        n, dim = len(rows), self.dim
        try:
            data = answer["data"]
            if not isinstance(data, list):
                raise TypeError("'data' is not a list")
        except (KeyError, TypeError) as exc:
            if body is None:
                body = json.dumps(answer).encode("utf-8")
            self._fail_rows(r, E.ResponseFormatError, (
                f"the provider's answer could not be read ({type(exc).__name__}: {exc})"),
                status, attempts, body)
            return None
        state[:] = _ROW_MISSING
        out_of_range = bad_length = 0
        for pos, item in enumerate(data):
            try:
                index = item.get("index", pos) if isinstance(item, dict) else None
                vec = item["embedding"]
                if isinstance(vec, str):
                    arr = np.frombuffer(base64.b64decode(vec), dtype="<f4")
                else:
                    arr = np.asarray(vec, dtype=np.float32)
                if arr.ndim != 1:
                    raise TypeError(f"an embedding of shape {arr.shape}")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self._fail_rows(r, E.ResponseFormatError, (
                    f"data[{pos}] of the provider's answer is not a vector "
                    f"({type(exc).__name__}: {exc})"), status, attempts, body)
                return None
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                out_of_range += 1
                continue
            if state[index] != _ROW_MISSING:
                state[index] = _ROW_DUPLICATE
                continue
            if arr.shape[0] != dim:
                state[index] = _ROW_BAD_LENGTH
                bad_length = arr.shape[0]
                continue
            self.out[rows[index]] = arr
            state[index] = _ROW_OK
        u = answer.get("usage") if isinstance(answer, dict) else None
        if not isinstance(u, dict):
            u = {}
        return (_token_count(u.get("prompt_tokens")), _token_count(u.get("total_tokens")),
                len(data), out_of_range, bad_length)

    def _row_problem(self, r: int, k: int, code: int, out_of_range: int, bad_length: int,
                     n: int, status: int, attempts: int) -> None:
        u = int(self.plan[int(self.offsets[r]) + k])
        if code == _ROW_MISSING:
            text = f"the answer to its request ({n} inputs) has no vector for it"
            if out_of_range:
                text += f" ({out_of_range} vector(s) carried an index outside 0..{n - 1})"
        elif code == _ROW_DUPLICATE:
            text = "the answer to its request has two vectors for it (duplicate index)"
        else:
            text = (f"its vector has {bad_length} numbers where the others have "
                    f"{self.dim}")
            if self.model.dimensions is not None:
                text += (f" (dimensions={self.model.dimensions} was asked; does the server "
                         "ignore `dimensions`?)")
            else:
                text += " (the model returned vectors of differing lengths)"
        self.unique_errors[u] = (E.ResponseFormatError, text, status, attempts)

    def _fail_request(self, r: int, st: int, kind: int, status: int, body: Optional[bytes],
                      error: Optional[str], attempts: int) -> None:
        if st == _engine.CANCELLED:
            cls = E.RequestCancelledError
        elif kind == _engine.ERR_HTTP:
            cls = _status_error_class(status)
        else:
            cls = _KIND_CLASSES.get(kind, E.RequestError)
        text = error or "failed"
        detail = _provider_message(body) if body else None
        if detail:
            text += f": {detail}"
        self._fail_rows(r, cls, text, status, attempts, body)

    def _fail_rows(self, r: int, cls: type, text: str, status: int, attempts: int,
                   body: Optional[bytes]) -> None:
        for u in self.plan[int(self.offsets[r]):int(self.offsets[r + 1])].tolist():
            self.unique_errors[u] = (cls, text, status, attempts, body)

    def close(self) -> None:
        if self.windows is not None:
            self.windows.close()
        if self.bar is not None:
            self.bar.close()

    def finish(self) -> EmbeddingOutput:
        np = _np()
        model = self.model
        if self.out is None:  # nothing was sent: every row failed before a request
            self._allocate(model._dim or model.dimensions or 1)
        out, inverse, row_of = self.out, self.inverse, self.row_of
        dup_rows = np.flatnonzero(row_of[inverse] != np.arange(self.n))
        if dup_rows.size:
            out[dup_rows] = out[row_of[inverse[dup_rows]]]
        usage = self.usage
        if self.unique_errors:
            bad_u = np.fromiter(self.unique_errors, dtype=np.int64)
            failed_rows = np.flatnonzero(np.isin(inverse, bad_u))
            out[failed_rows] = np.nan
            for i in failed_rows.tolist():
                spec = self.unique_errors[int(inverse[i])]
                cls, text, status, attempts = spec[:4]
                body = spec[4] if len(spec) > 4 else None
                message = model._redact(f"texts[{i}]: {text}")
                self.errors[i] = cls(message, index=i, status=status, attempts=attempts,
                                     body=model._redact(body[:500].decode("utf-8", "replace"))
                                     if body else None)
            usage.failed = int(failed_rows.size)
            first = next(e for e in self.errors if e is not None)
            logger.warning("%d of %d texts failed to embed; first: %s", usage.failed, self.n,
                           first)
        if model.price_per_million is not None:
            batched = self.batched_tokens if self.batch_mode is not None else 0
            usage.cost = (usage.prompt_tokens - batched + batched * (
                self.batch_mode.discount if batched else 1.0)) * model.price_per_million / 1e6
            if usage.cached:
                usage.cost_saved = usage.cached_prompt_tokens * model.price_per_million / 1e6
        if self.cache is not None:
            self.cache.flush()
        if self.record:
            model._record_usage(usage)
        if self.callback is not None:
            self.callback(self.n, self.n)
        elif self.bar is not None:
            self.bar.update_to(self.n)
        return EmbeddingOutput(embeddings=out, errors=self.errors, usage=usage)


# -- user models: the synchronous fallback ---------------------------------------------------

def _as_matrix(value: Any, n: int, what: str):
    np = _np()
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise E.ConfigurationError(
            f"{what} returned shape {arr.shape} for {n} texts; expected ({n}, dim)")
    return arr


def _fallback_chunks(texts: List[str], batch_size: Optional[int]) -> List[tuple]:
    size = batch_size or 64
    return [(i, texts[i:i + size]) for i in range(0, len(texts), size)]


def _assemble(texts: List[str], parts: List[tuple], what: str):
    np = _np()
    dims = {p.shape[1] for _, p in parts}
    if len(dims) != 1:
        raise E.ConfigurationError(f"{what} returned vectors of differing lengths {sorted(dims)}")
    out = np.empty((len(texts), dims.pop()), dtype=np.float32)
    for start, part in parts:
        out[start:start + part.shape[0]] = part
    return out


def _run_fallback_sync(model: Any, texts: List[str], batch_size: Optional[int],
                       max_concurrent: Optional[int]):
    """A model without HTTP (a callable: texts -> matrix), in worker threads."""
    what = f"the embedding model {type(model).__name__}"
    chunks = _fallback_chunks(texts, batch_size)
    with ThreadPoolExecutor(max_workers=max_concurrent or 1,
                            thread_name_prefix="semex-embed") as pool:
        futures = [(start, pool.submit(model, chunk)) for start, chunk in chunks]
        parts = [(start, _as_matrix(f.result(), len(chunk), what))
                 for (start, f), (_, chunk) in zip(futures, chunks)]
    return _assemble(texts, parts, what)


async def _run_fallback_async(model: Any, texts: List[str], batch_size: Optional[int],
                              max_concurrent: Optional[int]):
    what = f"the embedding model {type(model).__name__}"
    chunks = _fallback_chunks(texts, batch_size)
    loop = asyncio.get_running_loop()
    limit = asyncio.Semaphore(max_concurrent or 1)
    pool = ThreadPoolExecutor(max_workers=max_concurrent or 1, thread_name_prefix="semex-embed")

    async def one(chunk):
        async with limit:
            return await loop.run_in_executor(pool, model, chunk)
    try:
        results = await asyncio.gather(*(one(chunk) for _, chunk in chunks))
    finally:
        pool.shutdown(wait=False)
    parts = [(start, _as_matrix(r, len(chunk), what)) for (start, chunk), r in zip(chunks, results)]
    return _assemble(texts, parts, what)


# -- the functions -----------------------------------------------------------------------------

def _resolve(model: Any) -> Any:
    from .settings import settings

    return settings.resolve_rm(model)


def _check_mode(rm: Any, mode: Any) -> None:
    if _batch_api.resolve_mode(mode) is not None and not isinstance(rm, EmbeddingModel):
        raise E.ConfigurationError(
            "mode='batch' needs a semex.EmbeddingModel (the provider's Batch API); got "
            f"{type(rm).__name__}")


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "return"):
        raise E.ConfigurationError(f"on_error must be 'raise' or 'return', got {on_error!r}")


def _result(output: EmbeddingOutput, on_error: str):
    if output.ok:
        return output.embeddings
    failed = [e for e in output.errors if e is not None]
    if on_error == "return":
        E.warn_partial(f"embed: {len(failed)} of {len(output.errors)} texts failed (their "
                       f"rows are NaN); first: {failed[0]}")
        return output.embeddings
    raise E.BatchError(
        f"{len(failed)} of {len(output.errors)} texts failed to embed; first: {failed[0]} "
        "(.results holds the array with NaN rows for them, .errors the per-row errors)",
        results=output.embeddings, errors=output.errors)


def embed(texts: Sequence[str], model: Any = None, *, batch_size: Optional[int] = None,
          max_concurrent: Optional[int] = None, progress: Any = True,
          on_error: str = "raise", mode: Any = None):
    """Embed every text; return a C-contiguous float32 array (len(texts), dim), input order.

    model: an ``EmbeddingModel``, a model name, a callable ``texts -> matrix`` (run in worker
        threads: the synchronous fallback), or None for ``settings.rm``.
    batch_size: texts per request (at most the model's ``max_batch_inputs``).
    max_concurrent: most of this call's requests in flight at once.
    progress: a tqdm bar (True), none (False), or ``callback(done, total)``.
    on_error: "raise" (a ``BatchError`` after the run carrying the array and the per-row
        errors) or "return" (failed rows are NaN; one PartialFailureWarning says so).
    mode: "online" (default) or "batch" / a ``semex.BatchMode``: the provider's Batch API
        (half price; returns when the batch has ended; the same call run again resumes it).
    """
    _check_on_error(on_error)
    rm = _resolve(model)
    _check_mode(rm, mode)
    if isinstance(rm, EmbeddingModel):
        return _result(rm(texts, batch_size=batch_size, max_concurrent=max_concurrent,
                          progress=progress, mode=mode), on_error)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    return _run_fallback_sync(rm, check_texts(texts), batch_size, max_concurrent)


async def embed_async(texts: Sequence[str], model: Any = None, *,
                      batch_size: Optional[int] = None, max_concurrent: Optional[int] = None,
                      progress: Any = True, on_error: str = "raise", mode: Any = None):
    """Awaitable twin of :func:`embed` for any running asyncio loop."""
    _check_on_error(on_error)
    rm = _resolve(model)
    _check_mode(rm, mode)
    if isinstance(rm, EmbeddingModel):
        return _result(await rm.async_call(texts, batch_size=batch_size,
                                           max_concurrent=max_concurrent, progress=progress,
                                           mode=mode), on_error)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    return await _run_fallback_async(rm, check_texts(texts), batch_size, max_concurrent)
