"""What running semex in other processes (Dask workers, Ray actors) needs, whatever runs them.

- :class:`LMSpec`: an LM as settings another process can rebuild, never with its threads and
  only with its API key when asked; an ``LM`` pickles as one (``LM.__reduce__``), key left
  out, so any framework that pickles its arguments can ship it.
- :func:`model_for`: in the receiving process, one LM per distinct settings, built on
  first use and reused by every later partition or batch (one engine per process).
- :class:`Budget` and :class:`LeaseKeeper`: one rpm/tpm for many processes. A Budget (token
  buckets) lives in one place — the Dask scheduler, a Ray actor — and hands out leases;
  each process's keeper tops its engine's lease up (``Engine.grant``) from the thread that
  waits on the LM's calls, asking for the next chunk while half of the last one is left.
  How a keeper reaches the budget is the framework's business: a ``BudgetRef`` with
  ``lease(**request) -> dict`` and ``who() -> str``, picklable.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any, Dict, Optional, Tuple

from . import errors as E
from .lm import LM

# extra_headers whose names say they carry a credential: left out of pickles like the key
_SECRET_HEADER_WORDS = ("authorization", "key", "token", "secret", "cookie", "password")


class LMSpec:
    """A ``semex.LM`` as settings another process can rebuild: picklable, small, without
    the API key (or credential-looking extra headers) unless ``ship_api_key``; its repr
    never shows the key either way. ``budget``: a BudgetRef whose leases bound the
    rebuilt LM (a cluster-wide rpm/tpm), or None for the LM's own limits."""

    def __init__(self, lm: LM, ship_api_key: bool = False, budget: Any = None):
        if not isinstance(ship_api_key, bool):
            raise E.ConfigurationError(f"ship_api_key must be True or False, got "
                                       f"{ship_api_key!r}")
        self.args: Dict[str, Any] = dict(lm._args)
        headers = self.args.get("extra_headers")
        if headers and not ship_api_key:
            self.args["extra_headers"] = {
                k: v for k, v in dict(headers).items()
                if not any(word in k.lower() for word in _SECRET_HEADER_WORDS)}
        self.key: Optional[str] = lm._LM__api_key if ship_api_key else None
        if lm.deployments:  # each its own key: shipped in its settings, or not at all
            self.key = None
            self.args["deployments"] = [d.settings(ship_api_key) for d in lm.deployments]
        self.budget = budget
        self.token = _settings_token(self.args)

    def __dask_tokenize__(self) -> tuple:
        return ("semex.LMSpec", self.token, self.key is not None, self.budget is not None)

    def __repr__(self) -> str:
        if self.args.get("deployments"):
            return (f"LMSpec(model={self.args.get('model')!r}, deployments="
                    f"{[d['api_base'] for d in self.args['deployments']]!r})")
        return (f"LMSpec(model={self.args.get('model')!r}, api_base="
                f"{self.args.get('api_base')!r}, api_key="
                f"{'<shipped>' if self.key else '<from the environment>'})")

    def share(self, parts: int, deployments_only: bool = False) -> None:
        """Divide the rpm/tpm by ``parts`` (a fixed share per process): the LM's (unless
        ``deployments_only``) and each deployment's."""
        for name in ("rpm", "tpm"):
            if self.args.get(name) and not deployments_only:
                self.args[name] = self.args[name] / parts
            for d in self.args.get("deployments") or ():
                if d.get(name):
                    d[name] = d[name] / parts
        self.token = _settings_token(self.args)

    @property
    def deployment_limits(self) -> bool:
        """Whether a deployment has an rpm/tpm of its own."""
        return any(d.get("rpm") or d.get("tpm") for d in self.args.get("deployments") or ())

    def build(self) -> LM:
        try:
            lm = LM(api_key=self.key, **self.args)
        except E.ConfigurationError as exc:
            if "no API key" not in str(exc):
                raise
            raise E.ConfigurationError(
                f"{exc} — in worker process {os.getpid()} on {os.uname().nodename}. semex "
                "does not ship API keys to other processes: set the key variable in the "
                "workers' environment, or pass ship_api_key=True to send it along.") from None
        if self.budget is not None:
            LeaseKeeper(lm, self).attach()
        return lm


def _settings_token(args: Dict[str, Any]) -> str:
    return hashlib.sha256(repr(sorted(args.items())).encode()).hexdigest()


_lms: Dict[tuple, LM] = {}
_lock = threading.Lock()
lm_builds = 0  # LMs this process built from specs (one per distinct settings)


def model_for(model: Any) -> Any:
    """The model object in this process: an LMSpec becomes this process's one LM for those
    settings, built on first use and reused afterwards; anything else is itself."""
    global lm_builds
    if not isinstance(model, LMSpec):
        return model
    key = (model.token, model.key, model.budget is not None)
    with _lock:
        lm = _lms.get(key)
        if lm is None:
            lm = model.build()
            _lms[key] = lm
            lm_builds += 1
        return lm


def rebuild(spec: LMSpec) -> LM:
    """Unpickling an LM: this process's LM for those settings."""
    return model_for(spec)


# -- one dtype per result column, whichever partition or batch -------------------------------

