"""semex: fast, dependable LLM extraction over documents and DataFrames.

A C engine (libcurl workers, a rate-limiting scheduler, ordered results) does the HTTP, the
waiting and the retrying outside the GIL; this package turns documents into requests and
answers into rows.
"""
import logging as _logging

from . import errors
from .batch import llm_batch, llm_batch_async, parallel_query, parallel_query_async
from .errors import RequestError, SemexError
from .lm import LM, LMOutput, Usage
from .settings import settings

__version__ = "0.1.0"

__all__ = [
    "LM",
    "LMOutput",
    "Usage",
    "RequestError",
    "SemexError",
    "errors",
    "llm_batch",
    "llm_batch_async",
    "parallel_query",
    "parallel_query_async",
    "settings",
]

_logging.getLogger("semex").addHandler(_logging.NullHandler())
