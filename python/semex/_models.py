"""The model contract for extraction: semex.LM, objects with ``async_call``, plain callables.

- ``semex.LM``: requests go through the C engine (structured output, limits, retries).
- anything with ``async_call(messages_batch)``: awaited (in the sync API, called through its
  ``__call__``).
- any other callable ``model(messages_batch)``, e.g. a wrapper around a local HF pipeline:
  the synchronous fallback. The sync API simply calls it; the async API runs its calls in
  worker threads, one conversation per call, at most ``max_concurrent`` at once, so the
  event loop never blocks.
A model returns an object with ``.outputs`` (a list of str) or a plain list of str, one per
conversation.
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable, List, Optional

from . import errors as E
from .batch_api import check_supported, resolve_mode
from .lm import LM, LMOutput, Usage

Progress = Optional[Callable[[int, int], None]]


class Prompts:
    """One call's prompts: a system message they all share and one user message each.
    semex's LM splices each user text into a pre-encoded request body; other models get
    the conversations (``[system, user]`` message lists)."""

    __slots__ = ("system", "users")

    def __init__(self, system: str, users: List[str]):
        self.system = system
        self.users = users

    def conversations(self) -> List[list]:
        system = {"role": "system", "content": self.system}
        return [[system, {"role": "user", "content": user}] for user in self.users]

    def __len__(self) -> int:
        return len(self.users)


class ModelCallError(E.RequestError):
    """A user-supplied model raised or returned something unusable for this item."""


def _normalize(result: Any, n: int, first_index: int = 0) -> LMOutput:
    outputs = getattr(result, "outputs", result)
    if isinstance(outputs, str) and n == 1:
        outputs = [outputs]
    if not isinstance(outputs, (list, tuple)) or len(outputs) != n:
        got = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        err = f"the model returned {got} outputs for {n} prompts"
        return LMOutput(outputs=[None] * n,
                        errors=[ModelCallError(f"item {first_index + i}: {err}",
                                               index=first_index + i) for i in range(n)],
                        usage=Usage(failed=n))
    errors = list(getattr(result, "errors", None) or [None] * n)
    usage = getattr(result, "usage", None)
    texts: List[Optional[str]] = []
    for i, text in enumerate(outputs):
        if text is None or isinstance(text, str):
            texts.append(text)
        else:
            texts.append(None)
            errors[i] = ModelCallError(
                f"item {first_index + i}: the model returned {type(text).__name__}, not str",
                index=first_index + i)
    return LMOutput(outputs=texts, errors=errors,
                    usage=usage if isinstance(usage, Usage) else Usage())


def _failure(exc: BaseException, n: int, first_index: int = 0) -> LMOutput:
    errors = []
    for i in range(n):
        err = ModelCallError(f"item {first_index + i}: the model raised "
                             f"{type(exc).__name__}: {exc}", index=first_index + i)
        err.__cause__ = exc
        errors.append(err)
    return LMOutput(outputs=[None] * n, errors=errors, usage=Usage(failed=n))


class ModelRunner:
    """Runs one round of conversations through whatever model the user gave."""

    def __init__(self, model: Any, max_concurrent: Optional[int], mode: Any = None):
        if model is None or not (callable(model) or hasattr(model, "async_call")):
            raise E.ConfigurationError(
                "model must be a semex.LM, an object with async_call(messages_batch), or a "
                f"callable model(messages_batch); got {type(model).__name__}")
        self.model = model
        self.max_concurrent = max_concurrent
        self.is_lm = isinstance(model, LM)
        self.mode = resolve_mode(mode)
        if self.mode is not None:
            if not self.is_lm:
                raise E.ConfigurationError(
                    "mode='batch' needs a semex.LM (the provider's Batch API); got "
                    f"{type(model).__name__}")
            check_supported(model, "the model")
        # the call keyword for the LM, given only when not online (a subclass's own
        # __call__ need not know it)
        self.mode_kw = {"mode": self.mode} if self.mode is not None else {}
        self.structured = getattr(model, "structured_output", False) if self.is_lm else False
        # semex's own LM (not a subclass with its own call): the prompt path, no dicts
        self.fast_sync = self.is_lm and type(model).__call__ is LM.__call__
        self.fast_async = self.is_lm and type(model).async_call is LM.async_call

    def call(self, prompts: Prompts, response_format: Optional[dict],
             progress: Progress) -> LMOutput:
        if self.is_lm:
            fields = {"response_format": response_format} if response_format else {}
            if self.fast_sync:
                return self.model._run_prompts(prompts.users, prompts.system, progress,
                                               self.max_concurrent, fields, mode=self.mode)
            return self.model(prompts.conversations(), progress=progress,
                              max_concurrent=self.max_concurrent, **fields, **self.mode_kw)
        conversations = prompts.conversations()
        try:
            result = self.model(conversations)
            if inspect.isawaitable(result):
                raise E.ConfigurationError(
                    "the model's __call__ returned an awaitable; use the async API "
                    "(sem_extract_async / async_extract) with it")
        except E.ConfigurationError:
            raise
        except Exception as exc:
            return _failure(exc, len(conversations))
        out = _normalize(result, len(conversations))
        if progress:
            progress(len(conversations), len(conversations))
        return out

    @property
    def can_start(self) -> bool:
        """Whether ``start`` can run calls side by side from a synchronous caller: semex's
        own LM, online."""
        return self.fast_sync and self.mode is None

    def start(self, prompts: Prompts, response_format: Optional[dict],
              progress: Progress) -> Any:
        """``call``, started and left running: an lm._Running (see ``can_start``)."""
        fields = {"response_format": response_format} if response_format else {}
        return self.model._start_prompts(prompts.users, prompts.system, progress,
                                         self.max_concurrent, fields)

    async def acall(self, prompts: Prompts, response_format: Optional[dict],
                    progress: Progress) -> LMOutput:
        n = len(prompts)
        if self.is_lm:
            fields = {"response_format": response_format} if response_format else {}
            if self.fast_async:
                return await self.model._run_prompts_async(
                    prompts.users, prompts.system, progress, self.max_concurrent, fields,
                    mode=self.mode)
            return await self.model.async_call(prompts.conversations(), progress=progress,
                                               max_concurrent=self.max_concurrent, **fields,
                                               **self.mode_kw)
        conversations = prompts.conversations()
        if hasattr(self.model, "async_call"):
            try:
                result = await self.model.async_call(conversations)
            except Exception as exc:
                return _failure(exc, n)
            out = _normalize(result, n)
            if progress:
                progress(n, n)
            return out
        # The synchronous fallback: one conversation per call, in worker threads.
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(self.max_concurrent or 4)
        done = 0
        outputs: List[Optional[str]] = [None] * n
        errors: List[Optional[E.RequestError]] = [None] * n

        async def one(i: int) -> None:
            nonlocal done
            async with limit:
                try:
                    result = await loop.run_in_executor(None, self.model, [conversations[i]])
                    single = _normalize(result, 1, i)
                except Exception as exc:
                    single = _failure(exc, 1, i)
            outputs[i] = single.outputs[0]
            errors[i] = single.errors[0]
            done += 1
            if progress:
                progress(done, n)

        await asyncio.gather(*(one(i) for i in range(n)))
        return LMOutput(outputs=outputs, errors=errors,
                        usage=Usage(failed=sum(e is not None for e in errors)))