def _text_dtype() -> Any:
    import pandas as pd

    return pd.Series(["text", None]).dtype  # str with NaN under pandas 3, else object


def output_dtypes(spec: Any, return_raw_outputs: bool, return_explanations: bool,
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


def cast_columns(frame: Any, dtypes: Dict[str, Any]) -> Any:
    """``frame`` with the columns of ``output_dtypes`` in those dtypes (missing ones added)."""
    import pandas as pd

    for name, dtype in dtypes.items():
        if name not in frame.columns:
            frame[name] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        if dtype is object:
            frame[name] = frame[name].astype(object)
        elif frame[name].dtype != dtype:
            values = frame[name].astype(object).where(frame[name].notna(), None)
            frame[name] = pd.array(values.tolist(), dtype=dtype)
    return frame


class Bucket:
    """requests (or tokens) per second with a burst of one second's worth."""

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


class Budget:
    """One LM's rpm/tpm for many processes: leases come out of its buckets, at most a fair
    share of a burst per process at a time (the burst divided among the processes that
    asked in the last ACTIVE_S seconds), so the first to ask cannot drain it. A process
    that leaves (``forget``), or goes quiet for STALE_S, hands back what it last reported
    unused."""

    ACTIVE_S = 2.0
    STALE_S = 10.0

    def __init__(self, rpm: float, tpm: float, now: float):
        self.requests = Bucket(rpm, now) if rpm else None
        self.tokens = Bucket(tpm, now) if tpm else None
        self.held: Dict[str, Tuple[float, float]] = {}  # process -> unused, last reported
        self.asked: Dict[str, float] = {}               # process -> when it last asked

    def lease(self, who: str, want_requests: float, want_tokens: float,
              left_requests: float, left_tokens: float, now: float) -> Dict[str, float]:
        for other, when in list(self.asked.items()):
            if other != who and now - when > self.STALE_S:
                self.forget(other)
        self.asked[who] = now
        active = sum(1 for t in self.asked.values() if now - t < self.ACTIVE_S)
        if self.requests:
            want_requests = min(want_requests, max(1.0, self.requests.capacity / active))
        if self.tokens:
            want_tokens = min(want_tokens, max(1.0, self.tokens.capacity / active))
        granted_r = self.requests.take(want_requests, now) if self.requests else want_requests
        granted_t = self.tokens.take(want_tokens, now) if self.tokens else want_tokens
        self.held[who] = (max(0.0, left_requests) + granted_r,
                          max(0.0, left_tokens) + granted_t)
        retry = 0.0  # when a lease that got little is worth asking for again
        if self.requests and granted_r < want_requests / 2:
            retry = max(retry, self.requests.wait(want_requests / 2))
        if self.tokens and granted_t < want_tokens / 2:
            retry = max(retry, self.tokens.wait(want_tokens / 2))
        return {"requests": granted_r, "tokens": granted_t, "retry_after": retry}

    def forget(self, who: str) -> None:
        self.asked.pop(who, None)
        unused = self.held.pop(who, None)
        if unused is not None:
            if self.requests:
                self.requests.give_back(unused[0])
            if self.tokens:
                self.tokens.give_back(unused[1])


class Budgets:
    """The budgets of every LM a cluster runs, by settings token (what a Dask scheduler
    plugin or a Ray actor holds)."""

    def __init__(self) -> None:
        self.budgets: Dict[str, Budget] = {}

    def lease(self, name: str = "", who: str = "", rpm: float = 0.0, tpm: float = 0.0,
              want_requests: float = 0.0, want_tokens: float = 0.0,
              left_requests: float = 0.0, left_tokens: float = 0.0) -> Dict[str, float]:
        now = time.monotonic()
        budget = self.budgets.get(name)
        if budget is None:
            budget = self.budgets[name] = Budget(rpm, tpm, now)
        return budget.lease(who, want_requests, want_tokens, left_requests, left_tokens, now)

    def forget(self, who: str) -> None:
        for budget in self.budgets.values():
            budget.forget(who)


class LeaseKeeper:
    """In a worker process: keeps its LM's engine supplied with budget from a BudgetRef,
    from the thread that waits on the LM's calls (LM._tick_hook; every ~10 ms of a wait)."""

    CHUNK_S = 0.5   # one lease: this many seconds of the cluster's rate
    RETRY_S = 0.05  # the longest wait before asking again after a short grant

    def __init__(self, lm: LM, spec: LMSpec):
        self.lm = lm
        self.ref = spec.budget
        self.who = spec.budget.who()
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
            answer = self.ref.lease(
                name=self.name, who=self.who, rpm=self.rpm, tpm=self.tpm,
                want_requests=max(0.0, self.want_requests - left_r),
                want_tokens=max(0.0, self.want_tokens - left_t),
                left_requests=left_r, left_tokens=left_t)
            engine.grant(answer["requests"], answer["tokens"])
            # short of budget: ask again soon for what has refilled by then (at most 20
            # round trips a second), rather than wait for a whole chunk
            self.next_ask = time.monotonic() + min(self.RETRY_S, answer["retry_after"])
        finally:
            self.lock.release()
