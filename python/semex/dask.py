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

Rate limits: ``rpm``/``tpm`` on the LM apply in each worker process. For one limit across
the cluster give each worker its share (``LM(rpm=total / n_workers)``); a cluster-wide
budget the workers lease is not built yet.
"""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Any, Dict, List, Optional, Sequence

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

    def __dask_tokenize__(self) -> tuple:
        return ("semex.LMSpec", self.token, self.key is not None)

    def __repr__(self) -> str:
        return (f"LMSpec(model={self.args.get('model')!r}, api_base="
                f"{self.args.get('api_base')!r}, api_key="
                f"{'<shipped>' if self.key else '<from the worker environment>'})")

    def build(self) -> LM:
        try:
            return LM(api_key=self.key, **self.args)
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
    key = (model.token, model.key)
    with _worker_lock:
        lm = _worker_lms.get(key)
        if lm is None:
            lm = model.build()
            _worker_lms[key] = lm
            _lm_builds += 1
        return lm


def _shippable(model: Any, ship_api_key: bool) -> Any:
    model = settings.resolve_lm(model)
    return LMSpec(model, ship_api_key) if isinstance(model, LM) else model


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
    (see the module doc). ``progress`` defaults to False: bars from worker processes only
    clutter their logs. Returns a Dask DataFrame; nothing runs until it is computed."""

    def __init__(self, ddf: Any):
        self._ddf = ddf

    def __call__(self, input_cols: Any, output_cols: Any, extract_quotes: bool = False,
                 postprocessor: Any = None, return_raw_outputs: bool = False,
                 safe_mode: bool = False, progress_bar_desc: str = "Extracting",
                 return_explanations: bool = False, strategy: Any = None, *,
                 model: Any = None, ship_api_key: bool = False, progress: Any = False,
                 error_col: Optional[str] = "extract_error", **options: Any) -> Any:
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
        shipped = _shippable(model, ship_api_key)
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
              ship_api_key: bool = False, **kwargs: Any) -> Any:
    """:func:`semex.llm_batch` over a Dask Bag (returns a Bag of answers) or a Dask Series
    of prompts (returns a Series of answers with the same index), partition by partition.
    Failed items are ``ErrorText`` strings ("Error: ...") unless ``errors="objects"``."""
    shipped = _shippable(model, ship_api_key)
    if isinstance(prompts, db.Bag):
        return prompts.map_partitions(_batch_partition, shipped, max_concurrent, kwargs)
    if isinstance(prompts, dd.Series):
        meta = pd.Series([], dtype=object, name=prompts.name)
        return prompts.map_partitions(_batch_series, shipped, max_concurrent, kwargs,
                                      meta=meta)
    raise E.ConfigurationError("semex.dask.llm_batch takes a dask.bag.Bag or a "
                               f"dask.dataframe.Series, got {type(prompts).__name__}")
