"""The pandas accessor: ``df.sem_extract(...)`` and ``await df.sem_extract.async_extract(...)``.

Registered when semex is imported. Returns a new DataFrame: the input columns plus one column
per output (and per quote with ``extract_quotes``), in row order. Failed rows are visible:
their output cells are missing and the error column carries the reason.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import pandas as pd

from . import errors as E
from ._schema import OutputSpec
from .extract import SemanticExtractOutput, sem_extract, sem_extract_async

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


def _result_frame(df: pd.DataFrame, spec: OutputSpec, out: Optional[SemanticExtractOutput],
                  return_raw_outputs: bool, return_explanations: bool,
                  error_col: Optional[str]) -> pd.DataFrame:
    frame = df.copy()
    n = len(df)
    for column in spec.all_columns:
        frame[column] = [row.get(column) for row in out.outputs] if out else [None] * n
    if return_raw_outputs:
        frame["raw_output"] = out.raw_outputs if out else [None] * n
    if return_explanations:
        frame["explanation"] = out.explanations if out else [None] * n
    errors = out.errors if out else [None] * n
    if error_col is not None or any(errors):
        frame[error_col or "extract_error"] = [str(e) if e is not None else None
                                               for e in errors]
    return frame


@pd.api.extensions.register_dataframe_accessor("sem_extract")
class SemExtractAccessor:
    """``df.sem_extract(input_cols, output_cols, ...)``: LLM extraction over a DataFrame.

    Parameters (LOTUS's names and order, then semex's keyword-only extras)
    ----------
    input_cols: the columns the model reads (a name or a list of names).
    output_cols: ``{"name": "description or None"}`` or a pydantic model class.
    extract_quotes: add ``{name}_quote`` columns with the verbatim supporting span.
    postprocessor, safe_mode, progress_bar_desc, return_explanations, prompt_strategy:
        as in :func:`semex.sem_extract`.
    return_raw_outputs: add a ``raw_output`` column with each row's raw answer.
    model: a ``semex.LM`` or any model object; default ``settings.lm``.
    use_batch_processing, batch_size, max_concurrent_batches, progress: as in sem_extract.
    on_error: "return" (default; failed rows have missing cells and an error) or "raise"
        (a ``semex.errors.BatchError`` after the run; its ``.results`` is the full frame).
    error_col: name of the error column (None: add it only when a row failed).
    """

    def __init__(self, df: pd.DataFrame):
        self._df = df

    def _prepare(self, input_cols, output_cols, extract_quotes, on_error):
        df = self._df
        columns = _input_columns(df, input_cols)
        spec = OutputSpec(output_cols, extract_quotes)  # checks output_cols early
        if on_error not in ("return", "raise"):
            raise E.ConfigurationError(f"on_error must be 'return' or 'raise', got {on_error!r}")
        docs = df[columns].to_dict("records")
        return spec, docs

    def _finish(self, spec, out, return_raw_outputs, return_explanations, error_col,
                on_error):
        frame = _result_frame(self._df, spec, out, return_raw_outputs, return_explanations,
                              error_col)
        if on_error == "raise" and out is not None and out.failed:
            first = next(e for e in out.errors if e is not None)
            raise E.BatchError(f"{out.failed} of {len(frame)} rows failed; first: {first}. "
                               "The exception's .results is the full DataFrame.",
                               results=frame, errors=out.errors)
        return frame

    def __call__(self, input_cols: Union[str, Sequence[str]], output_cols: Any,
                 extract_quotes: bool = False, postprocessor: Optional[Callable] = None,
                 return_raw_outputs: bool = False, safe_mode: bool = False,
                 progress_bar_desc: str = "Extracting", return_explanations: bool = False,
                 prompt_strategy: Any = None, *, model: Any = None,
                 use_batch_processing: bool = True, batch_size: int = 10,
                 max_concurrent_batches: Optional[int] = None, progress: bool = True,
                 on_error: str = "return", error_col: Optional[str] = "extract_error"
                 ) -> pd.DataFrame:
        spec, docs = self._prepare(input_cols, output_cols, extract_quotes, on_error)
        out = None
        if docs:
            out = sem_extract(docs, model, output_cols, extract_quotes, postprocessor,
                              return_raw_outputs, safe_mode, progress_bar_desc,
                              use_batch_processing, batch_size, return_explanations,
                              prompt_strategy, max_concurrent_batches=max_concurrent_batches,
                              progress=progress, on_error="return")
        return self._finish(spec, out, return_raw_outputs, return_explanations, error_col,
                            on_error)

    async def async_extract(self, input_cols: Union[str, Sequence[str]], output_cols: Any,
                            extract_quotes: bool = False,
                            postprocessor: Optional[Callable] = None,
                            return_raw_outputs: bool = False, safe_mode: bool = False,
                            progress_bar_desc: str = "Extracting",
                            return_explanations: bool = False, prompt_strategy: Any = None,
                            *, model: Any = None, use_batch_processing: bool = True,
                            batch_size: int = 10, max_concurrent_batches: Optional[int] = 3,
                            progress: bool = True, on_error: str = "return",
                            error_col: Optional[str] = "extract_error") -> pd.DataFrame:
        """Awaitable twin of ``df.sem_extract(...)`` for any running loop."""
        spec, docs = self._prepare(input_cols, output_cols, extract_quotes, on_error)
        out = None
        if docs:
            out = await sem_extract_async(
                docs, model, output_cols, extract_quotes, postprocessor, return_raw_outputs,
                safe_mode, progress_bar_desc, use_batch_processing, batch_size,
                return_explanations, prompt_strategy,
                max_concurrent_batches=max_concurrent_batches, progress=progress,
                on_error="return")
        return self._finish(spec, out, return_raw_outputs, return_explanations, error_col,
                            on_error)
