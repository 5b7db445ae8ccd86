"""The plain map primitive and the helpers RLM-style programs are written against.

``llm_batch(prompts)`` returns one entry per prompt, in input order: the answer text, or for
an item that failed in the end an :class:`~semex.errors.ErrorText` — a ``str`` reading
``"Error: <message>"`` that carries the typed exception in ``.error`` — so programs written
against ``List[str]`` run unchanged (``errors="objects"`` puts the exception itself in the
item's place, ``errors="raise"`` raises one ``BatchError`` after the run). One failure never
costs the other answers. The returned list also carries the call's ``.usage`` (tokens,
requests, cost) and ``.errors`` (None or the typed error, per item).

A prompt that is itself a failure from an earlier stage (an ``ErrorText`` or an exception
object) is passed through to the same place in the result without being sent
(``error_items="pass"``, the default) or sent as its text (``error_items="send"``), so a
multi-stage pipeline never raises on its second stage.

``llm_query(prompt)`` is the single-prompt form; ``map_reduce`` maps a template over chunks
and reduces the answers with a second template, in rounds that fit the context.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

from .errors import (BatchError, ConfigurationError, ErrorText, RequestError,
                     check_error_shape, shape_results)
from .lm import LM, LMOutput, Usage
from .settings import settings

__all__ = ["Results", "llm_batch", "llm_batch_async", "llm_query", "llm_query_async",
           "map_reduce", "map_reduce_async", "parallel_query", "parallel_query_async"]

Prompt = Union[str, Sequence[dict]]


class Results(list):
    """The answers of one ``llm_batch``/``parallel_query`` call, in input order (a plain
    ``list`` in every other respect), with the call's ``usage`` and per-item ``errors``."""

    usage: Usage
    errors: List[Optional[RequestError]]


def _conversations(prompts: Sequence[Prompt], system_prompt: Optional[str]) -> List[list]:
    conversations = []
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            conversations.append(system + [{"role": "user", "content": prompt}])
        elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            conversations.append(system + list(prompt))
        else:
            raise ConfigurationError(
                f"prompts[{i}] must be a str or a list of message dicts, got "
                f"{type(prompt).__name__}")
    return conversations


def _upstream_failures(prompts: Sequence[Any], error_items: str
                       ) -> Tuple[List[Any], List[int], List[Optional[RequestError]]]:
    """(prompts to send, their positions, per-position upstream failure or None).

    An ErrorText or exception object among the prompts is a failure from an earlier stage:
    kept in its place unsent ("pass") or sent as its "Error: ..." text ("send")."""
    if isinstance(prompts, (str, bytes)):
        raise ConfigurationError("prompts must be a list of strings, not a single string")
    if error_items not in ("pass", "send"):
        raise ConfigurationError(
            "error_items must be 'pass' (a failed item from an earlier stage keeps its place "
            f"unsent) or 'send' (it is sent as its text), got {error_items!r}")
    prompts = list(prompts)
    failures: List[Optional[RequestError]] = [None] * len(prompts)
    if set(map(type, prompts)) <= {str}:  # the usual case: nothing from a failed stage
        return prompts, list(range(len(prompts))), failures
    send: List[Any] = []
    positions: List[int] = []
    for i, prompt in enumerate(prompts):
        upstream = prompt.error if isinstance(prompt, ErrorText) else (
            prompt if isinstance(prompt, RequestError) else None)
        if upstream is not None and error_items == "pass":
            failures[i] = upstream
            continue
        send.append(str(ErrorText(prompt)) if isinstance(prompt, RequestError) else prompt)
        positions.append(i)
    return send, positions, failures


def _finish(n: int, positions: List[int], failures: List[Optional[RequestError]],
            output: Optional[LMOutput], errors: str) -> Results:
    outputs: List[Optional[str]] = [None] * n
    if output is not None and len(positions) == n:  # every prompt was sent
        outputs = list(output.outputs)
        failures = list(output.errors) if output.errors else [None] * n
    elif output is not None:
        for k, i in enumerate(positions):
            outputs[i] = output.outputs[k]
            failures[i] = output.errors[k] if output.errors else None
    results = Results()
    results.usage = output.usage if output is not None else Usage()
    results.errors = failures
    return shape_results(outputs, failures, errors, results)


def _uses_prompt_path(lm: Any, method: str) -> bool:
    """semex's own LM (not a subclass overriding the call): plain-string prompts go straight
    into request bodies, with no message dicts built."""
    return isinstance(lm, LM) and getattr(type(lm), method) is getattr(LM, method)


