"""sem_extract: structured fields from documents, LOTUS-compatible and faster.

Every call runs in rounds. The first round sends each distinct document once (identical
documents share one answer), ``batch_size`` documents per prompt when batch processing is on.
A batch whose answer is malformed, has the wrong number of rows or overflows the context is
split in half for the next round, down to single documents; a row that fails validation
against a typed schema is retried once with the validation error in the prompt. Nothing is
silently dropped: every document ends with a row or a typed error.

Prompts put the fixed instructions first and the documents last, so providers' prefix caches
hit across requests.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from . import errors as E
from ._models import ModelRunner
from ._schema import OutputSpec, RowInvalid, parse_json_answer
from .lm import LMOutput, Usage
from .progress import ProgressBar
from .settings import settings

logger = logging.getLogger("semex")

__all__ = ["sem_extract", "sem_extract_async", "SemanticExtractOutput"]


class EmptyDocumentError(E.RequestError):
    """The document had no text in any input column; nothing was sent for it."""


@dataclass
class SemanticExtractOutput:
    """``outputs[i]`` is the row extracted from ``docs[i]`` (a dict with every output column,
    values None where the row failed); ``errors[i]`` is None or the row's typed error;
    ``raw_outputs[i]`` the model's answer for that row; ``usage`` the run's accounting."""

    outputs: List[Dict[str, Any]]
    raw_outputs: List[Optional[str]]
    errors: List[Optional[E.RequestError]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    explanations: List[Optional[str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(e is not None for e in self.errors)


@dataclass
class _Task:
    uids: Tuple[int, ...]          # distinct documents in this prompt
    feedback: Optional[str] = None  # validation error to show the model (retry of one row)


_CONTEXT_MARKERS = ("context length", "context_length", "maximum context", "too many tokens",
                    "too long", "reduce the length", "context window")


def _is_context_overflow(err: E.RequestError) -> bool:
    if not isinstance(err, E.APIStatusError) or err.status not in (400, 413, 422):
        return False
    text = f"{err} {err.body or ''}".lower()
    return any(marker in text for marker in _CONTEXT_MARKERS)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN, NaT
    except (TypeError, ValueError):
        return True  # pandas.NA refuses to be a bool: it is missing by definition


def render_document(doc: Mapping[str, Any]) -> str:
    """A document dict as the model sees it: one "[column]: value" line per field; missing
    values (None, NaN, NA) are left out."""
    lines = []
    for key, value in doc.items():
        if isinstance(value, (list, tuple, dict)):
            value = json.dumps(value, ensure_ascii=False, default=str)
        elif _missing(value):
            continue
        text = value if isinstance(value, str) else str(value)
        if text.strip():
            lines.append(f"[{key}]: {text}")
    return "\n".join(lines)


class _Extraction:
    def __init__(self, docs: Sequence[Mapping[str, Any]], spec: OutputSpec, batch_size: int,
                 structured: Any):
        self.spec = spec
        self.batch_size = batch_size
        self.structured = structured
        self.n = len(docs)
        self.rows: List[Optional[Dict[str, Any]]] = [None] * self.n
        self.raw: List[Optional[str]] = [None] * self.n
        self.errors: List[Optional[E.RequestError]] = [None] * self.n
        # dedup: identical rendered documents are sent once
        self.texts: List[str] = []
        self.members: List[List[int]] = []
        seen: Dict[str, int] = {}
        for i, doc in enumerate(docs):
            text = render_document(doc)
            if not text:
                self.errors[i] = EmptyDocumentError(
                    f"row {i}: the document has no text in any input column; nothing sent",
                    index=i)
                continue
            uid = seen.get(text)
            if uid is None:
                uid = seen[text] = len(self.texts)
                self.texts.append(text)
                self.members.append([])
            self.members[uid].append(i)
        self.cache_hits = sum(len(m) - 1 for m in self.members)
        self.resolved = 0  # distinct documents with a final outcome
        uids = list(range(len(self.texts)))
        size = max(1, batch_size)
        self.tasks = [_Task(tuple(uids[k:k + size])) for k in range(0, len(uids), size)]
        self.usage = Usage()
        fields = spec.field_lines()
        common = ("You extract structured information from documents.\n"
                  f"Fields to extract:\n{fields}\n"
                  "Use null for a field the document does not give. Keep each value concise: "
                  "a word, number or short phrase, never an explanation.")
        if spec.extract_quotes:
            common += (' For every field X also return "X_quote": the exact words from the '
                       "document that support the value, copied verbatim (null if none).")
        keys = ", ".join(json.dumps(c) for c in spec.all_columns)
        self.system_single = (common + f"\nAnswer with one JSON object with the keys {keys}. "
                              "JSON only: no prose, no code fences.")
        self.system_batch = (common + "\nYou receive several numbered documents. Answer with "
                             'a JSON object {"results": [...]} holding exactly one object per '
                             'document, in the same order, each with "id" set to the '
                             f"document's number and the keys {keys}. "
                             "JSON only: no prose, no code fences.")
        self.rf_single = spec.response_format(structured, batch=False)
        self.rf_batch = spec.response_format(structured, batch=True)

    # -- prompts --------------------------------------------------------------------------
    def conversation(self, task: _Task) -> list:
        if len(task.uids) == 1:
            user = "Document:\n" + self.texts[task.uids[0]]
            if task.feedback:
                user += ("\n\nA previous answer for this document was rejected: "
                         f"{task.feedback}. Answer again, following the field types exactly.")
            return [{"role": "system", "content": self.system_single},
                    {"role": "user", "content": user}]
        parts = [f"{len(task.uids)} documents:"]
        for k, uid in enumerate(task.uids, 1):
            parts.append(f"Document {k}:\n{self.texts[uid]}")
        return [{"role": "system", "content": self.system_batch},
                {"role": "user", "content": "\n\n".join(parts)}]

    # -- outcomes -------------------------------------------------------------------------
    def _finish(self, uid: int, row: Optional[Dict[str, Any]], raw: Optional[str],
                error: Optional[E.RequestError]) -> None:
        self.resolved += 1
        for i in self.members[uid]:
            if error is None:
                self.rows[i] = dict(row) if row is not None else None
            else:
                self.errors[i] = _row_error(error, i)
            self.raw[i] = raw

    def absorb(self, task: _Task, content: Optional[str],
               error: Optional[E.RequestError]) -> List[_Task]:
        """Take one prompt's outcome; return the tasks it leaves for the next round."""
        uids = task.uids
        if error is not None:
            if len(uids) > 1 and (_is_context_overflow(error)
                                  or isinstance(error, E.ResponseFormatError)):
                return _halves(uids)
            for uid in uids:
                self._finish(uid, None, content, error)
            return []
        try:
            value = parse_json_answer(content)
        except ValueError as exc:
            return self._unreadable(task, content, str(exc))
        if len(uids) == 1:
            obj = value
            if isinstance(obj, dict) and isinstance(obj.get("results"), list) and \
                    len(obj["results"]) == 1 and not set(obj) & set(self.spec.columns):
                obj = obj["results"][0]
            if isinstance(obj, list) and len(obj) == 1:
                obj = obj[0]
            return self._take_row(task, uids[0], obj, content)
        items = value.get("results") if isinstance(value, dict) else value
        if not isinstance(items, list) or len(items) != len(uids) or \
                not all(isinstance(x, dict) for x in items):
            got = len(items) if isinstance(items, list) else type(items).__name__
            logger.debug("batch of %d got %s rows back; splitting", len(uids), got)
            return _halves(uids)
        ids = [x.get("id") for x in items]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
            if sorted(ids) != list(range(1, len(uids) + 1)):
                logger.debug("batch of %d answered with ids %s; splitting", len(uids), ids)
                return _halves(uids)
            items = [obj for _, obj in sorted(zip(ids, items), key=lambda p: p[0])]
        next_tasks: List[_Task] = []
        for uid, obj in zip(uids, items):
            next_tasks += self._take_row(_Task((uid,)), uid, obj,
                                         json.dumps(obj, ensure_ascii=False))
        return next_tasks

    def _take_row(self, task: _Task, uid: int, obj: Any, raw: Optional[str]) -> List[_Task]:
        try:
            row = self.spec.validate(obj)
        except RowInvalid as exc:
            return self._unreadable(task, raw, str(exc))
        self._finish(uid, row, raw, None)
        return []

    def _unreadable(self, task: _Task, raw: Optional[str], reason: str) -> List[_Task]:
        if len(task.uids) > 1:
            return _halves(task.uids)
        uid = task.uids[0]
        if task.feedback is None:
            # one more try for this document, telling the model what was wrong
            return [_Task((uid,), feedback=reason)]
        self._finish(uid, None, raw, E.ResponseFormatError(
            f"the answer did not match the requested fields: {reason}"))
        return []

    def output(self) -> SemanticExtractOutput:
        empty = {c: None for c in self.spec.all_columns}
        outputs = [row if row is not None else dict(empty) for row in self.rows]
        self.usage.failed = sum(e is not None for e in self.errors)
        return SemanticExtractOutput(outputs=outputs, raw_outputs=self.raw,
                                     errors=self.errors, usage=self.usage,
                                     explanations=[None] * self.n)


