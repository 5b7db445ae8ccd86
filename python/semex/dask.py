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

import logging
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
from ._remote import Budgets, LMSpec, cast_columns, model_for, output_dtypes
from ._schema import OutputSpec
from .extract import _strategy
from .lm import LM
from .settings import settings

__all__ = ["LMSpec", "llm_batch"]

logger = logging.getLogger("semex")


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
    if not (model.rpm or model.tpm or spec.deployment_limits) or cluster_limit is False:
        return spec
    client = _client()
    if client is None:
        logger.info("semex.dask: no distributed client; the LM's rpm/tpm apply per process")
        return spec
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    if cluster_limit == "split":
        spec.share(workers)
        return spec
    # Each deployment's own rpm/tpm: a fixed share per worker (not leased yet); the LM's
    # rpm/tpm, if any, leased from the scheduler.
    spec.share(workers, deployments_only=True)
    if not (model.rpm or model.tpm):
        return spec
    _install_budget(client)
    spec.budget = _DaskBudget()
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


try:
    from distributed.diagnostics.plugin import SchedulerPlugin as _SchedulerPlugin
except ImportError:  # pragma: no cover - semex.dask without distributed: no cluster budget
    _SchedulerPlugin = object


class _BudgetPlugin(_SchedulerPlugin):
    """Lives on the Dask scheduler: answers the workers' ``semex_lease`` requests from the
    cluster's budgets; a worker that leaves hands back what it last reported unused."""

    name = _PLUGIN

    def __init__(self) -> None:
        self.budgets = Budgets()

    async def start(self, scheduler: Any) -> None:
        scheduler.handlers["semex_lease"] = self.lease

    def lease(self, **request: Any) -> Dict[str, float]:
        return self.budgets.lease(**request)

    def remove_worker(self, scheduler: Any = None, worker: str = "", **kwargs: Any) -> None:
        self.budgets.forget(worker)


class _DaskBudget:
    """How a worker's LeaseKeeper reaches the scheduler's budgets: an RPC to the plugin's
    handler on the worker's own connection (a round trip of a millisecond or so, made from
    the thread that waits on the LM, while half of the last lease is still there)."""

    def who(self) -> str:
        from distributed import get_worker

        return str(get_worker().address)

    def lease(self, **request: Any) -> Dict[str, float]:
        from distributed import get_worker
        from distributed.utils import sync

        worker = get_worker()
        return sync(worker.loop, worker.scheduler.semex_lease, **request)


# -- ddf.sem_extract ----------------------------------------------------------------------------

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

    out = part.sem_extract(input_cols, outputs.value, model=model_for(model), **options)
    return cast_columns(out, dtypes)


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
        dtypes = output_dtypes(spec, return_raw_outputs, return_explanations, error_col)
        settled = dict(options, extract_quotes=extract_quotes, postprocessor=postprocessor,
                       return_raw_outputs=return_raw_outputs, safe_mode=safe_mode,
                       progress_bar_desc=progress_bar_desc,
                       return_explanations=return_explanations, strategy=strategy,
                       progress=progress, error_col=error_col)
        # check every option where it can fail early: on the driver, on the empty meta
        meta = ddf._meta.sem_extract(cols, output_cols, model=_NeverCalled(), **settled)
        meta = cast_columns(meta, dtypes)
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

    return list(_llm_batch(list(prompts), model_for(model), max_concurrent, **kwargs))


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