def llm_batch(prompts: Sequence[Prompt], model: Any = None, max_concurrent: int = 10, *,
              system_prompt: Optional[str] = None, progress: Any = None,
              errors: str = "text", error_items: str = "pass", mode: Any = None,
              **request_fields: Any) -> Results:
    """Answer every prompt; return the answers in input order.

    prompts: strings (sent as the user message) or ready conversations (lists of messages).
    model: an ``LM``, a model name, or None for ``settings.lm``.
    max_concurrent: most of this call's requests in flight at once.
    system_prompt: prepended as a system message to every prompt.
    progress: True for a progress bar, or a callable ``progress(done, total)``.
    errors: how a failed item looks: "text" (an ``ErrorText``, "Error: ..."), "objects"
        (the typed exception) or "raise" (one ``BatchError`` after the run).
    error_items: a prompt that is a failure from an earlier stage is passed through unsent
        ("pass") or sent as its text ("send").
    mode: "online" (default) or "batch" / a ``semex.BatchMode``: the provider's Batch API
        (half price; returns when the batch has ended; a re-run resumes it).
    request_fields: extra request body fields (``max_tokens=...``, ``response_format=...``).

    The result is a list (``.usage``, ``.errors`` attached). Works inside a running event
    loop (no loop is used).
    """
    check_error_shape(errors)
    send, positions, failures = _upstream_failures(prompts, error_items)
    output = None
    if send:
        lm = settings.resolve_lm(model)
        if _uses_prompt_path(lm, "__call__"):
            output = lm._run_prompts(send, system_prompt, progress, max_concurrent,
                                     request_fields, mode=mode)
        else:
            if mode is not None:
                request_fields["mode"] = mode
            output = lm(_conversations(send, system_prompt), progress=progress,
                        max_concurrent=max_concurrent, **request_fields)
    return _finish(len(failures), positions, failures, output, errors)


async def llm_batch_async(prompts: Sequence[Prompt], model: Any = None,
                          max_concurrent: int = 10, *, system_prompt: Optional[str] = None,
                          progress: Any = None, errors: str = "text",
                          error_items: str = "pass", mode: Any = None,
                          **request_fields: Any) -> Results:
    """Awaitable twin of :func:`llm_batch` for any running asyncio loop."""
    check_error_shape(errors)
    send, positions, failures = _upstream_failures(prompts, error_items)
    output = None
    if send:
        lm = settings.resolve_lm(model)
        if _uses_prompt_path(lm, "async_call"):
            output = await lm._run_prompts_async(send, system_prompt, progress,
                                                 max_concurrent, request_fields, mode=mode)
        else:
            if mode is not None:
                request_fields["mode"] = mode
            output = await lm.async_call(_conversations(send, system_prompt),
                                         progress=progress, max_concurrent=max_concurrent,
                                         **request_fields)
    return _finish(len(failures), positions, failures, output, errors)


def _fill(template: str, chunks: Sequence[Any], placeholder: str = "{chunk}") -> List[Any]:
    if not isinstance(template, str) or placeholder not in template:
        raise ConfigurationError(
            f"template must be a str containing the {placeholder} placeholder")
    if isinstance(chunks, (str, bytes)):
        raise ConfigurationError("chunks must be a list of strings, not a single string")
    prompts: List[Any] = []
    for i, chunk in enumerate(chunks):
        if isinstance(chunk, (ErrorText, RequestError)):
            prompts.append(chunk)  # a failure from an earlier stage: llm_batch decides
        elif not isinstance(chunk, str):
            raise ConfigurationError(f"chunks[{i}] must be a str, got {type(chunk).__name__}")
        else:
            # replace, not format: templates often hold literal braces (JSON examples)
            prompts.append(template.replace(placeholder, chunk))
    return prompts


def _fill_sent(template: str, prompts: List[Any], error_items: str) -> List[Any]:
    """Failed chunks that are to be sent get the template around their text too."""
    if error_items != "send":
        return prompts
    return [template.replace("{chunk}", str(ErrorText(p) if isinstance(p, RequestError)
                                            else p))
            if isinstance(p, (ErrorText, RequestError)) else p for p in prompts]


def parallel_query(template: str, chunks: Sequence[str], model: Any = None,
                   max_concurrent: int = 10, **kwargs: Any) -> Results:
    """``llm_batch`` over ``template`` with ``{chunk}`` replaced by each chunk (a chunk
    that is a failed item of an earlier stage is passed through: see ``error_items``)."""
    prompts = _fill_sent(template, _fill(template, chunks), kwargs.get("error_items", "pass"))
    return llm_batch(prompts, model, max_concurrent, **kwargs)


