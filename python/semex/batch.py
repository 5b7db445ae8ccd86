"""The plain map primitive: one prompt in, one answer out, in input order.

``llm_batch(prompts)`` returns a list with one entry per prompt: the answer text for each
success, and for an item that failed in the end its typed error (an exception instance,
never a string that could pass for an answer). One failure never costs the other answers.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from .errors import ConfigurationError, RequestError
from .lm import LM, LMOutput
from .settings import settings

__all__ = ["llm_batch", "llm_batch_async", "parallel_query", "parallel_query_async"]

Prompt = Union[str, Sequence[dict]]
Result = Union[str, RequestError]


def _conversations(prompts: Sequence[Prompt], system_prompt: Optional[str]) -> List[list]:
    if isinstance(prompts, (str, bytes)):
        raise ConfigurationError("prompts must be a list of strings, not a single string")
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


def _merge(output: LMOutput) -> List[Result]:
    return [err if err is not None else text for text, err in zip(output.outputs, output.errors)]


def llm_batch(prompts: Sequence[Prompt], model: Any = None, max_concurrent: int = 10, *,
              system_prompt: Optional[str] = None, progress=None,
              **request_fields: Any) -> List[Result]:
    """Answer every prompt; return the answers in input order.

    prompts: strings (sent as the user message) or ready conversations (lists of messages).
    model: an ``LM``, a model name, or None for ``settings.lm``.
    max_concurrent: most of this call's requests in flight at once.
    system_prompt: prepended as a system message to every prompt.
    progress: optional ``callback(done, total)``.
    request_fields: extra request body fields (``max_tokens=...``, ``response_format=...``).

    Each entry is the answer ``str``, or a ``semex.errors.RequestError`` instance for an
    item that failed after its retries. Works inside a running event loop (no loop is used).
    """
    lm = settings.resolve_lm(model)
    if isinstance(lm, LM) and type(lm).__call__ is LM.__call__:
        # semex's own LM: plain-string prompts go straight into request bodies
        output = lm._run_prompts(prompts, system_prompt, progress, max_concurrent,
                                 request_fields)
    else:
        output = lm(_conversations(prompts, system_prompt), progress=progress,
                    max_concurrent=max_concurrent, **request_fields)
    return _merge(output)


async def llm_batch_async(prompts: Sequence[Prompt], model: Any = None,
                          max_concurrent: int = 10, *, system_prompt: Optional[str] = None,
                          progress=None, **request_fields: Any) -> List[Result]:
    """Awaitable twin of :func:`llm_batch` for any running asyncio loop."""
    lm = settings.resolve_lm(model)
    if isinstance(lm, LM) and type(lm).async_call is LM.async_call:
        output = await lm._run_prompts_async(prompts, system_prompt, progress,
                                             max_concurrent, request_fields)
    else:
        output = await lm.async_call(_conversations(prompts, system_prompt), progress=progress,
                                     max_concurrent=max_concurrent, **request_fields)
    return _merge(output)


def _fill(template: str, chunks: Sequence[str]) -> List[str]:
    if not isinstance(template, str) or "{chunk}" not in template:
        raise ConfigurationError("template must be a str containing the {chunk} placeholder")
    if isinstance(chunks, (str, bytes)):
        raise ConfigurationError("chunks must be a list of strings, not a single string")
    prompts = []
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, str):
            raise ConfigurationError(f"chunks[{i}] must be a str, got {type(chunk).__name__}")
        # replace, not format: templates often hold literal braces (JSON examples)
        prompts.append(template.replace("{chunk}", chunk))
    return prompts


def parallel_query(template: str, chunks: Sequence[str], model: Any = None,
                   max_concurrent: int = 10, **kwargs: Any) -> List[Result]:
    """``llm_batch`` over ``template`` with ``{chunk}`` replaced by each chunk."""
    return llm_batch(_fill(template, chunks), model, max_concurrent, **kwargs)


async def parallel_query_async(template: str, chunks: Sequence[str], model: Any = None,
                               max_concurrent: int = 10, **kwargs: Any) -> List[Result]:
    """Awaitable twin of :func:`parallel_query`."""
    return await llm_batch_async(_fill(template, chunks), model, max_concurrent, **kwargs)