def _halves(uids: Tuple[int, ...]) -> List[_Task]:
    mid = (len(uids) + 1) // 2
    return [_Task(uids[:mid]), _Task(uids[mid:])]


def _row_error(error: E.RequestError, row: int) -> E.RequestError:
    message = str(error)
    if message.startswith("item "):
        message = message.split(": ", 1)[-1]
    new = type(error)(f"row {row}: {message}", index=row, status=error.status,
                      attempts=error.attempts, body=error.body)
    new.__cause__ = error.__cause__
    return new


def _check_docs(docs: Any) -> List[Mapping[str, Any]]:
    if isinstance(docs, (str, bytes, Mapping)) or not hasattr(docs, "__iter__"):
        raise E.ConfigurationError(
            "docs must be a list of dicts (column -> value), got " + type(docs).__name__)
    docs = list(docs)
    for i, doc in enumerate(docs):
        if not isinstance(doc, Mapping):
            raise E.ConfigurationError(
                f"docs[{i}] must be a dict (column -> value), got {type(doc).__name__}")
    return docs


def _check_common(batch_size: Any, on_error: str, max_concurrent_batches: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise E.ConfigurationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if on_error not in ("return", "raise"):
        raise E.ConfigurationError(f"on_error must be 'return' or 'raise', got {on_error!r}")
    if max_concurrent_batches is not None and (
            isinstance(max_concurrent_batches, bool) or
            not isinstance(max_concurrent_batches, int) or max_concurrent_batches < 1):
        raise E.ConfigurationError(
            f"max_concurrent_batches must be an integer >= 1, got {max_concurrent_batches!r}")


def _unsupported(prompt_strategy: Any) -> None:
    if prompt_strategy is not None:
        raise E.ConfigurationError("prompt_strategy is not supported by semex yet; pass None")


class _Run:
    """Shared set-up and bookkeeping of one sem_extract call (sync or async)."""

    def __init__(self, docs, model, output_cols, extract_quotes, batch_size,
                 use_batch_processing, max_concurrent_batches, progress, progress_bar_desc,
                 safe_mode, on_error, postprocessor, prompt_strategy):
        if output_cols is None:
            raise E.ConfigurationError("output_cols is required")
        _unsupported(prompt_strategy)
        _check_common(batch_size, on_error, max_concurrent_batches)
        self.docs = _check_docs(docs)
        self.spec = OutputSpec(output_cols, extract_quotes)
        model = settings.resolve_lm(model)
        self.runner = ModelRunner(model, max_concurrent_batches)
        structured = self.runner.structured
        self.state = _Extraction(self.docs, self.spec,
                                 batch_size if use_batch_processing else 1, structured)
        self.on_error = on_error
        self.postprocessor = postprocessor
        self.model = model
        self._stats0 = self._engine_stats()
        self.bar = ProgressBar(len(self.docs), progress_bar_desc, enabled=progress)
        self.bar.advance(len(self.docs) - sum(len(m) for m in self.state.members))
        if safe_mode:
            self.safe_mode_report()

    def safe_mode_report(self) -> None:
        state = self.state
        chars = sum(len(state.system_batch if len(t.uids) > 1 else state.system_single)
                    + sum(len(state.texts[u]) for u in t.uids) for t in state.tasks)
        tokens = chars // 4
        lines = [f"semex safe mode: {len(self.docs)} documents, {len(state.texts)} distinct, "
                 f"about {len(state.tasks)} calls and {tokens:,} prompt tokens"]
        cost = getattr(self.model, "_cost", None)
        if callable(cost):
            estimate = cost(tokens, 0)
            if estimate is not None:
                lines.append(f"  estimated prompt cost: {estimate:.4f}")
        sys.stderr.write("\n".join(lines) + "\n")
        logger.info("%s", " ".join(lines))

    def rounds(self) -> List[Tuple[List[_Task], List[list], Optional[dict], Callable]]:
        """The next round's calls: multi-document prompts and single-document prompts go
        in separate calls, each with the response format of its shape."""
        state = self.state
        tasks, state.tasks = state.tasks, []
        groups = [[t for t in tasks if len(t.uids) > 1], [t for t in tasks if len(t.uids) == 1]]
        calls = []
        base = self.bar.n
        for group, rf in zip(groups, (state.rf_batch, state.rf_single)):
            if not group:
                continue
            weights = [sum(len(state.members[u]) for u in t.uids) for t in group]
            average = sum(weights) / len(weights)
            cap = base + sum(weights)

            def tick(done: int, total: int, base=base, average=average, cap=cap) -> None:
                self.bar.update_to(min(cap, base + int(done * average)), self.stats())

            calls.append((group, [state.conversation(t) for t in group], rf, tick))
            base = cap
        return calls

    def _engine_stats(self) -> Dict[str, Any]:
        engine_stats = getattr(self.model, "engine_stats", None)
        return engine_stats() if callable(engine_stats) else {}

    def stats(self) -> Dict[str, Any]:
        """Progress-bar postfix figures for this run only."""
        now = self._engine_stats()
        figures = {k: now.get(k, 0) - self._stats0.get(k, 0)
                   for k in ("admitted", "retries", "http_429")}
        figures["tokens"] = self.state.usage.total_tokens
        figures["errors"] = sum(e is not None for e in self.state.errors)
        return figures

    def absorb(self, tasks: List[_Task], out: LMOutput) -> None:
        state = self.state
        state.usage.add(out.usage)
        for task, content, error in zip(tasks, out.outputs, out.errors):
            state.tasks += state.absorb(task, content, error)
        done_docs = sum(len(state.members[u]) for u in range(len(state.texts))
                        if _is_done(state, u))
        empty = len(self.docs) - sum(len(m) for m in state.members)
        self.bar.update_to(done_docs + empty, self.stats())

    def finish(self) -> SemanticExtractOutput:
        self.bar.close()
        result = self.state.output()
        result.usage.cache_hits = self.state.cache_hits
        result.usage.failed = result.failed
        if self.postprocessor is not None:
            self.apply_postprocessor(result)
        if result.failed:
            first = next(e for e in result.errors if e is not None)
            logger.warning("sem_extract: %d of %d rows failed; first: %s", result.failed,
                           len(result.outputs), first)
            if self.on_error == "raise":
                raise E.BatchError(
                    f"{result.failed} of {len(result.outputs)} rows failed; first: {first}. "
                    "The exception's .results holds every row computed.",
                    results=result, errors=result.errors)
        return result

    def apply_postprocessor(self, result: SemanticExtractOutput) -> None:
        ok = [i for i, e in enumerate(result.errors) if e is None]
        if not ok:
            return
        processed = self.postprocessor([result.raw_outputs[i] for i in ok], self.model, False)
        rows = getattr(processed, "outputs", processed)
        if not isinstance(rows, list) or len(rows) != len(ok):
            raise E.ConfigurationError("postprocessor must return one output per raw output")
        for i, row in zip(ok, rows):
            result.outputs[i] = row


def _is_done(state: _Extraction, uid: int) -> bool:
    first = state.members[uid][0]
    return state.rows[first] is not None or state.errors[first] is not None


def sem_extract(docs: Sequence[Mapping[str, Any]], model: Any = None,
                output_cols: Any = None, extract_quotes: bool = False,
                postprocessor: Optional[Callable] = None, return_raw_outputs: bool = False,
                safe_mode: bool = False, progress_bar_desc: str = "Extracting",
                use_batch_processing: bool = True, batch_size: int = 10,
                return_explanations: bool = False, prompt_strategy: Any = None, *,
                max_concurrent_batches: Optional[int] = None, progress: bool = True,
                on_error: str = "return") -> SemanticExtractOutput:
    """Extract ``output_cols`` from every document; rows come back in input order.

    Parameters (LOTUS's names and order)
    ----------
    docs: list of dicts, column -> value; each becomes "[column]: value" lines.
    model: a ``semex.LM``, an object with ``async_call``, a plain callable (the synchronous
        fallback), or None for ``settings.lm``.
    output_cols: ``{"name": "description or None", ...}`` or a pydantic model class
        (typed, validated values; a row failing validation is retried once with the error).
    extract_quotes: also return ``{name}_quote``, the verbatim supporting span.
    postprocessor: optional ``f(raw_outputs, model, cot) -> object with .outputs`` applied
        to the successful rows' raw answers.
    return_raw_outputs: kept for LOTUS compatibility (``raw_outputs`` is always filled).
    safe_mode: print the estimated calls, tokens and cost before sending anything.
    progress_bar_desc: the progress bar's label.
    use_batch_processing, batch_size: put ``batch_size`` documents in one prompt (split
        automatically when an answer is malformed or overflows the context).
    return_explanations, prompt_strategy: LOTUS compatibility (no chain-of-thought yet).
    max_concurrent_batches: most prompts in flight at once (default: the model's own cap).
    progress: show a tqdm progress bar (a widget in notebooks).
    on_error: "return" (failed rows carry typed errors in ``errors``) or "raise" (one
        ``BatchError`` after the run, carrying every partial result).

    Works inside a running event loop (a notebook cell): no event loop is used.
    """
    run = _Run(docs, model, output_cols, extract_quotes, batch_size, use_batch_processing,
               max_concurrent_batches, progress, progress_bar_desc, safe_mode, on_error,
               postprocessor, prompt_strategy)
    try:
        while run.state.tasks:
            for tasks, conversations, rf, tick in run.rounds():
                run.absorb(tasks, run.runner.call(conversations, rf, tick))
    finally:
        run.bar.close()
    return run.finish()


async def sem_extract_async(docs: Sequence[Mapping[str, Any]], model: Any = None,
                            output_cols: Any = None, extract_quotes: bool = False,
                            postprocessor: Optional[Callable] = None,
                            return_raw_outputs: bool = False, safe_mode: bool = False,
                            progress_bar_desc: str = "Extracting",
                            use_batch_processing: bool = True, batch_size: int = 10,
                            return_explanations: bool = False, prompt_strategy: Any = None,
                            *, max_concurrent_batches: Optional[int] = 3,
                            progress: bool = True,
                            on_error: str = "return") -> SemanticExtractOutput:
    """Awaitable twin of :func:`sem_extract` for any running asyncio loop (Jupyter
    included). ``max_concurrent_batches`` (default 3) limits prompts in flight; a plain
    callable model runs in worker threads so the loop never blocks."""
    run = _Run(docs, model, output_cols, extract_quotes, batch_size, use_batch_processing,
               max_concurrent_batches, progress, progress_bar_desc, safe_mode, on_error,
               postprocessor, prompt_strategy)
    try:
        while run.state.tasks:
            calls = run.rounds()
            outs = await asyncio.gather(*(run.runner.acall(conversations, rf, tick)
                                          for _, conversations, rf, tick in calls))
            for (tasks, _, _, _), out in zip(calls, outs):
                run.absorb(tasks, out)
    finally:
        run.bar.close()
    return run.finish()