async def parallel_query_async(template: str, chunks: Sequence[str], model: Any = None,
                               max_concurrent: int = 10, **kwargs: Any) -> Results:
    """Awaitable twin of :func:`parallel_query`."""
    prompts = _fill_sent(template, _fill(template, chunks), kwargs.get("error_items", "pass"))
    return await llm_batch_async(prompts, model, max_concurrent, **kwargs)


def _single(prompt: Any) -> list:
    if isinstance(prompt, dict):
        return [[prompt]]
    if isinstance(prompt, (str, list, tuple)):
        return [prompt]
    raise ConfigurationError("prompt must be a str, a message dict or a list of message "
                             f"dicts, got {type(prompt).__name__}")


def _one(results: Results, errors: str) -> str:
    answer = results[0]
    if errors == "raise" and isinstance(answer, ErrorText):
        raise answer.error
    return answer


def llm_query(prompt: Any, model: Any = None, *, system_prompt: Optional[str] = None,
              errors: str = "text", **request_fields: Any) -> str:
    """One prompt -> its answer text (works inside a running event loop). A failure is an
    ``ErrorText`` ("Error: ...", typed exception in ``.error``); ``errors="raise"`` raises
    the typed exception instead; "objects" returns it."""
    check_error_shape(errors)
    shape = "text" if errors == "raise" else errors
    return _one(llm_batch(_single(prompt), model, 1, system_prompt=system_prompt,
                          errors=shape, **request_fields), errors)


async def llm_query_async(prompt: Any, model: Any = None, *,
                          system_prompt: Optional[str] = None, errors: str = "text",
                          **request_fields: Any) -> str:
    """Awaitable twin of :func:`llm_query`."""
    check_error_shape(errors)
    shape = "text" if errors == "raise" else errors
    return _one(await llm_batch_async(_single(prompt), model, 1, system_prompt=system_prompt,
                                      errors=shape, **request_fields), errors)


# -- map_reduce -----------------------------------------------------------------------------

_DEFAULT_CONTEXT_TOKENS = 16384  # when the LM does not say (max_ctx_len)
_SEPARATOR = "\n\n"


class _Reduction:
    """The rounds of a map_reduce's reduce step: groups of answers that fit the context
    budget are reduced in parallel, then their answers, until one is left. A group the
    provider still finds too long (context overflow) is halved and tried again."""

    def __init__(self, reduce_template: str, placeholder: str, budget_chars: int):
        self.template = reduce_template
        self.placeholder = placeholder
        self.budget = budget_chars

    def groups(self, answers: List[str]) -> List[List[str]]:
        groups: List[List[str]] = []
        size = 0
        for answer in answers:
            cost = len(answer) + len(_SEPARATOR)
            if groups and size + cost <= self.budget:
                groups[-1].append(answer)
                size += cost
            else:
                groups.append([answer])
                size = cost
        if len(answers) > 1 and len(groups) == len(answers):
            # every answer alone fills the budget: pair them, or the rounds never end (the
            # provider says whether a pair fits; an overflow ends as an error)
            groups = [answers[k:k + 2] for k in range(0, len(answers), 2)]
        return groups

    def prompt(self, group: List[str]) -> str:
        return self.template.replace(self.placeholder, _SEPARATOR.join(group))


def _reduce_placeholder(reduce_template: Any) -> str:
    if isinstance(reduce_template, str):
        for placeholder in ("{answers}", "{chunk}"):
            if placeholder in reduce_template:
                return placeholder
    raise ConfigurationError("reduce_template must be a str containing the {answers} "
                             "placeholder (where the mapped answers go)")


def _budget(lm: Any, max_context_tokens: Optional[int], template: str,
            request_fields: dict) -> int:
    tokens = max_context_tokens or getattr(lm, "max_ctx_len", None) or _DEFAULT_CONTEXT_TOKENS
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ConfigurationError(
            f"max_context_tokens must be an integer >= 1, got {max_context_tokens!r}")
    answer = request_fields.get("max_tokens") or getattr(lm, "max_tokens", None) or 0
    # characters/4 estimates tokens; leave the answer's room and the template's own text
    return max(256, (tokens - int(answer)) * 4 - len(template))


def _map_reduce_plan(template, chunks, reduce_template, model, max_context_tokens, errors,
                     request_fields):
    """(the model, the steps generator): every check before anything is sent."""
    check_error_shape(errors)
    placeholder = _reduce_placeholder(reduce_template)
    prompts = _fill(template, chunks)
    if not prompts:
        raise ConfigurationError("chunks is empty: nothing to map")
    lm = settings.resolve_lm(model)
    reduction = _Reduction(reduce_template, placeholder,
                           _budget(lm, max_context_tokens, reduce_template, request_fields))
    return lm, _map_reduce_steps(prompts, reduction, errors)


