"""Type stubs for semex._engine, the C concurrency engine (see csrc/engine.h)."""
from typing import Any, Dict, List, Optional, Sequence, Tuple

PENDING: int
OK: int
FAILED: int
CANCELLED: int
ERR_NONE: int
ERR_HTTP: int
ERR_TIMEOUT: int
ERR_CONNECTION: int
ERR_AUTH: int
ERR_QUOTA: int
ERR_BODY_CAP: int
ERR_ABORTED: int
ERR_TRANSPORT: int
ERR_CANCELLED: int
DIALECT_OPENAI: int
DIALECT_ANTHROPIC: int
DIALECT_GEMINI: int
LIBCURL_BUILD_VERSION: str

class EngineError(RuntimeError): ...

# (state, error_kind, http_status, body, error, attempts, latency_seconds)
SlotResult = Tuple[int, int, int, Optional[bytes], Optional[str], int, float]
# (state, error_kind, http_status, body, error, attempts, (content, finish_reason,
#  prompt_tokens, completion_tokens, total_tokens) or None)
ChatSlotResult = Tuple[int, int, int, Optional[bytes], Optional[str], int,
                       Optional[Tuple[Optional[str], Optional[str], int, int, int]]]

class Batch:
    @property
    def done(self) -> bool: ...
    @property
    def completed(self) -> int: ...
    def __len__(self) -> int: ...
    def wait(self, timeout: Optional[float] = None) -> bool: ...
    def fileno(self) -> int: ...
    def clear_notify(self) -> int: ...
    def cancel(self) -> None: ...
    def progress(self) -> Tuple[int, int, int, int, int, int]: ...
    def results(self) -> List[SlotResult]: ...
    def chat_results(self) -> List[ChatSlotResult]: ...
    def chat_result(self, offset: int) -> ChatSlotResult: ...
    # (offset, prompt, completion, total tokens) of successes whose usage Python read;
    # returns how many settled
    def settle(self, usage: List[Tuple[int, int, int, int]]) -> int: ...
    # (rest offsets, requests, retries, prompt_tokens, completion_tokens, total_tokens)
    def collect_chat(self, outputs: List[Optional[str]], finish_reasons: List[Optional[str]],
                     start: int) -> Tuple[List[int], int, int, int, int, int]: ...
    # (index, text) in arrival order; text None: discard the index's earlier text
    def take_deltas(self) -> List[Tuple[int, Optional[str]]]: ...
    # the deployment of each request's last attempt (-1: never sent); None without deployments
    def deployments(self) -> Optional[List[int]]: ...
    # out: writable C-contiguous float32 (rows, dim); rows, offsets: int64; row_state: uint8.
    # Last item (prompt_tokens, total_tokens, vectors, out_of_range, bad_length) or None.
    def read_embeddings(self, out: Any, rows: Any, offsets: Any, row_state: Any
                        ) -> List[Tuple[int, int, int, Optional[bytes], Optional[str], int,
                                        Optional[Tuple[int, int, int, int, int]]]]: ...

# (flags: 1 where a row was read, one list of values per name)
def read_rows(contents: List[Optional[str]], names: Tuple[str, ...], kinds: bytes
              ) -> Tuple[bytearray, Tuple[List[Any], ...]]: ...
# None where Python must render the row
def render_docs(keys: Tuple[str, ...], columns: Tuple[List[Any], ...]) -> List[Optional[str]]: ...
def render_dicts(docs: List[Any]) -> List[Optional[str]]: ...
# {names[k]: columns[k][i]} for each flagged i, else None
def row_dicts(names: Tuple[str, ...], columns: Tuple[List[Any], ...], flags: bytes
              ) -> List[Optional[Dict[str, Any]]]: ...
# head + JSON string of each text + tail; None where Python must write it
def chat_bodies(head: bytes, texts: List[Any], tail: bytes) -> List[Optional[bytes]]: ...

class Engine:
    workers: int
    max_in_flight: int
    rpm: float
    tpm: float
    def __init__(self, *, workers: int = 1, max_in_flight: int = 64, rpm: float = 0.0,
                 tpm: float = 0.0, adaptive: bool = True, queue_limit: int = 1000000,
                 http2: bool = True, max_connections: int = 0, lease: bool = False,
                 lease_tokens: bool = False,
                 deployments: Optional[Sequence[Tuple[float, float, float, int]]] = None
                 ) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def forked(self) -> bool: ...
    def submit(self, url: str, headers: Sequence[str], bodies: Sequence[Optional[bytes]],
               tokens: Optional[Sequence[float]] = None, *, timeout: float = 60.0,
               connect_timeout: float = 10.0, max_retries: int = 5,
               max_body: int = 67108864, verify: bool = True, backoff_base: float = 0.5,
               backoff_cap: float = 30.0, notify_each: bool = False,
               max_in_flight: int = 0, parse_chat: int = 0,
               share_cap_with: Optional[Batch] = None,
               total_timeout: float = 0.0, stream_deltas: bool = False,
               ca_file: Optional[str] = None, ca_path: Optional[str] = None,
               max_hint_wait: float = 120.0,
               targets: Optional[Sequence[Tuple[str, Sequence[str]]]] = None) -> Batch: ...
    def close(self) -> None: ...
    def stats(self) -> dict: ...
    def grant(self, requests: float, tokens: float = 0.0) -> None: ...
    def lease(self) -> Tuple[float, float, float, float]: ...

def curl_version() -> str: ...
# the answer cache's keys of plain-string prompts, 16 bytes each (csrc/cachekey.h); None when
# one is not a str or holds a lone surrogate
def prompt_keys(head: bytes, close: bytes, prompts: Sequence[Any]) -> Optional[bytes]: ...
