"""semex: fast, dependable LLM extraction over documents and DataFrames.

A C engine (libcurl workers, a rate-limiting scheduler, ordered results) does the HTTP, the
waiting and the retrying outside the GIL; this package turns documents into requests and
answers into rows.
"""
import logging as _logging

from . import errors
from . import pricing
from .embed import EmbeddingModel, EmbeddingOutput, embed, embed_async
from .cache import Cache
from .batch_api import BatchMode
from .batch import (Results, llm_batch, llm_batch_async, llm_query, llm_query_async,
                    map_reduce, map_reduce_async, parallel_query, parallel_query_async)
from .errors import ErrorText, RequestError, SemexError
from .extract import SemanticExtractOutput, sem_extract, sem_extract_async
from .lm import LM, DeploymentUsage, LMOutput, Usage
from .deployments import Deployment
from .retrieval import IngestResult, SearchHit, ingest, search
from .settings import settings
from ._pandas_hook import register_accessor_with_pandas as _register_accessor

_register_accessor()  # df.sem_extract, once pandas is (or gets) imported

__version__ = "0.1.0"

__all__ = [
    "BatchMode",
    "EmbeddingModel",
    "EmbeddingOutput",
    "IngestResult",
    "Cache",
    "Deployment",
    "DeploymentUsage",
    "LM",
    "LMOutput",
    "Usage",
    "ErrorText",
    "RequestError",
    "Results",
    "SearchHit",
    "SemanticExtractOutput",
    "SemexError",
    "embed",
    "embed_async",
    "errors",
    "ingest",
    "llm_batch",
    "llm_batch_async",
    "llm_query",
    "llm_query_async",
    "map_reduce",
    "map_reduce_async",
    "parallel_query",
    "parallel_query_async",
    "pricing",
    "search",
    "sem_extract",
    "sem_extract_async",
    "settings",
]

_logging.getLogger("semex").addHandler(_logging.NullHandler())