def _map_reduce_steps(prompts: List[Any], reduction: _Reduction, errors: str):
    """The whole map_reduce as a generator: it yields each round's prompts and is sent that
    round's Results, so the sync and async drivers share one algorithm. Returns the final
    answer or the ErrorText that ended it."""
    from .extract import _is_context_overflow

    mapped = yield prompts
    answers = [a for a in mapped if not isinstance(a, ErrorText)]
    failed = len(mapped) - len(answers)
    if failed:
        first = next(e for e in mapped.errors if e is not None)
        if errors == "raise":
            raise BatchError(f"map_reduce: {failed} of {len(mapped)} mapped chunks failed; "
                             f"first: {first}", results=mapped, errors=mapped.errors)
        if not answers:
            return ErrorText(first)
        import logging

        logging.getLogger("semex").warning(
            "map_reduce: %d of %d mapped chunks failed and are left out of the reduction; "
            "first: %s", failed, len(mapped), first)
    while True:  # a round: every group of answers that fits becomes one answer
        slots: List[Tuple[bool, Any]] = [(False, g) for g in reduction.groups(answers)]
        while not all(done for done, _ in slots):
            todo = [group for done, group in slots if not done]
            results = yield [reduction.prompt(group) for group in todo]
            outcome = iter(zip(todo, results, results.errors))
            resolved: List[Tuple[bool, Any]] = []
            for done, value in slots:
                if done:
                    resolved.append((True, value))
                    continue
                group, answer, error = next(outcome)
                if error is None:
                    resolved.append((True, answer))
                elif len(group) > 1 and _is_context_overflow(error):
                    mid = (len(group) + 1) // 2  # still too long for the provider: halve it
                    resolved += [(False, group[:mid]), (False, group[mid:])]
                else:
                    return answer  # the ErrorText of the group that failed
            slots = resolved
        answers = [value for _, value in slots]
        if len(answers) == 1:
            return answers[0]


def _map_reduce_result(final: str, errors: str) -> Any:
    if isinstance(final, ErrorText) and errors != "text":
        if errors == "raise":
            raise final.error
        return final.error
    return final


def map_reduce(template: str, chunks: Sequence[str], reduce_template: str,
               model: Any = None, max_concurrent: int = 10, *,
               system_prompt: Optional[str] = None, max_context_tokens: Optional[int] = None,
               errors: str = "text", progress: Any = None, **request_fields: Any) -> str:
    """Map ``template`` over ``chunks`` (``{chunk}``), then synthesize the answers with
    ``reduce_template`` (``{answers}``: the answers joined by blank lines).

    When the answers do not fit ``max_context_tokens`` (default: the LM's ``max_ctx_len``,
    else 16,384; estimated as characters/4), they are reduced in groups that fit, in
    parallel, and the groups' answers again, until one answer is left; a group the provider
    still rejects as too long is halved. Failed chunks are left out of the reduction (with a
    warning; ``errors="raise"`` raises ``BatchError`` instead). Returns the final answer, or
    the ``ErrorText`` of the failure that ended it (``errors="raise"``: raised;
    ``"objects"``: the exception). Works inside a running event loop."""
    lm, steps = _map_reduce_plan(template, chunks, reduce_template, model,
                                 max_context_tokens, errors, request_fields)
    bar: Any = progress
    try:
        round_prompts = next(steps)
        while True:
            results = llm_batch(round_prompts, lm, max_concurrent,
                                system_prompt=system_prompt, progress=bar, **request_fields)
            bar = None  # the bar follows the map stage
            round_prompts = steps.send(results)
    except StopIteration as stop:
        return _map_reduce_result(stop.value, errors)


async def map_reduce_async(template: str, chunks: Sequence[str], reduce_template: str,
                           model: Any = None, max_concurrent: int = 10, *,
                           system_prompt: Optional[str] = None,
                           max_context_tokens: Optional[int] = None, errors: str = "text",
                           progress: Any = None, **request_fields: Any) -> str:
    """Awaitable twin of :func:`map_reduce`."""
    lm, steps = _map_reduce_plan(template, chunks, reduce_template, model,
                                 max_context_tokens, errors, request_fields)
    bar: Any = progress
    try:
        round_prompts = next(steps)
        while True:
            results = await llm_batch_async(round_prompts, lm, max_concurrent,
                                            system_prompt=system_prompt, progress=bar,
                                            **request_fields)
            bar = None
            round_prompts = steps.send(results)
    except StopIteration as stop:
        return _map_reduce_result(stop.value, errors)
