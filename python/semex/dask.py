"""semex on Dask: the same extraction over partitions, lazily, on the user's own cluster.

``import semex.dask`` registers ``ddf.sem_extract(input_cols, output_cols, ...)`` on Dask
DataFrames: a lazy Dask DataFrame with the extracted columns (the pandas accessor's, with
its options), built on ``map_partitions`` with the right ``meta``. ``semex.dask.llm_batch``
maps ``llm_batch`` over a Dask Bag or Series of prompts.

How a model reaches the workers: a ``semex.LM`` travels as its settings (:class:`LMSpec`),
never as threads or sockets, and each worker process builds one LM (one engine) per
distinct settings and reuses it for every partition it runs. The API key is **not** shipped
by default: workers read it from their own environment (``OPENAI_API_KEY``, or the
provider's variable); ``ship_api_key=True`` sends it with the tasks (it then sits in the
task graph, pickled). Other model objects (a callable, an object with ``async_call``) are
shipped as they are and must be picklable; so must a pydantic ``output_cols`` class (define
it in a module the workers can import, as for any Dask task).

One rate limit for the cluster: the ``rpm``/``tpm`` of the LM are the cluster's. With a
``distributed`` client (``cluster_limit=True``, the default when the LM has limits), a
scheduler plugin holds the cluster's token buckets and each worker's engine admits requests
only from budget it leases from there in chunks of about half a second of the cluster's
rate, asking for the next chunk while half of the last one is left — so no request waits on
a round trip to the scheduler, and the sum of what the workers send stays within the
buckets. A worker that leaves hands back what it last reported unused. The alternative,
``cluster_limit="split"``, gives each worker a fixed share (the limit divided by the number
of workers at submission; idle workers' shares are lost); ``False`` lets every worker apply
the LM's limits on its own. semex must be importable on the scheduler too.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

try:
    import dask.bag as db
    import dask.dataframe as dd
except ImportError as exc:  # pragma: no cover - exercised only without dask installed
    raise ImportError("semex.dask needs dask: pip install 'semex[dask]' "
                      "(dask[dataframe] and distributed)") from exc
import numpy as np
import pandas as pd

from . import errors as E
from ._schema import OutputSpec
from .extract import _strategy
from .lm import LM
from .settings import settings

__all__ = ["LMSpec", "llm_batch"]

logger = logging.getLogger("semex")


class LMSpec:
    """A ``semex.LM`` as settings another process can rebuild: picklable, small, without
    the API key unless ``ship_api_key`` (its repr never shows the key either way)."""

    def __init__(self, lm: LM, ship_api_key: bool = False):
        if not isinstance(ship_api_key, bool):
            raise E.ConfigurationError(f"ship_api_key must be True or False, got "
                                       f"{ship_api_key!r}")
        self.args: Dict[str, Any] = dict(lm._args)
        self.key: Optional[str] = lm._LM__api_key if ship_api_key else None
        # a key given to the LM on the driver but not shipped: workers must have their own
        self.driver_had_key = lm._LM__api_key is not None
        self.token = hashlib.sha256(repr(sorted(self.args.items())).encode()).hexdigest()
        self.cluster = False  # lease from the scheduler's budget (see the module doc)

    def __dask_tokenize__(self) -> tuple:
        return ("semex.LMSpec", self.token, self.key is not None, self.cluster)

    def __repr__(self) -> str:
        return (f"LMSpec(model={self.args.get('model')!r}, api_base="
                f"{self.args.get('api_base')!r}, api_key="
                f"{'<shipped>' if self.key else '<from the worker environment>'})")

    def build(self) -> LM:
        try:
            lm = LM(api_key=self.key, **self.args)
            if self.cluster:
                _LeaseKeeper(lm, self).attach()
            return lm
        except E.ConfigurationError as exc:
            if "no API key" not in str(exc):
                raise
            where = _worker_name()
            raise E.ConfigurationError(
                f"{exc} — on Dask worker {where}. semex does not ship API keys to workers: "
                "set the key variable in the workers' environment, or pass "
                "ship_api_key=True to send it with the tasks.") from None


_worker_lms: Dict[tuple, LM] = {}
_worker_lock = threading.Lock()
_lm_builds = 0  # LMs this process built from specs (one per distinct settings)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def _model_for(model: Any) -> Any:
    """The model object in this (worker) process: an LMSpec becomes this process's one LM
    for those settings, built on first use and reused by every later partition."""
    global _lm_builds
    if not isinstance(model, LMSpec):
        return model
    key = (model.token, model.key, model.cluster)
    with _worker_lock:
        lm = _worker_lms.get(key)
        if lm is None:
            lm = model.build()
            _worker_lms[key] = lm
            _lm_builds += 1
        return lm


def _shippable(model: Any, ship_api_key: bool, cluster_limit: Any = True) -> Any:
    """What goes into the task graph for ``model``, with its cluster-wide limit set up."""
    if cluster_limit not in (True, False, "split"):
        raise E.ConfigurationError(
            f"cluster_limit must be True (a budget leased from the scheduler), 'split' (a "
            f"fixed share per worker) or False, got {cluster_limit!r}")
    model = settings.resolve_lm(model)
    if not isinstance(model, LM):
        return model
    spec = LMSpec(model, ship_api_key)
    if not (model.rpm or model.tpm) or cluster_limit is False:
        return spec
    client = _client()
    if client is None:
        logger.info("semex.dask: no distributed client; the LM's rpm/tpm apply per process")
        return spec
    if cluster_limit == "split":
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        for name in ("rpm", "tpm"):
            if spec.args.get(name):
                spec.args[name] = spec.args[name] / workers
        spec.token = hashlib.sha256(repr(sorted(spec.args.items())).encode()).hexdigest()
        return spec
    _install_budget(client)
    spec.cluster = True
    return spec


def _client() -> Any:
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


# -- the cluster-wide budget -----------------------------------------------------------------

_PLUGIN = "semex-budget"


def _install_budget(client: Any) -> None:
    def installed(dask_scheduler: Any) -> bool:
        return _PLUGIN in dask_scheduler.plugins

    if not client.run_on_scheduler(installed):
        client.register_plugin(_BudgetPlugin(), name=_PLUGIN)


class _Bucket:
    """requests (or tokens) per second with a burst of one second's worth; None: unlimited."""

    def __init__(self, per_minute: float, now: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.t = now

    def take(self, want: float, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now
        granted = max(0.0, min(want, self.level))
        self.level -= granted
        return granted

    def wait(self, need: float) -> float:
        """Seconds until ``need`` is there."""
        return max(0.0, need - self.level) / self.rate

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + max(0.0, amount))


class _Budget:
    """One LM's cluster-wide rpm/tpm, on the scheduler: leases come out of its buckets, at
    most a fair share of a burst per worker at a time (the burst divided among the workers
    that asked in the last ACTIVE_S seconds), so the first worker to ask cannot drain it."""

    ACTIVE_S = 2.0

    def __init__(self, rpm: float, tpm: float, now: float):
        self.requests = _Bucket(rpm, now) if rpm else None
        self.tokens = _Bucket(tpm, now) if tpm else None
        self.held: Dict[str, Tuple[float, float]] = {}  # worker -> unused, as last reported
        self.asked: Dict[str, float] = {}               # worker -> when it last asked

    def lease(self, worker: str, want_requests: float, want_tokens: float,
              left_requests: float, left_tokens: float, now: float) -> Dict[str, float]:
        self.asked[worker] = now
        active = sum(1 for t in self.asked.values() if now - t < self.ACTIVE_S)
        if self.requests:
            want_requests = min(want_requests, max(1.0, self.requests.capacity / active))
        if self.tokens:
            want_tokens = min(want_tokens, max(1.0, self.tokens.capacity / active))
        granted_r = self.requests.take(want_requests, now) if self.requests else want_requests
        granted_t = self.tokens.take(want_tokens, now) if self.tokens else want_tokens
        self.held[worker] = (max(0.0, left_requests) + granted_r,
                             max(0.0, left_tokens) + granted_t)
        retry = 0.0  # when a lease that got little is worth asking for again
        if self.requests and granted_r < want_requests / 2:
            retry = max(retry, self.requests.wait(want_requests / 2))
        if self.tokens and granted_t < want_tokens / 2:
            retry = max(retry, self.tokens.wait(want_tokens / 2))
        return {"requests": granted_r, "tokens": granted_t, "retry_after": retry}

    def forget(self, worker: str) -> None:
        self.asked.pop(worker, None)
        unused = self.held.pop(worker, None)
        if unused is not None:
            if self.requests:
                self.requests.give_back(unused[0])
            if self.tokens:
                self.tokens.give_back(unused[1])


try:
    from distributed.diagnostics.plugin import SchedulerPlugin as _SchedulerPlugin
except ImportError:  # pragma: no cover - semex.dask without distributed: no cluster budget
    _SchedulerPlugin = object


class _BudgetPlugin(_SchedulerPlugin):
    """Lives on the Dask scheduler: answers the workers' ``semex_lease`` requests."""

    name = _PLUGIN

    def __init__(self) -> None:
        self.budgets: Dict[str, _Budget] = {}

    async def start(self, scheduler: Any) -> None:
        scheduler.handlers["semex_lease"] = self.lease

    def lease(self, name: str = "", worker: str = "", rpm: float = 0.0, tpm: float = 0.0,
              want_requests: float = 0.0, want_tokens: float = 0.0,
              left_requests: float = 0.0, left_tokens: float = 0.0) -> Dict[str, float]:
        now = time.monotonic()
        budget = self.budgets.get(name)
        if budget is None:
            budget = self.budgets[name] = _Budget(rpm, tpm, now)
        return budget.lease(worker, want_requests, want_tokens, left_requests, left_tokens,
                            now)

    def remove_worker(self, scheduler: Any = None, worker: str = "", **kwargs: Any) -> None:
        for budget in self.budgets.values():
            budget.forget(worker)


class _LeaseKeeper:
    """In a worker process: keeps its LM's engine supplied with budget from the scheduler,
    from the thread that waits on the LM's calls (LM._tick_hook; every ~10 ms of a wait)."""

    CHUNK_S = 0.5   # one lease: this many seconds of the cluster's rate
    RETRY_S = 0.05  # the longest wait before asking again after a short grant

    def __init__(self, lm: LM, spec: LMSpec):
        from distributed import get_worker

        self.lm = lm
        self.worker = get_worker()
        self.name = spec.token
        self.rpm = float(spec.args.get("rpm") or 0.0)
        self.tpm = float(spec.args.get("tpm") or 0.0)
        self.want_requests = max(1.0, self.rpm / 60.0 * self.CHUNK_S) if self.rpm else 1e9
        self.want_tokens = max(1.0, self.tpm / 60.0 * self.CHUNK_S) if self.tpm else 0.0
        self.next_ask = 0.0
        self.lock = threading.Lock()

    def attach(self) -> None:
        self.lm._lease_from(self, tokens=bool(self.tpm))
        self.tick()  # the first chunk before the first request wants it

    def tick(self) -> None:
        if time.monotonic() < self.next_ask or not self.lock.acquire(blocking=False):
            return
        try:
            engine = self.lm._engine.get()
            left_r, left_t, _, _ = engine.lease()
            if left_r >= self.want_requests / 2 and (
                    not self.tpm or left_t >= self.want_tokens / 2):
                return
            from distributed.utils import sync

            answer = sync(self.worker.loop, self.worker.scheduler.semex_lease,
                          name=self.name, worker=self.worker.address, rpm=self.rpm,
                          tpm=self.tpm, want_requests=max(0.0, self.want_requests - left_r),
                          want_tokens=max(0.0, self.want_tokens - left_t),
                          left_requests=left_r, left_tokens=left_t)
            engine.grant(answer["requests"], answer["tokens"])
            # short of budget: ask again soon for what has refilled by then (at most 20
            # round trips a second), rather than wait for a whole chunk
            self.next_ask = time.monotonic() + min(self.RETRY_S, answer["retry_after"])
        finally:
            self.lock.release()


# -- ddf.sem_extract ----------------------------------------------------------------------------

def _text_dtype() -> Any:
    return pd.Series(["text", None]).dtype  # str with NaN under pandas 3, else object


def _output_dtypes(spec: OutputSpec, return_raw_outputs: bool, return_explanations: bool,
                   error_col: Optional[str]) -> Dict[str, Any]:
    """One dtype per added column, the same for every partition (a partition where a typed
    column has a failed row must not turn int64 into float64 while its neighbours stay
    int64): nullable Int64/boolean/Float64 for typed numbers and flags, text for text,
    object for lists and structures."""
    text = _text_dtype()
    dtypes: Dict[str, Any] = {}
    for name in spec.columns:
        dtype: Any = text
        if spec.model is not None:
            annotation = spec.model.model_fields[name].annotation
            dtype = {int: "Int64", float: "Float64", bool: "boolean", str: text}.get(
                annotation, text if _is_enum(annotation) else object)
        dtypes[name] = dtype
    for name in spec.quote_columns:
        dtypes[name] = text
    if return_raw_outputs:
        dtypes["raw_output"] = text
    if return_explanations:
        dtypes["explanation"] = text
    dtypes[error_col or "extract_error"] = text
    return dtypes


def _is_enum(annotation: Any) -> bool:
    import enum

    return isinstance(annotation, type) and issubclass(annotation, enum.Enum)


def _cast(frame: pd.DataFrame, dtypes: Dict[str, Any]) -> pd.DataFrame:
    for name, dtype in dtypes.items():
        if name not in frame.columns:
            frame[name] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        if dtype is object:
            frame[name] = frame[name].astype(object)
        elif frame[name].dtype != dtype:
            values = frame[name].astype(object).where(frame[name].notna(), None)
            frame[name] = pd.array(values.tolist(), dtype=dtype)
    return frame


class _Outputs:
    """output_cols on their way to the workers, with a token Dask can compute: a pydantic
    class defined in a function or a notebook cell has none of its own."""

    def __init__(self, output_cols: Any):
        self.value = output_cols

    def __dask_tokenize__(self) -> tuple:
        import json

        cols = self.value
        if isinstance(cols, type):
            schema = cols.model_json_schema() if hasattr(cols, "model_json_schema") else None
            return ("semex.outputs", cols.__module__, cols.__qualname__,
                    json.dumps(schema, sort_keys=True, default=str))
        return ("semex.outputs", json.dumps(cols, sort_keys=True, default=str))


def _extract_partition(part: pd.DataFrame, model: Any, input_cols: List[str],
                       outputs: _Outputs, options: Dict[str, Any],
                       dtypes: Dict[str, Any]) -> pd.DataFrame:
    from . import accessor  # noqa: F401  (registers df.sem_extract in this process)

    out = part.sem_extract(input_cols, outputs.value, model=_model_for(model), **options)
    return _cast(out, dtypes)


@dd.extensions.register_dataframe_accessor("sem_extract")
class DaskSemExtractAccessor:
    """``ddf.sem_extract(input_cols, output_cols, ...)``: :meth:`df.sem_extract
    <semex.accessor.SemExtractAccessor>` over every partition, lazily.

    Takes the pandas accessor's parameters (``batch_size``, ``max_concurrent_batches``,
    ``strategy``, ``on_error``, ``error_col``, ``overwrite``, ...) plus ``ship_api_key``
    and ``cluster_limit`` (see the module doc). ``progress`` defaults to False: bars from worker processes only
    clutter their logs. Returns a Dask DataFrame; nothing runs until it is computed."""

    def __init__(self, ddf: Any):
        self._ddf = ddf

    def __call__(self, input_cols: Any, output_cols: Any, extract_quotes: bool = False,
                 postprocessor: Any = None, return_raw_outputs: bool = False,
                 safe_mode: bool = False, progress_bar_desc: str = "Extracting",
                 return_explanations: bool = False, strategy: Any = None, *,
                 model: Any = None, ship_api_key: bool = False, cluster_limit: Any = True,
                 progress: Any = False, error_col: Optional[str] = "extract_error",
                 **options: Any) -> Any:
        ddf = self._ddf
        cols = [input_cols] if isinstance(input_cols, str) else list(input_cols)
        missing = [c for c in cols if c not in ddf.columns]
        if not cols or missing:
            raise E.ConfigurationError(
                f"input column(s) {missing or cols} not found in the Dask DataFrame; it has "
                f"{list(map(str, ddf.columns))}")
        spec = OutputSpec(output_cols, extract_quotes,
                          reasoning=_strategy(strategy, options.get("prompt_strategy"))
                          == "cot")
        dtypes = _output_dtypes(spec, return_raw_outputs, return_explanations, error_col)
        settled = dict(options, extract_quotes=extract_quotes, postprocessor=postprocessor,
                       return_raw_outputs=return_raw_outputs, safe_mode=safe_mode,
                       progress_bar_desc=progress_bar_desc,
                       return_explanations=return_explanations, strategy=strategy,
                       progress=progress, error_col=error_col)
        # check every option where it can fail early: on the driver, on the empty meta
        meta = ddf._meta.sem_extract(cols, output_cols, model=_NeverCalled(), **settled)
        meta = _cast(meta, dtypes)
        shipped = _shippable(model, ship_api_key, cluster_limit)
        return ddf.map_partitions(_extract_partition, shipped, cols, _Outputs(output_cols),
                                  settled, dtypes, meta=meta)


class _NeverCalled:
    """The model for building ``meta`` from an empty partition: nothing is sent."""

    def __call__(self, messages_batch: Any) -> List[str]:  # pragma: no cover
        raise AssertionError("meta is built from an empty frame: no model call")


# -- llm_batch over Bags and Series -------------------------------------------------------------

def _batch_partition(prompts: Sequence[Any], model: Any, max_concurrent: int,
                     kwargs: Dict[str, Any]) -> list:
    from .batch import llm_batch as _llm_batch

    return list(_llm_batch(list(prompts), _model_for(model), max_concurrent, **kwargs))


def _batch_series(part: pd.Series, model: Any, max_concurrent: int,
                  kwargs: Dict[str, Any]) -> pd.Series:
    answers = _batch_partition(part.tolist(), model, max_concurrent, kwargs)
    return pd.Series(np.array(answers, dtype=object), index=part.index, name=part.name)


def llm_batch(prompts: Any, model: Any = None, max_concurrent: int = 10, *,
              ship_api_key: bool = False, cluster_limit: Any = True, **kwargs: Any) -> Any:
    """:func:`semex.llm_batch` over a Dask Bag (returns a Bag of answers) or a Dask Series
    of prompts (returns a Series of answers with the same index), partition by partition.
    Failed items are ``ErrorText`` strings ("Error: ...") unless ``errors="objects"``."""
    shipped = _shippable(model, ship_api_key, cluster_limit)
    if isinstance(prompts, db.Bag):
        return prompts.map_partitions(_batch_partition, shipped, max_concurrent, kwargs)
    if isinstance(prompts, dd.Series):
        meta = pd.Series([], dtype=object, name=prompts.name)
        return prompts.map_partitions(_batch_series, shipped, max_concurrent, kwargs,
                                      meta=meta)
    raise E.ConfigurationError("semex.dask.llm_batch takes a dask.bag.Bag or a "
                               f"dask.dataframe.Series, got {type(prompts).__name__}")
