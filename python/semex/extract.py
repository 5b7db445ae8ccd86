"""sem_extract: structured fields from documents, LOTUS-compatible and faster.

Documents stream through in chunks (at least 1,024 prompts' worth and eight concurrency
rounds), so memory follows the chunk, not the number of rows: a chunk's documents are rendered
when it is read, each finished row goes straight to the caller's result storage (a list of
dicts here, compact per-column arrays for the DataFrame accessor), and a chunk's working
state is dropped once its last row has an outcome.

Each step sends the next chunk's documents (``batch_size`` per prompt with batch processing)
together with whatever the earlier steps left over: a batch whose answer is malformed, has the
wrong number of rows or overflows the context is split in half, down to single documents; a
row that fails validation against a typed schema is retried once with the validation error in
the prompt. Nothing is silently dropped: every document ends with a row or a typed error.
Within a step the LM pipelines its own windows; a synchronous call still drains its last
prompts before the next step, which is why a chunk spans at least eight concurrency rounds.
The async API with an LM and no ``max_concurrent_batches`` below the LM's ``max_concurrency``
keeps two steps in flight: the next one starts as soon as the previous one is down to its
last prompts, so the engine does not idle at chunk boundaries (with a lower per-call cap the
steps run one at a time, so that the cap holds for the whole call).

Identical documents are sent once per call, across chunks: each distinct text's 64-bit hash
and first row are kept in sorted numpy runs (12 bytes per distinct document, see ``_Seen``),
and a hash match is confirmed by comparing the texts before a row reuses another row's answer.

Prompts put the fixed instructions first and the documents last, so providers' prefix caches
hit across requests.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import logging
import mmap
import sys
from collections import deque
from dataclasses import dataclass, field
from itertools import compress
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from . import _engine
from . import errors as E
from ._models import ModelRunner, Prompts
from ._schema import REASONING_KEY, OutputSpec, RowInvalid, parse_json_answer
from .lm import LMOutput, Usage
from .progress import ProgressBar
from .settings import settings

logger = logging.getLogger("semex")

__all__ = ["sem_extract", "sem_extract_async", "SemanticExtractOutput"]

# A chunk holds this many prompts' worth of documents, and at least _CHUNK_CALLS_PER_SLOT
# per concurrency slot (one LM window or more): long enough that the drain at the end of a
# synchronous call (the last round of prompts) is a small part of it, small enough to stay
# a few MB (10,240 short documents at batch_size 10 and concurrency 64).
_CHUNK_CALLS_MIN = 1024
_CHUNK_CALLS_PER_SLOT = 8
_CHUNK_ROWS: Optional[int] = None  # fixed rows per chunk (tests lower it); None: automatic
_RECENT_MAX = 4096  # answered documents remembered for their later duplicates
_text_hash = hash   # a document text's 64-bit hash (tests force collisions through this)


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


class _Doc:
    """One distinct document waiting for its answer: its text, first row and duplicates."""

    __slots__ = ("text", "row", "members")

    def __init__(self, text: str, row: int):
        self.text = text
        self.row = row
        self.members: Optional[List[int]] = None  # later rows with the same text


@dataclass
class _Task:
    docs: Tuple[_Doc, ...]          # distinct documents in this prompt
    feedback: Optional[str] = None  # validation error to show the model (retry of one row)


class _Bulk:
    """A chunk's new distinct documents at one document per prompt, as parallel lists (no
    object per row): sent as one call, whose answers are read in C (``_engine.read_rows``)
    straight into the sink; only rows the reader leaves (an error, an answer that is not a
    flat JSON object...) become _Doc/_Task and take the per-row path."""

    __slots__ = ("rows", "texts", "chunk", "members")

    def __init__(self, rows: List[int], texts: List[str], chunk: int):
        self.rows = rows      # ascending
        self.texts = texts
        self.chunk = chunk
        self.members: Dict[int, List[int]] = {}  # first row -> later rows with its text

    def position(self, row: int) -> int:
        """Where ``row`` is in this bulk, or -1."""
        k = bisect.bisect_left(self.rows, row)
        return k if k < len(self.rows) and self.rows[k] == row else -1


_CONTEXT_MARKERS = ("context length", "context_length", "maximum context", "too many tokens",
                    "too long", "reduce the length", "context window")


# What providers say when they refuse a prompt for its content (OpenAI/Azure content
# filters, moderation, safety systems).
_REFUSAL_MARKERS = ("content_filter", "content filter", "content_policy", "content policy",
                    "content management policy", "responsibleaipolicyviolation", "safety",
                    "moderation", "flagged", "invalid_prompt")


def _mentions(err: E.RequestError, markers: Tuple[str, ...]) -> bool:
    text = f"{err} {err.body or ''}".lower()
    return any(marker in text for marker in markers)


def _is_context_overflow(err: E.RequestError) -> bool:
    if not isinstance(err, E.APIStatusError) or err.status not in (400, 413, 422):
        return False
    return _mentions(err, _CONTEXT_MARKERS)


def _worth_splitting(err: E.RequestError, others_ok: bool) -> bool:
    """Whether a failed multi-document prompt is halved (down to single documents) rather
    than failing every document in it: when the failure can be one document's fault.

    Always for an unreadable or oversized answer, a context overflow and a content refusal
    (the provider's 400 says so, or it withheld the answer: ContentBlockedError). For other 400/413/422s, and for 5xx or timeouts that
    outlasted the retries, only when other prompts of the call were answered: then the
    request shape and the server are fine and the batch's content is the suspect; when
    nothing was answered, splitting would only multiply failing requests. Never for
    401/403/404/429, quota, cancellation or local transport errors."""
    if isinstance(err, (E.ResponseFormatError, E.ResponseTooLargeError,
                        E.ContentBlockedError)):
        return True
    if isinstance(err, E.ServerError):  # 408/409/5xx after every retry
        return others_ok
    if isinstance(err, E.RequestTimeoutError):
        return others_ok
    if type(err) is E.APIStatusError and err.status in (400, 413, 422):
        return _is_context_overflow(err) or _mentions(err, _REFUSAL_MARKERS) or others_ok
    return False


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN, NaT
    except (TypeError, ValueError):
        return True  # pandas.NA refuses to be a bool: it is missing by definition


def render_pairs(pairs: Any) -> str:
    """(column, value) pairs as the model sees them: one "[column]: value" line each;
    missing values (None, NaN, NA) and blank text are left out."""
    lines = []
    for key, value in pairs:
        if isinstance(value, (list, tuple, dict)):
            value = json.dumps(value, ensure_ascii=False, default=str)
        elif _missing(value):
            continue
        text = value if isinstance(value, str) else str(value)
        if text.strip():
            lines.append(f"[{key}]: {text}")
    return "\n".join(lines)


def render_document(doc: Mapping[str, Any]) -> str:
    """A document dict as the model sees it (see :func:`render_pairs`)."""
    return render_pairs(doc.items())


class _ListDocuments:
    """The list API's documents: dicts, rendered a chunk at a time."""

    def __init__(self, docs: List[Mapping[str, Any]]):
        self.docs = docs
        self.n = len(docs)

    def render(self, start: int, end: int) -> List[str]:
        docs = self.docs
        texts = _engine.render_dicts(docs[start:end])  # None: a row for render_document
        if None in texts:
            for k, text in enumerate(texts):
                if text is None:
                    texts[k] = render_document(docs[start + k])
        return texts

    def render_row(self, i: int) -> str:
        return render_document(self.docs[i])


class _ListSink:
    """Results as the list API returns them: a dict, raw answer and error per row.

    The sink contract (the accessor has a columnar one): ``bind(n, chunk_rows)`` once;
    ``open_chunk(chunk, start, end)`` before a chunk's rows are written; ``write(i, row, raw,
    error)`` exactly once per row; ``read(i)`` -> (row, raw, error) of a written row;
    ``seal(chunk)`` after the chunk's last row is written."""

    def bind(self, n: int, chunk_rows: int) -> None:
        self.rows: List[Optional[Dict[str, Any]]] = [None] * n
        self.raw: List[Optional[str]] = [None] * n
        self.errors: List[Optional[E.RequestError]] = [None] * n
        self.explanations: List[Optional[str]] = [None] * n

    def open_chunk(self, chunk: int, start: int, end: int) -> None:
        pass

    def seal(self, chunk: int) -> None:
        pass

    def write(self, i: int, row: Optional[Dict[str, Any]], raw: Optional[str],
              error: Optional[E.RequestError]) -> None:
        if error is None:
            if row is not None:
                row = dict(row)
                self.explanations[i] = row.pop(REASONING_KEY, None)
            self.rows[i] = row
        else:
            self.errors[i] = error
        self.raw[i] = raw

    def write_many(self, chunk: int, rows: List[int], flags: bytearray,
                   values: Dict[str, List[Any]], raw: List[Optional[str]]) -> None:
        """write() of each rows[k] with flags[k] set: its values[name][k] and raw[k]."""
        names = tuple(name for name in values if name != REASONING_KEY)
        made = _engine.row_dicts(names, tuple(values[name] for name in names), flags)
        reasoning = values.get(REASONING_KEY)
        out_rows, out_raw, explanations = self.rows, self.raw, self.explanations
        if rows[-1] - rows[0] == len(rows) - 1 and flags.count(1) == len(rows):
            a, b = rows[0], rows[-1] + 1  # every row of a contiguous run: slices
            out_rows[a:b], out_raw[a:b] = made, raw
            if reasoning is not None:
                explanations[a:b] = reasoning
            return
        for k in compress(range(len(rows)), flags):
            i = rows[k]
            out_rows[i] = made[k]
            out_raw[i] = raw[k]
            if reasoning is not None:
                explanations[i] = reasoning[k]

    def read(self, i: int) -> Tuple[Optional[Dict[str, Any]], Optional[str],
                                    Optional[E.RequestError]]:
        row = self.rows[i]
        if row is not None and self.explanations[i] is not None:
            row = {**row, REASONING_KEY: self.explanations[i]}
        return row, self.raw[i], self.errors[i]

    def output(self, spec: OutputSpec) -> SemanticExtractOutput:
        empty = {c: None for c in spec.all_columns}
        outputs = [row if row is not None else dict(empty) for row in self.rows]
        return SemanticExtractOutput(outputs=outputs, raw_outputs=self.raw, errors=self.errors,
                                     explanations=self.explanations)


class _Seen:
    """The first row of every distinct text of the call so far, by the text's 64-bit hash.

    A dict while the call has seen at most SMALL distinct texts (~100 bytes each, and no
    numpy import for the calls most programs make); past that, sorted runs of (hash, row)
    numpy arrays, 12 bytes per distinct document: each chunk adds a run, and a run is merged
    into the one before it once that one is no longer bigger, so there are O(log n) runs and
    O(n log n) copying in all. Runs of 1 MB or more get their own anonymous mapping: freed,
    they go back to the OS at once, where in glibc's heap they would leave holes that the
    next, bigger run cannot reuse. A match only says "probably the same text": callers
    compare the texts."""

    SMALL = 1 << 16

    def __init__(self, n: int):
        self.n = n
        self.small: Optional[Dict[int, int]] = {}
        self.np: Any = None
        self.row_type: Any = None
        self.runs: List[Tuple[Any, Any]] = []

    def _to_runs(self) -> None:
        import numpy as np  # only calls with more than SMALL distinct documents get here

        self.np = np
        self.row_type = np.int32 if self.n < 2 ** 31 else np.int64
        small, self.small = self.small, None
        self._add_run(list(small), list(small.values()))

    def _empty(self, size: int, dtype: Any) -> Any:
        np = self.np
        nbytes = size * np.dtype(dtype).itemsize
        if nbytes < (1 << 20):
            return np.empty(size, dtype=dtype)
        return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=size)

    def lookup(self, hashes: List[int]) -> List[int]:
        """The first row seen with each hash, or -1."""
        if self.small is not None:
            get = self.small.get
            return [get(h, -1) for h in hashes]
        np = self.np
        keys = np.array(hashes, dtype=np.int64)
        found = np.full(len(keys), -1, dtype=np.int64)
        for run_hashes, run_rows in self.runs:
            pos = np.searchsorted(run_hashes, keys)
            np.minimum(pos, len(run_hashes) - 1, out=pos)
            hit = run_hashes[pos] == keys
            found[hit] = run_rows[pos[hit]]
        return found.tolist()

    def add(self, hashes: List[int], rows: List[int]) -> None:
        small = self.small
        if small is not None:
            setdefault = small.setdefault
            for h, row in zip(hashes, rows):
                setdefault(h, row)
            if len(small) > self.SMALL:
                self._to_runs()
            return
        self._add_run(hashes, rows)

    def _add_run(self, hashes: List[int], rows: List[int]) -> None:
        np = self.np
        keys = np.array(hashes, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        run = (keys[order], np.array(rows, dtype=self.row_type)[order])
        runs = self.runs
        while runs and len(runs[-1][0]) <= len(run[0]):
            run = self._merge(runs.pop(), run)
        runs.append(run)

    def _merge(self, a: Tuple[Any, Any], b: Tuple[Any, Any]) -> Tuple[Any, Any]:
        np = self.np
        size = len(a[0]) + len(b[0])
        at = np.searchsorted(a[0], b[0]) + np.arange(len(b[0]))  # b's places in the merge
        keep = np.ones(size, dtype=bool)
        keep[at] = False
        merged_hashes = self._empty(size, np.int64)
        merged_rows = self._empty(size, self.row_type)
        merged_hashes[keep], merged_hashes[at] = a[0], b[0]
        merged_rows[keep], merged_rows[at] = a[1], b[1]
        return merged_hashes, merged_rows


class _Extraction:
    """The state of one call: prompts, the chunk being read, documents waiting for answers,
    and what each answer means for the rows."""

    def __init__(self, documents: Any, sink: Any, spec: OutputSpec, batch_size: int,
                 structured: Any, chunk_rows: int):
        self.documents = documents
        self.sink = sink
        self.spec = spec
        self.batch_size = batch_size
        self.structured = structured
        self.n = documents.n
        self.chunk_rows = chunk_rows
        sink.bind(self.n, chunk_rows)
        self.next_row = 0                     # first row not read yet
        self.unfinished: Dict[int, int] = {}  # chunk -> its rows without an outcome yet
        self.pending: Dict[int, _Doc] = {}    # first row -> document waiting for an answer
        self.seen: Optional[_Seen] = None
        self.recent: Dict[int, tuple] = {}    # first row -> (text, row, raw, error), answered
        self.carry: List[_Doc] = []           # new documents not in a prompt yet
        # At one document per prompt, with answers the C reader can read: new documents
        # go in _Bulk lists (one per chunk, open until its answers are absorbed).
        self.reader = spec.row_reader() if batch_size == 1 else None
        self.bulks: Dict[int, _Bulk] = {}     # chunk -> its bulk, sent and not yet absorbed
        self.new_bulk: Optional[_Bulk] = None  # the bulk of the chunk just read
        self.followups: List[_Task] = []      # splits and retries for the next step
        self.done = 0
        self.failed = 0
        self.cache_hits = 0
        self.usage = Usage()
        fields = spec.field_lines()
        common = ("You extract structured information from documents.\n"
                  f"Fields to extract:\n{fields}\n"
                  "Use null for a field the document does not give. Keep each value concise: "
                  "a word, number or short phrase, never an explanation.")
        if spec.extract_quotes:
            common += (' For every field X also return "X_quote": the exact words from the '
                       "document that support the value, copied verbatim (null if none).")
        if spec.reasoning:
            common += (f' Think first: start each answer object with "{REASONING_KEY}", your '
                       "brief step-by-step reasoning, then give the fields.")
        keys = ", ".join(json.dumps(c) for c in spec.answer_keys)
        self.system_single = (common + f"\nAnswer with one JSON object with the keys {keys}. "
                              "JSON only: no prose, no code fences.")
        self.system_batch = (common + "\nYou receive several numbered documents. Answer with "
                             'a JSON object {"results": [...]} holding exactly one object per '
                             'document, in the same order, each with "id" set to the '
                             f"document's number and the keys {keys}. "
                             "JSON only: no prose, no code fences.")
        self.rf_single = spec.response_format(structured, batch=False)
        self.rf_batch = spec.response_format(structured, batch=True)

    # -- reading ---------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.next_row < self.n or bool(self.followups) or bool(self.carry)

    def read_chunk(self) -> None:
        """Render the next chunk; settle its empty documents and the duplicates of answered
        ones now, attach duplicates of waiting ones, queue the new distinct ones: as one
        _Bulk at one document per prompt with the C reader, else as a _Doc each. A chunk
        with no empty and no repeated document costs no Python per row up to that point."""
        start = self.next_row
        end = min(self.n, start + self.chunk_rows)
        self.next_row = end
        chunk = start // self.chunk_rows
        self.unfinished[chunk] = end - start
        self.sink.open_chunk(chunk, start, end)
        texts = self.documents.render(start, end)
        hashes = [_text_hash(text) for text in texts]
        earlier = self.seen.lookup(hashes) if self.seen is not None else None
        if (earlier is None or max(earlier, default=-1) < 0) and "" not in texts and \
                len(set(hashes)) == len(hashes):
            fresh = _Bulk(list(range(start, end)), texts, chunk)
            new_hashes, new_rows = hashes, fresh.rows
        else:
            fresh = _Bulk([], [], chunk)
            rows, fresh_texts = fresh.rows, fresh.texts
            local: Dict[int, int] = {}  # hash -> position in `fresh`
            new_hashes, new_rows = [], []
            for k, text in enumerate(texts):
                i = start + k
                if not text:
                    self._write(i, None, None, EmptyDocumentError(
                        f"row {i}: the document has no text in any input column; nothing "
                        "sent", index=i))
                    continue
                h = hashes[k]
                first = earlier[k] if earlier is not None else -1
                if first >= 0:
                    if self._same_as(first, i, text):
                        continue
                else:
                    at = local.get(h)
                    if at is not None and fresh_texts[at] == text:
                        fresh.members.setdefault(rows[at], []).append(i)
                        self.cache_hits += 1
                        continue
                if first < 0 and h not in local:  # a hash collision stays out of the index
                    local[h] = len(rows)
                    new_hashes.append(h)
                    new_rows.append(i)
                rows.append(i)
                fresh_texts.append(text)
        if self.reader is not None:
            if fresh.rows:
                self.bulks[chunk] = fresh
                self.new_bulk = fresh
        else:
            for i, text in zip(fresh.rows, fresh.texts):
                doc = _Doc(text, i)
                doc.members = fresh.members.get(i)
                self.pending[i] = doc
                self.carry.append(doc)
        if new_rows and self.next_row < self.n:  # later chunks may repeat these
            if self.seen is None:
                self.seen = _Seen(self.n)
            self.seen.add(new_hashes, new_rows)

    def _same_as(self, first: int, i: int, text: str) -> bool:
        """Row i repeats the document first seen at row ``first``: share its answer (now, or
        when it comes) and return True; False if only the hashes matched."""
        doc = self.pending.get(first)
        if doc is not None:
            if doc.text != text:
                return False
            _add_member(doc, i)
            self.cache_hits += 1
            return True
        bulk = self.bulks.get(first // self.chunk_rows)
        at = bulk.position(first) if bulk is not None else -1
        if at >= 0:  # still waiting for its answer, in a bulk
            if bulk.texts[at] != text:
                return False
            bulk.members.setdefault(first, []).append(i)
            self.cache_hits += 1
            return True
        entry = self.recent.get(first)
        if entry is None:
            entry = (self.documents.render_row(first),) + tuple(self.sink.read(first))
            if len(self.recent) >= _RECENT_MAX:
                self.recent.clear()
            self.recent[first] = entry
        if entry[0] != text:
            return False
        self.cache_hits += 1
        error = entry[3]
        self._write(i, entry[1], entry[2],
                    _row_error(error, i, was=first) if error is not None else None)
        return True

    def take_tasks(self) -> List[_Task]:
        """Leftovers first, then new documents in prompts of ``batch_size``; a partial batch
        waits for the next chunk unless nothing else would be sent."""
        tasks, self.followups = self.followups, []
        if self.new_bulk is not None:
            tasks.append(self.new_bulk)
            self.new_bulk = None
        size = self.batch_size
        carry = self.carry
        cut = len(carry)
        if self.next_row < self.n and (tasks or cut >= size):
            cut -= cut % size
        tasks += [_Task(tuple(carry[k:k + size])) for k in range(0, cut, size)]
        self.carry = carry[cut:]
        return tasks

    # -- prompts --------------------------------------------------------------------------
    # Every prompt of one shape shares its system message (system_single or system_batch),
    # so a call is (that system message, one user message per task): the LM then writes
    # each request body as a pre-encoded prefix + the user text's JSON string, without a
    # message dict per row.
    def user_message(self, task: _Task) -> str:
        if len(task.docs) == 1:
            user = "Document:\n" + task.docs[0].text
            if task.feedback:
                user += ("\n\nA previous answer for this document was rejected: "
                         f"{task.feedback}. Answer again, following the field types exactly.")
            return user
        parts = [f"{len(task.docs)} documents:"]
        for k, doc in enumerate(task.docs, 1):
            parts.append(f"Document {k}:\n{doc.text}")
        return "\n\n".join(parts)

    # -- outcomes -------------------------------------------------------------------------
    def _write(self, i: int, row: Optional[Dict[str, Any]], raw: Optional[str],
               error: Optional[E.RequestError]) -> None:
        self.sink.write(i, row, raw, error)
        if error is not None:
            self.failed += 1
        self._wrote(i // self.chunk_rows, 1)

    def _wrote(self, chunk: int, count: int) -> None:
        """``count`` rows of ``chunk`` have their outcome: the chunk is sealed after its last."""
        self.done += count
        left = self.unfinished[chunk] - count
        if left:
            self.unfinished[chunk] = left
        else:
            del self.unfinished[chunk]
            self.sink.seal(chunk)

    def absorb_bulk(self, bulk: _Bulk, contents: List[Optional[str]],
                    errors: Optional[List[Optional[E.RequestError]]],
                    others_ok: bool) -> List[_Task]:
        """Take a bulk's answers: the rows the C reader reads go straight to the sink; each
        other row becomes a _Doc and takes absorb's per-row path (errors, retries)."""
        del self.bulks[bulk.chunk]
        names, kinds = self.reader
        flags, columns = _engine.read_rows(contents, names, kinds)
        if errors is not None and errors.count(None) != len(errors):
            for k, error in enumerate(errors):
                if error is not None:
                    flags[k] = 0
        values = dict(zip(names, columns))
        read = flags.count(1)
        if read:
            self.sink.write_many(bulk.chunk, bulk.rows, flags, values, contents)
            self._wrote(bulk.chunk, read)
        rows, members = bulk.rows, bulk.members
        for first, later in members.items():
            at = bulk.position(first)
            if flags[at]:
                row = {name: values[name][at] for name in names}
                for i in later:
                    self._write(i, row, contents[at], None)
        next_tasks: List[_Task] = []
        if read < len(rows):
            at = flags.find(0)
            while at >= 0:
                doc = _Doc(bulk.texts[at], rows[at])
                doc.members = members.get(doc.row)
                self.pending[doc.row] = doc
                next_tasks += self.absorb(_Task((doc,)), contents[at],
                                          errors[at] if errors is not None else None,
                                          others_ok)
                at = flags.find(0, at + 1)
        return next_tasks

    def _finish(self, doc: _Doc, row: Optional[Dict[str, Any]], raw: Optional[str],
                error: Optional[E.RequestError]) -> None:
        del self.pending[doc.row]
        self._write(doc.row, row, raw,
                    _row_error(error, doc.row) if error is not None else None)
        for i in doc.members or ():
            self._write(i, row, raw, _row_error(error, i) if error is not None else None)

    def absorb(self, task: _Task, content: Optional[str],
               error: Optional[E.RequestError], others_ok: bool = False) -> List[_Task]:
        """Take one prompt's outcome; return the tasks it leaves for the next step.
        ``others_ok``: some prompt of this run was answered (see _worth_splitting)."""
        docs = task.docs
        if error is not None:
            if len(docs) > 1 and _worth_splitting(error, others_ok):
                logger.debug("prompt of %d documents failed (%s); splitting", len(docs),
                             type(error).__name__)
                return _halves(docs)
            for doc in docs:
                self._finish(doc, None, content, error)
            return []
        try:
            value = parse_json_answer(content)
        except ValueError as exc:
            return self._unreadable(task, content, str(exc))
        if len(docs) == 1:
            return self._take_row(task, docs[0], single_answer(value, self.spec), content)
        items = value.get("results") if isinstance(value, dict) else value
        if not isinstance(items, list) or len(items) != len(docs) or \
                not all(isinstance(x, dict) for x in items):
            got = len(items) if isinstance(items, list) else type(items).__name__
            logger.debug("batch of %d got %s rows back; splitting", len(docs), got)
            return _halves(docs)
        ids = [x.get("id") for x in items]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
            if sorted(ids) != list(range(1, len(docs) + 1)):
                logger.debug("batch of %d answered with ids %s; splitting", len(docs), ids)
                return _halves(docs)
            items = [obj for _, obj in sorted(zip(ids, items), key=lambda p: p[0])]
        next_tasks: List[_Task] = []
        for doc, obj in zip(docs, items):
            next_tasks += self._take_row(_Task((doc,)), doc, obj,
                                         json.dumps(obj, ensure_ascii=False))
        return next_tasks

    def _take_row(self, task: _Task, doc: _Doc, obj: Any, raw: Optional[str]) -> List[_Task]:
        try:
            row = self.spec.validate(obj)
        except RowInvalid as exc:
            return self._unreadable(task, raw, str(exc))
        self._finish(doc, row, raw, None)
        return []

    def _unreadable(self, task: _Task, raw: Optional[str], reason: str) -> List[_Task]:
        if len(task.docs) > 1:
            return _halves(task.docs)
        doc = task.docs[0]
        if task.feedback is None:
            # one more try for this document, telling the model what was wrong
            return [_Task((doc,), feedback=reason)]
        self._finish(doc, None, raw, E.ResponseFormatError(
            f"the answer did not match the requested fields: {reason}"))
        return []


def single_answer(value: Any, spec: OutputSpec) -> Any:
    """The row object in the parsed answer to a one-document prompt: the value itself, or
    the one row of a ``{"results": [row]}`` (without any output column beside it) or of a
    ``[row]`` that a model answered in the batch shape."""
    if isinstance(value, dict) and isinstance(value.get("results"), list) and \
            len(value["results"]) == 1 and not set(value) & set(spec.columns):
        value = value["results"][0]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def _add_member(doc: _Doc, row: int) -> None:
    if doc.members is None:
        doc.members = [row]
    else:
        doc.members.append(row)


def _halves(docs: Tuple[_Doc, ...]) -> List[_Task]:
    mid = (len(docs) + 1) // 2
    return [_Task(docs[:mid]), _Task(docs[mid:])]


def _row_error(error: E.RequestError, row: int, was: Optional[int] = None) -> E.RequestError:
    """``error`` retold for ``row`` (its "item k: " prefix, or "row ``was``: " for an error
    already told for another row, replaced)."""
    message = str(error)
    old = f"row {was}: " if was is not None else None
    if old is not None and message.startswith(old):
        message = message[len(old):]
    elif message.startswith("item "):
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
        if type(doc) is not dict and not isinstance(doc, Mapping):
            raise E.ConfigurationError(
                f"docs[{i}] must be a dict (column -> value), got {type(doc).__name__}")
    return docs


def _check_common(batch_size: Any, on_error: str, max_concurrent_batches: Any,
                  progress: Any = True) -> None:
    if not (isinstance(progress, bool) or callable(progress)):
        raise E.ConfigurationError(
            "progress must be True (a progress bar), False (none) or a callable "
            f"progress(done, total); got {type(progress).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise E.ConfigurationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if on_error not in ("return", "raise"):
        raise E.ConfigurationError(f"on_error must be 'return' or 'raise', got {on_error!r}")
    if max_concurrent_batches is not None and (
            isinstance(max_concurrent_batches, bool) or
            not isinstance(max_concurrent_batches, int) or max_concurrent_batches < 1):
        raise E.ConfigurationError(
            f"max_concurrent_batches must be an integer >= 1, got {max_concurrent_batches!r}")


def _strategy(strategy: Any, prompt_strategy: Any = None) -> Optional[str]:
    """LOTUS's ``strategy`` (a ``ReasoningStrategy`` member, or its name as a string) or
    semex's older name ``prompt_strategy`` -> None (the plain prompt: None, DEFAULT) or
    "cot" (COT, ZS_COT: the model reasons first; see OutputSpec)."""
    if strategy is not None and prompt_strategy is not None and strategy != prompt_strategy:
        raise E.ConfigurationError("strategy and prompt_strategy disagree; pass strategy "
                                   "(prompt_strategy is its older name)")
    value = strategy if strategy is not None else prompt_strategy
    name = getattr(value, "name", value)
    key = name.upper() if isinstance(name, str) else None
    if value is None or key == "DEFAULT":
        return None
    if key in ("COT", "ZS_COT"):
        return "cot"
    raise E.ConfigurationError(
        f"strategy={value!r} is not supported by semex (None, DEFAULT, COT and ZS_COT are; "
        "FEW_SHOT needs examples semex does not take yet); prompt_strategy is its older "
        "name")


def _check_call(output_cols: Any, strategy: Any, batch_size: Any, on_error: str,
                max_concurrent_batches: Any, progress: Any = True) -> None:
    """``strategy``: already read by _strategy."""
    if output_cols is None:
        raise E.ConfigurationError("output_cols is required")
    _check_common(batch_size, on_error, max_concurrent_batches, progress)


class _Call:
    """One model call of a step: prompts of one shape and their progress."""

    __slots__ = ("tasks", "bulk", "conversations", "response_format", "prompts", "rows",
                 "done", "step")

    def __init__(self, tasks: List[_Task], conversations: Prompts,
                 response_format: Optional[dict], bulk: Optional[_Bulk] = None):
        self.tasks = tasks
        self.bulk = bulk  # or a bulk's documents, one prompt each
        self.conversations: Optional[Prompts] = conversations
        self.response_format = response_format
        self.prompts = len(conversations)
        if bulk is not None:
            self.rows = len(bulk.rows) + sum(len(m) for m in bulk.members.values())
        else:
            self.rows = sum(1 + len(d.members or ()) for t in tasks for d in t.docs)
        self.done = 0
        self.step: Optional[_Step] = None


class _Run:
    """Set-up, steps, progress and bookkeeping of one extraction (sync or async), from any
    documents (``n``, ``render(start, end)``, ``render_row(i)``) into any sink."""

    def __init__(self, documents, sink, model, output_cols, extract_quotes, batch_size,
                 use_batch_processing, max_concurrent_batches, progress, progress_bar_desc,
                 safe_mode, on_error, postprocessor, strategy=None, mode=None):
        self.spec = OutputSpec(output_cols, extract_quotes, reasoning=strategy == "cot")
        model = settings.resolve_lm(model)
        self.runner = ModelRunner(model, max_concurrent_batches, mode)
        self.model = model
        self.on_error = on_error
        self.postprocessor = postprocessor
        self.sink = sink
        size = batch_size if use_batch_processing else 1
        own = self.runner.model.max_concurrency if self.runner.is_lm else None
        self.cap = _concurrency(self.runner.max_concurrent, own)
        # Two async steps may overlap only where one limit covers both: the engine's own
        # window (max_concurrency) bounds every call of an LM, but a max_concurrent_batches
        # below it, a worker-thread semaphore or a user's async_call bounds one call only.
        self.overlap = own is not None and self.cap >= own
        chunk_rows = _CHUNK_ROWS or size * max(_CHUNK_CALLS_MIN,
                                               _CHUNK_CALLS_PER_SLOT * self.cap)
        if self.runner.mode is not None:  # one batch for every row (then one per round
            chunk_rows = max(1, documents.n)  # of retries/splits), not one per chunk
        self.state = _Extraction(documents, sink, self.spec, size, self.runner.structured,
                                 chunk_rows)
        self.n = documents.n
        self._stats0 = self._engine_stats()
        self.in_flight: List[_Call] = []
        self.answered = False  # some prompt of this run came back without an error
        self.callback = progress if callable(progress) else None
        self.reported = -1
        self.bar = ProgressBar(self.n, progress_bar_desc,
                               enabled=progress is True and self.callback is None)
        if safe_mode:
            self.safe_mode_report()

    def safe_mode_report(self) -> None:
        """Estimate from one pass over the documents (rendered and hashed, then dropped)."""
        import numpy as np

        state = self.state
        documents, step = state.documents, state.chunk_rows
        hashes: List[Any] = []
        lengths: List[Any] = []
        for start in range(0, self.n, step):
            texts = [t for t in documents.render(start, min(self.n, start + step)) if t]
            hashes.append(np.array([_text_hash(t) for t in texts], dtype=np.int64))
            lengths.append(np.array([len(t) for t in texts], dtype=np.int64))
        all_hashes = np.concatenate(hashes) if hashes else np.empty(0, np.int64)
        _, firsts = np.unique(all_hashes, return_index=True)
        distinct = len(firsts)
        size = state.batch_size
        calls = -(-distinct // size)
        system = state.system_batch if size > 1 else state.system_single
        text_chars = int(np.concatenate(lengths)[firsts].sum()) if distinct else 0
        tokens = (calls * len(system) + text_chars) // 4
        lines = [f"semex safe mode: {self.n} documents, {distinct} distinct, "
                 f"about {calls} calls and {tokens:,} prompt tokens"]
        cost = getattr(self.model, "_cost", None)
        if callable(cost):
            estimate = cost(tokens, 0)
            if estimate is not None:
                lines.append(f"  estimated prompt cost: {estimate:.4f}")
        sys.stderr.write("\n".join(lines) + "\n")
        logger.info("%s", " ".join(lines))

    def next_step(self) -> List[_Call]:
        """Read the next chunk (if any) and build this step's calls: multi-document prompts
        and single-document prompts go in separate calls, each with its response format."""
        state = self.state
        if state.next_row < state.n:
            state.read_chunk()
        tasks = state.take_tasks()
        calls = []
        for bulk in [t for t in tasks if type(t) is _Bulk]:
            prompts = Prompts(state.system_single, ["Document:\n" + t for t in bulk.texts])
            calls.append(_Call([], prompts, state.rf_single, bulk))
        tasks = [t for t in tasks if type(t) is not _Bulk]
        for group, rf, system in (
                ([t for t in tasks if len(t.docs) > 1], state.rf_batch, state.system_batch),
                ([t for t in tasks if len(t.docs) == 1], state.rf_single, state.system_single)):
            if group:
                prompts = Prompts(system, [state.user_message(t) for t in group])
                calls.append(_Call(group, prompts, rf))
        self.in_flight += calls
        self._show()
        return calls

    def tick(self, call: _Call) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            call.done = done
            if call.step is not None:
                call.step.check()
            self._show()
        return progress

    def _show(self) -> None:
        if self.callback is not None:
            done = self.state.done  # rows with their outcome, no estimate
            if done != self.reported:
                self.reported = done
                self.callback(done, self.n)
            return
        guess = sum(c.rows * c.done // max(1, c.prompts) for c in self.in_flight)
        self.bar.update_to(self.state.done + guess, self.stats())

    def _engine_stats(self) -> Dict[str, Any]:
        engine_stats = getattr(self.model, "engine_stats", None)
        return engine_stats() if callable(engine_stats) else {}

    def stats(self) -> Dict[str, Any]:
        """Progress-bar postfix figures for this run only."""
        now = self._engine_stats()
        figures = {k: now.get(k, 0) - self._stats0.get(k, 0)
                   for k in ("admitted", "retries", "http_429", "timeouts")}
        figures["tokens"] = self.state.usage.total_tokens
        figures["errors"] = self.state.failed
        return figures

    def absorb(self, call: _Call, out: LMOutput) -> None:
        state = self.state
        self.in_flight.remove(call)
        call.conversations = None
        state.usage.add(out.usage)
        errors = out.errors or [None] * call.prompts
        self.answered = self.answered or any(e is None for e in errors)
        if call.bulk is not None:
            state.followups += state.absorb_bulk(call.bulk, out.outputs, out.errors,
                                                 self.answered)
        for task, content, error in zip(call.tasks, out.outputs, errors):
            state.followups += state.absorb(task, content, error, self.answered)
        self._show()

    def check_complete(self) -> None:
        state = self.state
        if state.unfinished or state.pending or state.bulks or state.done != self.n:
            raise RuntimeError(  # a bug in semex, never the user's fault
                f"sem_extract ended with {self.n - state.done} rows without an outcome")

    def usage(self) -> Usage:
        usage = self.state.usage
        usage.cache_hits = self.state.cache_hits
        usage.failed = self.state.failed
        return usage

    def report_failures(self, failed: int, first: Any, errors: Any, results: Any) -> None:
        """Say that rows failed: a log line and one visible warning; and when every row
        failed for one call-level cause (key, quota, connection refused, DNS, TLS), raise
        that error (with ``.results`` and ``.errors``) instead of returning only errors.
        Not called for on_error="raise", which raises BatchError."""
        logger.warning("sem_extract: %d of %d rows failed; first: %s", failed, self.n, first)
        if failed == self.n:
            cause = E.call_level_failure(errors)
            if cause is not None:
                message = str(cause).split(": ", 1)[-1] if str(cause).startswith("row ") \
                    else str(cause)
                exc = type(cause)(f"all {self.n} rows failed: {message}", status=cause.status,
                                  attempts=cause.attempts, body=cause.body)
                exc.results, exc.errors = results, errors
                raise exc
        E.warn_partial(f"sem_extract: {failed} of {self.n} rows failed; first: {first}")

    def finish(self) -> SemanticExtractOutput:
        """The list API's result (list sink), postprocessed; raises for on_error="raise"."""
        self.bar.close(self.stats())
        self.check_complete()
        result = self.sink.output(self.spec)
        result.usage = self.usage()
        if self.postprocessor is not None:
            self.apply_postprocessor(result)
        if result.failed:
            first = next(e for e in result.errors if e is not None)
            if self.on_error == "raise":
                logger.warning("sem_extract: %d of %d rows failed; first: %s", result.failed,
                               self.n, first)
                raise E.BatchError(
                    f"{result.failed} of {len(result.outputs)} rows failed; first: {first}. "
                    "The exception's .results holds every row computed.",
                    results=result, errors=result.errors)
            self.report_failures(result.failed, first, result.errors, result)
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


def _concurrency(cap: Optional[int], own: Optional[int]) -> int:
    """Prompts the model has in flight at once (sizes chunks; the runner enforces it): the
    call's cap and the LM's own max_concurrency (None for other models)."""
    if own:
        cap = min(cap, own) if cap else own
    return cap or 4


def _drive(run: _Run) -> None:
    """The synchronous steps: each sends the next chunk with the previous step's leftovers
    (no round is spent on stragglers alone); the LM pipelines its windows within a call.
    With semex's LM and one limit over every call (run.overlap), two steps are in flight
    as in the async driver (_drive_overlapped)."""
    if run.overlap and run.runner.can_start:
        _drive_overlapped(run)
        return
    state = run.state
    try:
        while state.has_work():
            for call in run.next_step():
                run.absorb(call, run.runner.call(call.conversations, call.response_format,
                                                 run.tick(call)))
    finally:
        run.bar.close(run.stats())


def _drive_overlapped(run: _Run) -> None:
    """_drive_async's schedule without an event loop: the next step's calls start once the
    newest step is down to its last ``run.cap`` prompts, so the engine has the next chunk's
    requests while the previous chunk's last answers arrive (a chunk boundary used to leave
    it idle for about one answer latency). Waits are on the oldest call's oldest window, a
    few milliseconds at a time, and release the GIL; Ctrl-C cancels every call in flight."""
    state = run.state
    steps: "deque[List[Tuple[_Call, Any]]]" = deque()
    try:
        while True:
            newest = steps[-1] if steps else None
            if state.has_work() and (newest is None or (
                    len(steps) < 2 and
                    sum(r.unfinished() for _, r in newest) <= run.cap)):
                calls = run.next_step()
                if calls:
                    steps.append([(c, run.runner.start(c.conversations, c.response_format,
                                                       run.tick(c))) for c in calls])
                continue
            if not steps:
                break
            for step in list(steps):
                for _, running in step:
                    if running.output is None:
                        running.advance(_WAIT_S if step is steps[0] else 0.0)
                if all(running.output is not None for _, running in step):
                    steps.remove(step)
                    for call, running in step:
                        run.absorb(call, running.output)
    finally:
        for step in steps:
            for _, running in step:
                running.close()
        run.bar.close(run.stats())


_WAIT_S = 0.01  # _drive_overlapped's longest wait before it looks at every call again


class _Step:
    """The calls of one async step, and whether they are down to their last prompts."""

    def __init__(self, calls: List[_Call], cap: int):
        self.calls = calls
        self.cap = cap
        self.tail = asyncio.Event()
        self._waiter: Optional[asyncio.Future] = None
        for call in calls:
            call.step = self
        self.check()

    def check(self) -> None:
        if not self.tail.is_set() and \
                sum(c.prompts - c.done for c in self.calls) <= self.cap:
            self.tail.set()

    def waiter(self) -> "asyncio.Future":
        if self._waiter is None:
            self._waiter = asyncio.ensure_future(self.tail.wait())
        return self._waiter

    def close(self) -> None:
        self.tail.set()
        if self._waiter is not None:
            self._waiter.cancel()


async def _run_step(run: _Run, step: _Step) -> None:
    """A step's calls (one per prompt shape): together where one limit covers them all,
    else one after the other, so that a per-call cap holds."""
    try:
        if run.overlap:
            outs = await asyncio.gather(*(run.runner.acall(c.conversations,
                                                           c.response_format, run.tick(c))
                                          for c in step.calls))
            for call, out in zip(step.calls, outs):
                run.absorb(call, out)
        else:
            for call in step.calls:
                run.absorb(call, await run.runner.acall(call.conversations,
                                                        call.response_format, run.tick(call)))
    finally:
        step.close()


async def _drive_async(run: _Run) -> None:
    """Async steps, two in flight when ``run.overlap``: the next starts once the newest is
    down to its last ``cap`` prompts, so the engine has the next chunk's prompts before the
    previous chunk's stragglers are back (their leftovers join a later step). Otherwise, as
    in the sync API, one step at a time."""
    state = run.state
    steps: Dict["asyncio.Future", _Step] = {}
    newest: Optional[_Step] = None
    try:
        while True:
            if state.has_work() and (not steps or (
                    run.overlap and len(steps) < 2 and newest.tail.is_set())):
                calls = run.next_step()
                if calls:
                    newest = _Step(calls, run.cap)
                    steps[asyncio.ensure_future(_run_step(run, newest))] = newest
                continue
            if not steps:
                break
            waiters = set(steps)
            if run.overlap and len(steps) < 2 and state.has_work():
                waiters.add(newest.waiter())
            finished, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                if steps.pop(task, None) is not None:
                    task.result()  # a step's exception ends the call
    finally:
        for task, step in steps.items():
            task.cancel()
            step.close()
        if steps:
            await asyncio.gather(*steps, return_exceptions=True)
        run.bar.close(run.stats())


def sem_extract(docs: Sequence[Mapping[str, Any]], model: Any = None,
                output_cols: Any = None, extract_quotes: bool = False,
                postprocessor: Optional[Callable] = None, safe_mode: bool = False,
                progress_bar_desc: str = "Extracting", return_explanations: bool = False,
                strategy: Any = None, *, return_raw_outputs: bool = False,
                use_batch_processing: bool = True, batch_size: int = 10,
                prompt_strategy: Any = None, max_concurrent_batches: Optional[int] = None,
                progress: Any = True, on_error: str = "return", mode: Any = None,
                **unknown: Any) -> SemanticExtractOutput:
    """Extract ``output_cols`` from every document; rows come back in input order.

    Parameters (LOTUS 1.2.4's names and positional order, then keyword-only extras)
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
    return_explanations: kept for LOTUS compatibility (``explanations`` is always filled
        when the strategy gives one).
    strategy: None/DEFAULT, or LOTUS's ``ReasoningStrategy.COT``/``ZS_COT`` (or "cot"):
        the model writes its brief reasoning first, returned in ``explanations``.
        ``prompt_strategy`` is its older name.
    max_concurrent_batches: most prompts in flight at once (default: the model's own cap).
    progress: True shows a tqdm progress bar (a widget in notebooks), False nothing, a
        callable is called as ``progress(done_rows, total_rows)`` as rows finish.
    on_error: "return" (failed rows carry typed errors in ``errors``) or "raise" (one
        ``BatchError`` after the run, carrying every partial result).
    mode: "online" (default) or "batch" / a ``semex.BatchMode``: every prompt goes in one
        provider batch (half price; a round of validation retries or splits in another);
        returns when the batches have ended; the same call run again resumes them.

    Works inside a running event loop (a notebook cell): no event loop is used.
    """
    E.check_keywords("sem_extract", unknown, _keywords(sem_extract))
    strategy = _strategy(strategy, prompt_strategy)
    _check_call(output_cols, strategy, batch_size, on_error, max_concurrent_batches, progress)
    run = _Run(_ListDocuments(_check_docs(docs)), _ListSink(), model, output_cols,
               extract_quotes, batch_size, use_batch_processing, max_concurrent_batches,
               progress, progress_bar_desc, safe_mode, on_error, postprocessor, strategy,
               mode)
    _drive(run)
    return run.finish()


async def sem_extract_async(docs: Sequence[Mapping[str, Any]], model: Any = None,
                            output_cols: Any = None, extract_quotes: bool = False,
                            postprocessor: Optional[Callable] = None, safe_mode: bool = False,
                            progress_bar_desc: str = "Extracting",
                            return_explanations: bool = False, strategy: Any = None, *,
                            return_raw_outputs: bool = False,
                            use_batch_processing: bool = True, batch_size: int = 10,
                            prompt_strategy: Any = None,
                            max_concurrent_batches: Optional[int] = 3,
                            progress: Any = True, on_error: str = "return",
                            mode: Any = None,
                            **unknown: Any) -> SemanticExtractOutput:
    """Awaitable twin of :func:`sem_extract` for any running asyncio loop (Jupyter
    included). ``max_concurrent_batches`` (default 3) limits prompts in flight;
    a plain callable model runs in worker threads so the loop never blocks."""
    E.check_keywords("sem_extract_async", unknown, _keywords(sem_extract_async))
    strategy = _strategy(strategy, prompt_strategy)
    _check_call(output_cols, strategy, batch_size, on_error, max_concurrent_batches, progress)
    run = _Run(_ListDocuments(_check_docs(docs)), _ListSink(), model, output_cols,
               extract_quotes, batch_size, use_batch_processing, max_concurrent_batches,
               progress, progress_bar_desc, safe_mode, on_error, postprocessor, strategy,
               mode)
    await _drive_async(run)
    return run.finish()


def _keywords(fn: Callable) -> List[str]:
    import inspect

    return [p for p in inspect.signature(fn).parameters if p != "unknown"]
