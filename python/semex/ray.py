"""semex on Ray Data: the same extraction in actors that keep their engine.

    import ray, semex, semex.ray
    lm = semex.LM("gpt-4o-mini", rpm=5000)
    out = ds.map_batches(semex.ray.SemExtract, batch_format="pandas", concurrency=4,
                         fn_constructor_kwargs={"input_cols": ["text"],
                                                "output_cols": {"product": None},
                                                "model": lm, "batch_size": 10})

Each actor runs :meth:`df.sem_extract <semex.accessor.SemExtractAccessor>` on its batches
with one LM (one engine) built once, in its constructor. The LM reaches the actors as its
settings (``LM`` pickles without its key): actors read the key from their environment
(``ray.init(runtime_env={"env_vars": {"OPENAI_API_KEY": ...}})``). The LM's ``rpm``/``tpm``
are the cluster's: the actors lease budget from one detached Ray actor holding the buckets
(``cluster_limit=True``, the default; ``False`` lets each actor apply the full limits).
Result columns have one dtype whatever the batch (nullable ``Int64``/``boolean``/``Float64``
for typed fields), so Ray's blocks agree.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised only without ray installed
    raise ImportError("semex.ray needs Ray: pip install 'semex[ray]'") from exc

from . import errors as E
from ._remote import Budgets, LMSpec, cast_columns, model_for, output_dtypes
from ._schema import OutputSpec
from .extract import _strategy
from .lm import LM

__all__ = ["SemExtract"]

_BUDGET_ACTOR = "semex-budget"
_NAMESPACE = "semex"


@ray.remote(num_cpus=0)
class _BudgetActor:
    """The cluster's budgets (see semex._remote.Budgets); actors that go quiet for a while
    hand back what they last reported unused."""

    def __init__(self) -> None:
        self.budgets = Budgets()

    def lease(self, **request: Any) -> Dict[str, float]:
        return self.budgets.lease(**request)


class _RayBudget:
    """How an actor's LeaseKeeper reaches the budget actor (picklable: a handle)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def who(self) -> str:
        context = ray.get_runtime_context()
        return str(context.get_actor_id() or f"pid {os.getpid()}")

    def lease(self, **request: Any) -> Dict[str, float]:
        return ray.get(self.actor.lease.remote(**request))


def _budget() -> _RayBudget:
    actor = _BudgetActor.options(name=_BUDGET_ACTOR, namespace=_NAMESPACE,
                                 get_if_exists=True, lifetime="detached").remote()
    return _RayBudget(actor)


class SemExtract:
    """A callable class for ``ray.data.Dataset.map_batches(..., batch_format="pandas")``.

    Constructor (``fn_constructor_kwargs``): ``input_cols``, ``output_cols``, ``model`` (a
    ``semex.LM`` or any picklable model; default ``settings.lm`` in the actor),
    ``cluster_limit`` (see the module doc), and the pandas accessor's options
    (``batch_size``, ``max_concurrent_batches``, ``strategy``, ``on_error``, ...;
    ``progress`` defaults to False)."""

    def __init__(self, input_cols: Any, output_cols: Any, model: Any = None, *,
                 cluster_limit: bool = True, **options: Any):
        if cluster_limit not in (True, False):
            raise E.ConfigurationError(
                f"cluster_limit must be True or False, got {cluster_limit!r}")
        self.input_cols: List[str] = [input_cols] if isinstance(input_cols, str) \
            else list(input_cols)
        self.output_cols = output_cols
        options.setdefault("progress", False)
        self.options = options
        if isinstance(model, LM) and cluster_limit and (model.rpm or model.tpm):
            # this process's LM for these settings, bounded by the cluster's budget
            model = model_for(LMSpec(model, budget=_budget()))
        self.model = model
        spec = OutputSpec(output_cols, options.get("extract_quotes", False),
                          reasoning=_strategy(options.get("strategy"),
                                              options.get("prompt_strategy")) == "cot")
        self.dtypes = output_dtypes(spec, options.get("return_raw_outputs", False),
                                    options.get("return_explanations", False),
                                    options.get("error_col", "extract_error"))

    def __call__(self, batch: Any) -> Any:
        from . import accessor  # noqa: F401  (registers df.sem_extract in this process)

        out = batch.sem_extract(self.input_cols, self.output_cols, model=self.model,
                                **self.options)
        return cast_columns(out, self.dtypes)
