"""The pandas accessor: ``df.sem_extract(...)`` and ``await df.sem_extract.async_extract(...)``.

Registered when semex is imported. Returns a new DataFrame: the input columns plus one column
per output (and per quote with ``extract_quotes``), in row order. Failed rows are visible:
their output cells are missing and the error column carries the reason.

Memory stays flat in the number of rows: documents are rendered from the frame's columns a
chunk at a time, each finished row goes straight into per-column storage, and a chunk's text
values become one compact string array as soon as its last row is in. The result shares the
input's columns (copy-on-write) and gets its columns with the dtypes pandas would infer from
the whole list of values: ``str`` for text (missing as NaN), object when every value is
missing or the values are mixed or structured, int64/float64/bool for typed pydantic fields.
"""
from __future__ import annotations

import inspect
from itertools import compress
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from . import _engine
from . import errors as E
from ._schema import REASONING_KEY, OutputSpec
from .extract import (SemanticExtractOutput, _check_call, _drive, _drive_async, _ListSink,
                      _missing, _Run, _strategy, render_pairs)

__all__ = ["SemExtractAccessor"]


def _input_columns(df: pd.DataFrame, input_cols: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(input_cols, str):
        input_cols = [input_cols]
    if not isinstance(input_cols, (list, tuple)) or not input_cols:
        raise E.ConfigurationError("input_cols must be a non-empty list of column names")
    missing = [c for c in input_cols if c not in df.columns]
    if missing:
        raise E.ConfigurationError(
            f"input column(s) {missing} not found in the DataFrame; it has "
            f"{list(map(str, df.columns))}")
    return list(input_cols)


def _copy(df: pd.DataFrame) -> pd.DataFrame:
    """A new frame with the input's columns; we only add or replace whole columns, so under
    copy-on-write (pandas 3) it shares the input's data instead of doubling it."""
    try:
        cow = int(pd.__version__.split(".")[0]) >= 3 or \
            pd.get_option("mode.copy_on_write") is True
    except (ValueError, KeyError, AttributeError):  # OptionError is both of the last two
        cow = False
    return df.copy(deep=not cow)


class _FrameDocuments:
    """The rows of ``df[input_cols]``, rendered a chunk at a time from the columns (no list of
    dicts for the whole frame). Values and keys as ``to_dict("records")`` would give them."""

    def __init__(self, df: pd.DataFrame, columns: List[str]):
        sub = df[columns]
        last: Dict[Any, int] = {}  # a repeated label keeps its first place and last column
        for j, label in enumerate(sub.columns):
            last[label] = j
        self.keys = list(last)
        self.labels = tuple(f"{key}" for key in self.keys)  # as render_pairs shows them
        self.series = [sub.iloc[:, j] for j in last.values()]
        self.n = len(df)

    def render(self, start: int, end: int) -> List[str]:
        columns = [s.iloc[start:end].tolist() for s in self.series]
        # text, None and NaN values in C; a row with any other value in render_pairs
        texts = _engine.render_docs(self.labels, tuple(columns))
        if None in texts:
            keys = self.keys
            for k, text in enumerate(texts):
                if text is None:
                    texts[k] = render_pairs(zip(keys, [column[k] for column in columns]))
        return texts

    def render_row(self, i: int) -> str:
        return self.render(i, i + 1)[0]


def _text_array(values: List[Optional[str]], dtype: Any) -> Any:
    """str-or-None values as a pandas array of ``dtype``. Arrow-backed strings are built in
    pyarrow's system pool: its default (mimalloc) was measured holding about twice the live
    bytes for this pattern, one medium-sized array per chunk, kept until the end."""
    if getattr(dtype, "storage", None) == "pyarrow":
        try:
            import pyarrow as pa

            array = _arrow_text(pa.array(values, type=pa.large_string(), from_pandas=True,
                                         memory_pool=pa.system_memory_pool()), dtype)
            if array is not None:
                return array
        except (ImportError, TypeError, ValueError):  # pyarrow.ArrowInvalid: a ValueError
            pass
    return pd.array(values, dtype=dtype)


def _arrow_text(arrow: Any, dtype: Any) -> Any:
    """An Arrow string array (or chunked array) as a pandas array of the Arrow-backed text
    ``dtype``, sharing its buffers; None if pandas makes another dtype of it."""
    try:
        array = dtype.construct_array_type()(arrow, dtype=dtype)
    except (TypeError, ValueError):
        return None
    return array if array.dtype == dtype else None


def _join_arrow(parts: List[Any], dtype: Any) -> Any:
    """Arrow-backed string blocks as one array of ``dtype`` over all their chunks, without
    copying them (pd.concat writes every value again: at the end of a long call, that copy
    of each column beside its blocks was the peak of memory); None if they are not all such
    arrays (then pd.concat joins them)."""
    chunks: List[Any] = []
    for part in parts:
        arrow = getattr(part, "_pa_array", None)
        if arrow is None or getattr(part, "dtype", None) != dtype:
            return None
        chunks.extend(arrow.chunks)
    if not chunks:
        return None
    import pyarrow as pa  # the blocks are Arrow arrays: it is there

    return _arrow_text(pa.chunked_array(chunks, type=chunks[0].type), dtype)


class _Column:
    """One result column, chunk by chunk: a chunk's values stay Python objects until its last
    row is written; then, if they are all text or missing, a compact pandas string array."""

    __slots__ = ("blocks", "has_text", "has_other")

    def __init__(self) -> None:
        self.blocks: Dict[int, Any] = {}
        self.has_text = False   # some value is a str
        self.has_other = False  # some value is neither str nor None: the column is object

    def seal(self, chunk: int, text_dtype: Any) -> None:
        if text_dtype is None or self.has_other:
            return  # no compaction possible: the column is (or stays) a list of objects
        block = self.blocks[chunk]
        text = False
        for value in block:
            if value is None:
                continue
            if not isinstance(value, str):
                self.has_other = True
                return
            text = True
        self.has_text = self.has_text or text
        if text_dtype is not None and not self.has_other:
            self.blocks[chunk] = _text_array(block, text_dtype)

    def cell(self, chunk: int, k: int) -> Any:
        block = self.blocks[chunk]
        value = block[k]
        if isinstance(block, list):
            return value
        return None if _missing(value) else value  # a string array's gaps read as NaN

    def values(self, text_dtype: Any) -> Any:
        """The whole column: the string blocks joined without copying when every value is
        text or missing; otherwise a list, for pandas to infer the dtype as it would from
        a list of the values (int64, float64 with NaN, bool, object...)."""
        parts = [self.blocks[c] for c in sorted(self.blocks)]
        self.blocks = {}
        if text_dtype is not None and self.has_text and not self.has_other:
            joined = _join_arrow(parts, text_dtype)
            if joined is not None:
                return joined
            return pd.concat([pd.Series(p, copy=False) for p in parts],
                             ignore_index=True).array
        values: List[Any] = []
        for part in parts:
            values.extend(part if isinstance(part, list)
                          else part.to_numpy(dtype=object, na_value=None))
        return values


class _ColumnSink:
    """Extraction results straight into per-output-column storage (see extract._ListSink for
    the contract); errors are kept only for the rows that failed."""

    def __init__(self, spec: OutputSpec, keep_raw: bool):
        self.columns = {name: _Column() for name in spec.all_columns}
        if spec.reasoning:  # kept as a column of its own, shown as "explanation"
            self.columns[REASONING_KEY] = _Column()
        self.raw = _Column() if keep_raw else None
        self.errors: Dict[int, E.RequestError] = {}
        dtype = pd.Series(["text", None]).dtype  # what this pandas makes of text with gaps
        self.text_dtype = None if dtype == object else dtype

    def _all(self) -> List[_Column]:
        return list(self.columns.values()) + ([self.raw] if self.raw is not None else [])

    def bind(self, n: int, chunk_rows: int) -> None:
        self.chunk_rows = chunk_rows

    def open_chunk(self, chunk: int, start: int, end: int) -> None:
        for column in self._all():
            column.blocks[chunk] = [None] * (end - start)

    def write(self, i: int, row: Optional[Dict[str, Any]], raw: Optional[str],
              error: Optional[E.RequestError]) -> None:
        chunk, k = divmod(i, self.chunk_rows)
        if row is not None:
            for name, column in self.columns.items():
                column.blocks[chunk][k] = row.get(name)
        if self.raw is not None:
            self.raw.blocks[chunk][k] = raw
        if error is not None:
            self.errors[i] = error

    def write_many(self, chunk: int, rows: List[int], flags: bytearray,
                   values: Dict[str, List[Any]], raw: List[Optional[str]]) -> None:
        """write() of each rows[k] (all in ``chunk``, ascending) with flags[k] set: its
        values[name][k] and raw[k]. Contiguous rows are one slice per column: the rows
        without their flag get None there, which is what they hold until written."""
        base = chunk * self.chunk_rows
        first = rows[0] - base
        contiguous = rows[-1] - rows[0] == len(rows) - 1
        if not contiguous:
            offsets = [i - base for i in compress(rows, flags)]
        targets = [(column, values[name]) for name, column in self.columns.items()]
        if self.raw is not None:
            targets.append((self.raw, raw))
        for column, column_values in targets:
            block = column.blocks[chunk]
            if contiguous:
                block[first:first + len(rows)] = column_values
            else:
                for offset, value in zip(offsets, compress(column_values, flags)):
                    block[offset] = value

    def read(self, i: int) -> Tuple[Dict[str, Any], Optional[str], Optional[E.RequestError]]:
        chunk, k = divmod(i, self.chunk_rows)
        row = {name: column.cell(chunk, k) for name, column in self.columns.items()}
        raw = self.raw.cell(chunk, k) if self.raw is not None else None
        return row, raw, self.errors.get(i)

    def seal(self, chunk: int) -> None:
        for column in self._all():
            column.seal(chunk, self.text_dtype)

    def frame(self, df: pd.DataFrame, spec: OutputSpec, return_raw_outputs: bool,
              return_explanations: bool, error_col: Optional[str]) -> pd.DataFrame:
        frame = _copy(df)
        n = len(df)
        for name in spec.all_columns:
            _set_column(frame, name, self.columns.pop(name).values(self.text_dtype))
        if return_raw_outputs:
            _set_column(frame, "raw_output", self.raw.values(self.text_dtype))
        if return_explanations:
            _set_column(frame, "explanation",
                        self.columns.pop(REASONING_KEY).values(self.text_dtype)
                        if spec.reasoning else np.full(n, None, dtype=object))
        if error_col is not None or self.errors:
            _set_column(frame, error_col or "extract_error", _error_texts(n, self.errors))
        return frame


def _error_texts(n: int, errors: Dict[int, Any]) -> Any:
    """The error column: the error's text where a row failed, missing elsewhere, always with
    the dtype pandas gives text with gaps (``str`` with NaN under pandas 3, object with
    None before), whether or not any row failed."""
    dtype = pd.Series(["text", None]).dtype
    if not errors and getattr(dtype, "storage", None) == "pyarrow":
        import pyarrow as pa  # pandas' Arrow-backed text needs it

        array = _arrow_text(pa.chunked_array([pa.nulls(n, type=pa.large_string())]), dtype)
        if array is not None:  # no row failed: a column of gaps, without n Nones first
            return array
    texts = np.full(n, None, dtype=object)
    for i, error in errors.items():
        texts[i] = str(error)
    return texts if dtype == object else pd.array(texts, dtype=dtype)


def _set_column(frame: pd.DataFrame, name: str, values: Any) -> None:
    """``frame[name] = values``; arrays we built go in without being copied or re-inferred
    (assigning a bare object ndarray of 1M Nones peaks at ~4x its size), lists are left to
    pandas' inference as before."""
    if isinstance(values, list):
        frame[name] = values
    else:
        frame[name] = pd.Series(values, index=frame.index, copy=False,
                                dtype=object if isinstance(values, np.ndarray) else None)


def _result_frame(df: pd.DataFrame, spec: OutputSpec, out: Optional[SemanticExtractOutput],
                  return_raw_outputs: bool, return_explanations: bool,
                  error_col: Optional[str]) -> pd.DataFrame:
    frame = _copy(df)
    n = len(df)
    for column in spec.all_columns:
        frame[column] = [row.get(column) for row in out.outputs] if out else [None] * n
    if return_raw_outputs:
        frame["raw_output"] = out.raw_outputs if out else [None] * n
    if return_explanations:
        frame["explanation"] = out.explanations if out else [None] * n
    errors = out.errors if out else [None] * n
    if error_col is not None or any(errors):
        _set_column(frame, error_col or "extract_error",
                    _error_texts(n, {i: e for i, e in enumerate(errors) if e is not None}))
    return frame


def _check_added_columns(df: pd.DataFrame, spec: OutputSpec, return_raw_outputs: bool,
                         return_explanations: bool, error_col: Optional[str],
                         overwrite: bool) -> None:
    """The result adds columns; one the frame already has would be silently replaced (an
    input's own text, an earlier run's values), so that is an error unless overwrite=True.
    An output named like the error column is always one: both could not be kept."""
    added = list(spec.all_columns)
    if return_raw_outputs:
        added.append("raw_output")
    if return_explanations:
        added.append("explanation")
    error = error_col or "extract_error"
    if error in added:
        raise E.ConfigurationError(
            f"output column {error!r} is also the error column; rename the output or pass "
            "error_col='another_name'")
    if not isinstance(overwrite, bool):
        raise E.ConfigurationError(f"overwrite must be True or False, got {overwrite!r}")
    clash = [c for c in added + [error] if c in df.columns]
    if clash and not overwrite:
        raise E.ConfigurationError(
            f"the DataFrame already has the column(s) {clash} that sem_extract would write; "
            "rename the outputs (or error_col=...), drop those columns, or pass "
            "overwrite=True to replace them")


def _raise_batch(frame: pd.DataFrame, failed: int, first: Any, errors: list) -> None:
    raise E.BatchError(f"{failed} of {len(frame)} rows failed; first: {first}. "
                       "The exception's .results is the full DataFrame.",
                       results=frame, errors=errors)


@pd.api.extensions.register_dataframe_accessor("sem_extract")
class SemExtractAccessor:
    """``df.sem_extract(input_cols, output_cols, ...)``: LLM extraction over a DataFrame.

    Parameters (LOTUS's names and order, then semex's keyword-only extras)
    ----------
    input_cols: the columns the model reads (a name or a list of names).
    output_cols: ``{"name": "description or None"}`` or a pydantic model class.
    extract_quotes: add ``{name}_quote`` columns with the verbatim supporting span.
    postprocessor, safe_mode, progress_bar_desc, return_explanations, strategy:
        as in :func:`semex.sem_extract` (``prompt_strategy``: strategy's older name).
    return_raw_outputs: add a ``raw_output`` column with each row's raw answer.
    model: a ``semex.LM`` or any model object; default ``settings.lm``.
    use_batch_processing, batch_size, max_concurrent_batches, progress: as in sem_extract.
    on_error: "return" (default; failed rows have missing cells and an error) or "raise"
        (a ``semex.errors.BatchError`` after the run; its ``.results`` is the full frame).
    error_col: name of the error column (None: add it only when a row failed).
    mode: "online" (default) or "batch" / a ``semex.BatchMode`` (the provider's Batch API),
        as in sem_extract.
    overwrite: replace columns the frame already has (an output, quote, ``raw_output``,
        ``explanation`` or error column of the same name); by default such a clash is an
        error raised before anything is sent.
    """

    def __init__(self, df: pd.DataFrame):
        self._df = df

    def _begin(self, input_cols, output_cols, extract_quotes, postprocessor,
               return_raw_outputs, safe_mode, progress_bar_desc, return_explanations,
               strategy, model, use_batch_processing, batch_size,
               max_concurrent_batches, progress, on_error, error_col, overwrite, unknown,
               mode=None) -> Tuple[Optional[_Run], Callable[[Optional[_Run]], pd.DataFrame]]:
        """Checks and set-up shared by the sync and async calls: (the run to drive, or None
        for an empty frame; what turns the driven run into the result frame)."""
        E.check_keywords("df.sem_extract", unknown, _KEYWORDS)
        df = self._df
        columns = _input_columns(df, input_cols)
        # checks output_cols early
        spec = OutputSpec(output_cols, extract_quotes, reasoning=strategy == "cot")
        _check_added_columns(df, spec, return_raw_outputs, return_explanations, error_col,
                             overwrite)
        _check_call(output_cols, strategy, batch_size, on_error, max_concurrent_batches,
                    progress)
        documents = _FrameDocuments(df, columns)

        def finish(out: Optional[SemanticExtractOutput]) -> pd.DataFrame:
            frame = _result_frame(df, spec, out, return_raw_outputs, return_explanations,
                                  error_col)
            if on_error == "raise" and out is not None and out.failed:
                _raise_batch(frame, out.failed, next(e for e in out.errors if e is not None),
                             out.errors)
            return frame

        def collect(run: Optional[_Run]) -> pd.DataFrame:
            if run is None:
                return finish(None)
            sink = run.sink
            if not isinstance(sink, _ColumnSink):
                return finish(run.finish())
            run.check_complete()
            frame = sink.frame(df, spec, return_raw_outputs, return_explanations, error_col)
            failed = run.state.failed
            if failed:
                first = sink.errors[min(sink.errors)]
                errors = [sink.errors.get(i) for i in range(len(frame))]
                if on_error == "raise":
                    _raise_batch(frame, failed, first, errors)
                run.report_failures(failed, first, errors, frame)
            return frame

        if not documents.n:
            return None, collect
        # A postprocessor sees every raw answer at the end, so its rows go to a list.
        sink = _ListSink() if postprocessor is not None else \
            _ColumnSink(spec, keep_raw=return_raw_outputs)
        run = _Run(documents, sink, model, output_cols, extract_quotes, batch_size,
                   use_batch_processing, max_concurrent_batches, progress,
                   progress_bar_desc, safe_mode, "return", postprocessor, strategy, mode)
        return run, collect

    def __call__(self, input_cols: Union[str, Sequence[str]], output_cols: Any,
                 extract_quotes: bool = False, postprocessor: Optional[Callable] = None,
                 return_raw_outputs: bool = False, safe_mode: bool = False,
                 progress_bar_desc: str = "Extracting", return_explanations: bool = False,
                 strategy: Any = None, *, prompt_strategy: Any = None, model: Any = None,
                 use_batch_processing: bool = True, batch_size: int = 10,
                 max_concurrent_batches: Optional[int] = None, progress: Any = True,
                 on_error: str = "return", error_col: Optional[str] = "extract_error",
                 overwrite: bool = False, mode: Any = None,
                 **unknown: Any) -> pd.DataFrame:
        run, collect = self._begin(
            input_cols, output_cols, extract_quotes, postprocessor, return_raw_outputs,
            safe_mode, progress_bar_desc, return_explanations,
            _strategy(strategy, prompt_strategy), model,
            use_batch_processing, batch_size, max_concurrent_batches, progress, on_error,
            error_col, overwrite, unknown, mode)
        if run is not None:
            _drive(run)
        return collect(run)

    async def async_extract(self, input_cols: Union[str, Sequence[str]], output_cols: Any,
                            extract_quotes: bool = False,
                            postprocessor: Optional[Callable] = None,
                            return_raw_outputs: bool = False, safe_mode: bool = False,
                            progress_bar_desc: str = "Extracting",
                            return_explanations: bool = False, strategy: Any = None,
                            *, prompt_strategy: Any = None, model: Any = None,
                            use_batch_processing: bool = True,
                            batch_size: int = 10, max_concurrent_batches: Optional[int] = 3,
                            progress: Any = True, on_error: str = "return",
                            error_col: Optional[str] = "extract_error",
                            overwrite: bool = False, mode: Any = None,
                            **unknown: Any) -> pd.DataFrame:
        """Awaitable twin of ``df.sem_extract(...)`` for any running loop."""
        run, collect = self._begin(
            input_cols, output_cols, extract_quotes, postprocessor, return_raw_outputs,
            safe_mode, progress_bar_desc, return_explanations,
            _strategy(strategy, prompt_strategy), model,
            use_batch_processing, batch_size, max_concurrent_batches, progress, on_error,
            error_col, overwrite, unknown, mode)
        if run is not None:
            await _drive_async(run)
        return collect(run)


_KEYWORDS = [p for p in inspect.signature(SemExtractAccessor.__call__).parameters
             if p not in ("self", "unknown")]
