"""Vector-store ingestion and retrieval on Qdrant (``pip install 'semex[qdrant]'``).

- ``ingest(chunks, index)``: embed chunks and upsert them as each window of vectors arrives
  (memory grows with the window, not with the number of chunks), skipping ids the store
  already holds (resumable), with a progress bar and usage.
- ``search(queries, index, K)``: embed many queries concurrently and search them in one
  batch call.
- ``df.sem_index(col, index_dir)`` / ``df.sem_search(col, query, K=5)`` (LOTUS's shapes) and
  ``df.sem_search.batch(col, queries, K=5)``.

``index`` is a directory (Qdrant's local mode: embedded, no server) or a Qdrant server URL
``http(s)://host:port/<collection>``. A local directory remembers which embedding model and
dimension filled it (``semex-index.json``); using it with another is an error, because the
vectors of two models are not comparable.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence

from . import errors as E
from .embed import EmbeddingModel, check_texts, embed, _np
from .lm import Usage
from .progress import ProgressBar
from .settings import settings

logger = logging.getLogger("semex")

__all__ = ["IngestResult", "SearchHit", "close_stores", "ingest", "search"]

_META = "semex-index.json"
_DEFAULT_COLLECTION = "semex"
_clients: Dict[str, Any] = {}
_clients_lock = threading.Lock()


@atexit.register
def close_stores() -> None:
    """Close the local-mode Qdrant clients this process opened (each locks its directory);
    semex reopens one on next use. Runs at interpreter exit too."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing must not raise at exit
            logger.debug("closing a Qdrant client failed", exc_info=True)


def _qdrant():
    try:
        import qdrant_client
        from qdrant_client import models
    except ImportError:
        raise ImportError("semex's vector-store helpers need qdrant-client: "
                          "pip install 'semex[qdrant]'") from None
    return qdrant_client, models


class _Store:
    """One collection of a Qdrant store, and (local mode) the model it belongs to."""

    def __init__(self, index: Any, collection: Optional[str] = None, client: Any = None):
        qdrant_client, self.models = _qdrant()
        if client is not None:
            self.client, self.path = client, None
            self.collection = collection or _DEFAULT_COLLECTION
            self.where = f"collection {self.collection!r}"
            return
        if not isinstance(index, (str, os.PathLike)) or not str(index):
            raise E.ConfigurationError(
                f"index must be a directory or a Qdrant URL, got {index!r}")
        index = str(index)
        if index.startswith(("http://", "https://")):
            base, _, name = index.rstrip("/").rpartition("/")
            if "://" not in base or not name or base.endswith(":/"):
                raise E.ConfigurationError(
                    f"a Qdrant URL must end with the collection: http://host:6333/<name>, "
                    f"got {index!r}")
            self.collection = collection or name
            self.path = None
            self.where = f"{base}/{self.collection}"
            self.client = qdrant_client.QdrantClient(url=base)
            return
        self.path = os.path.realpath(index)
        self.collection = collection or _DEFAULT_COLLECTION
        self.where = f"index directory {index!r}"
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise E.ConfigurationError(f"index directory {index!r} is a file")
        with _clients_lock:  # local mode locks its directory: one client per process
            client = _clients.get(self.path)
            if client is None:
                os.makedirs(self.path, exist_ok=True)
                client = _clients[self.path] = qdrant_client.QdrantClient(path=self.path)
        self.client = client

    # -- which model filled it ---------------------------------------------------------------
    def meta(self) -> Optional[dict]:
        if self.path is None:
            return None
        try:
            with open(os.path.join(self.path, _META), encoding="utf-8") as f:
                return json.load(f).get(self.collection)
        except FileNotFoundError:
            return None
        except (ValueError, AttributeError) as exc:
            raise E.ConfigurationError(f"{self.where}: {_META} is unreadable ({exc})") from None

    def write_meta(self, model_name: str, dim: int, **extra: Any) -> None:
        if self.path is None:
            return
        file = os.path.join(self.path, _META)
        try:
            with open(file, encoding="utf-8") as f:
                everything = json.load(f)
        except (FileNotFoundError, ValueError):
            everything = {}
        everything[self.collection] = {"model": model_name, "dimensions": dim, **extra}
        tmp = file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(everything, f, indent=1)
        os.replace(tmp, file)

    def check_model(self, model_name: str, dim: Optional[int] = None) -> Optional[dict]:
        """The error for an index of another model or dimension (before anything is sent
        when the dimension is known)."""
        meta = self.meta()
        if meta:
            if meta.get("model") != model_name:
                raise E.ConfigurationError(
                    f"{self.where} holds vectors of embedding model {meta.get('model')!r} "
                    f"({meta.get('dimensions')} dimensions), not of {model_name!r}: use the "
                    "same model, or another index directory")
            if dim is not None and meta.get("dimensions") != dim:
                raise E.ConfigurationError(
                    f"{self.where} holds {meta.get('dimensions')}-dimensional vectors of "
                    f"{model_name!r}, these are {dim}-dimensional (another `dimensions`?): "
                    "use another index directory")
        if dim is not None and self.exists():
            size = self.vector_size()
            if size is not None and size != dim:
                raise E.ConfigurationError(
                    f"{self.where} holds {size}-dimensional vectors, these are "
                    f"{dim}-dimensional: use another collection")
        return meta

    # -- the collection ------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.client.collection_exists(self.collection)

    def vector_size(self) -> Optional[int]:
        params = self.client.get_collection(self.collection).config.params.vectors
        return getattr(params, "size", None)

    def create(self, dim: int, recreate: bool = False) -> None:
        if recreate and self.exists():
            self.client.delete_collection(self.collection)
        if not self.exists():
            self.client.create_collection(
                self.collection, vectors_config=self.models.VectorParams(
                    size=dim, distance=self.models.Distance.COSINE))

    def present(self, point_ids: List[Any]) -> set:
        found = self.client.retrieve(self.collection, ids=point_ids, with_payload=False,
                                     with_vectors=False)
        return {p.id for p in found}

    def upsert(self, point_ids: List[Any], vectors: Any, payloads: List[dict]) -> None:
        self.client.upsert(self.collection, points=self.models.Batch(
            ids=point_ids, vectors=vectors.tolist(), payloads=payloads))

    def search(self, vectors: Any, k: int) -> List[list]:
        models = self.models
        requests = [models.QueryRequest(query=v, limit=k, with_payload=True)
                    for v in vectors.tolist()]
        answers = self.client.query_batch_points(self.collection, requests=requests)
        return [a.points for a in answers]


def _model_name(rm: Any) -> str:
    return rm.model if isinstance(rm, EmbeddingModel) else type(rm).__name__


def _point_id(value: Any, where: str) -> Any:
    """Qdrant takes unsigned integers and UUIDs; any other string maps to a UUID of its
    own (the original stays in the payload as "id")."""
    np = _np()
    if isinstance(value, (bool, np.bool_)):
        raise E.ConfigurationError(f"{where}: an id must be an int or a str, got {value!r}")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise E.ConfigurationError(f"{where}: id {value} is negative (Qdrant takes "
                                       "unsigned integers, or strings)")
        return int(value)
    if isinstance(value, str) and value:
        try:
            return str(uuid.UUID(value))
        except ValueError:
            return str(uuid.uuid5(uuid.NAMESPACE_URL, "semex:" + value))
    raise E.ConfigurationError(f"{where}: an id must be an int or a non-empty str, got "
                               f"{value!r}")


def _plain(value: Any) -> Any:
    """A payload value Qdrant can store as JSON (numpy scalars and NaN made plain)."""
    np = _np()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


@dataclass
class IngestResult:
    """What ``ingest`` did: chunks upserted, skipped (already in the store), failed (their
    ids and errors), and the embedding usage."""

    upserted: int = 0
    skipped: int = 0
    failed: int = 0
    errors: List[tuple] = field(default_factory=list)   # (chunk id, error)
    usage: Usage = field(default_factory=Usage)


def _chunk_rows(chunks: Any, id_col: str, text_col: str,
                payload_cols: Optional[Sequence[str]]) -> Iterator[tuple]:
    """(position, id, text, payload) per chunk, read lazily: a DataFrame column by column
    slices, an iterable of dicts or (id, text[, payload]) tuples one at a time."""
    if hasattr(chunks, "columns") and hasattr(chunks, "iloc"):  # a DataFrame
        missing = [c for c in [id_col, text_col, *(payload_cols or [])]
                   if c not in chunks.columns]
        if missing:
            raise E.ConfigurationError(f"column(s) {missing} not found in the DataFrame; it "
                                       f"has {list(map(str, chunks.columns))}")
        step = 4096
        cols = list(payload_cols or [])
        for start in range(0, len(chunks), step):
            part = chunks.iloc[start:start + step]
            ids, texts = part[id_col].tolist(), part[text_col].tolist()
            extra = [part[c].tolist() for c in cols]
            for j in range(len(ids)):
                yield (start + j, ids[j], texts[j],
                       {c: _plain(values[j]) for c, values in zip(cols, extra)})
        return
    if isinstance(chunks, (str, bytes, Mapping)):
        raise E.ConfigurationError("chunks must be an iterable of chunks or a DataFrame")
    for pos, chunk in enumerate(chunks):
        if isinstance(chunk, Mapping):
            if id_col not in chunk or text_col not in chunk:
                raise E.ConfigurationError(
                    f"chunks[{pos}] must have {id_col!r} and {text_col!r} keys")
            payload = ({c: _plain(chunk.get(c)) for c in payload_cols} if payload_cols
                       else {k: _plain(v) for k, v in chunk.items()
                             if k not in (id_col, text_col)})
            yield pos, chunk[id_col], chunk[text_col], payload
        elif isinstance(chunk, (tuple, list)) and len(chunk) in (2, 3):
            payload = dict(chunk[2]) if len(chunk) == 3 and chunk[2] else {}
            yield pos, chunk[0], chunk[1], payload
        else:
            raise E.ConfigurationError(
                f"chunks[{pos}] must be a dict with {id_col!r}/{text_col!r} or an "
                f"(id, text[, payload]) tuple, got {type(chunk).__name__}")


def ingest(chunks: Any, index: Any, *, model: Any = None, id_col: str = "id",
           text_col: str = "text", payload_cols: Optional[Sequence[str]] = None,
           collection: Optional[str] = None, window: int = 4096,
           batch_size: Optional[int] = None, max_concurrent: Optional[int] = None,
           progress: bool = True, client: Any = None, store_text: bool = True,
           total: Optional[int] = None) -> IngestResult:
    """Embed chunks into a Qdrant collection, a window at a time; resumable by id.

    chunks: a DataFrame (``id_col``, ``text_col`` and ``payload_cols`` columns) or any
        iterable of dicts (those keys; the other keys become the payload) or of
        ``(id, text[, payload])`` tuples. Ids are ints >= 0 or strings.
    index: a directory (Qdrant local mode) or ``http(s)://host:port/<collection>``.
    window: chunks embedded and upserted per step; memory grows with it, not with the
        number of chunks. Ids the collection already holds are skipped before embedding
        (run it again after an interruption and only the rest is sent).
    store_text: keep each chunk's text in its payload ("text"), for the RAG recipe.
    Failed chunks are left out of the store and reported in ``errors`` (id, error).
    """
    rm = settings.resolve_rm(model)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise E.ConfigurationError(f"window must be an integer >= 1, got {window!r}")
    store = _Store(index, collection, client)
    name = _model_name(rm)
    store.check_model(name, getattr(rm, "_dim", None))
    result = IngestResult()
    if total is None and hasattr(chunks, "__len__"):
        total = len(chunks)
    bar = ProgressBar(total or 0, "Ingesting", enabled=progress and bool(total))
    created = store.exists()
    rows = _chunk_rows(chunks, id_col, text_col, payload_cols)
    try:
        while True:
            block = []
            for row in rows:
                block.append(row)
                if len(block) >= window:
                    break
            if not block:
                break
            created = _ingest_block(store, rm, name, block, result, created, batch_size,
                                    max_concurrent, store_text)
            bar.advance(len(block))
    finally:
        bar.close()
    logger.info("ingest into %s: %d upserted, %d already there, %d failed; %s", store.where,
                result.upserted, result.skipped, result.failed, result.usage.summary())
    if result.failed:
        E.warn_partial(f"ingest: {result.failed} chunks failed and are not in the store "
                       f"(report.errors); first: {result.errors[0][1]}")
    return result


def _ingest_block(store: _Store, rm: Any, name: str, block: List[tuple],
                  result: IngestResult, created: bool, batch_size: Optional[int],
                  max_concurrent: Optional[int], store_text: bool) -> bool:
    point_ids = [_point_id(row[1], f"chunks[{row[0]}]") for row in block]
    if created:
        have = store.present(point_ids)
        if have:
            keep = [j for j, pid in enumerate(point_ids) if pid not in have]
            result.skipped += len(block) - len(keep)
            block = [block[j] for j in keep]
            point_ids = [point_ids[j] for j in keep]
        if not block:
            return created
    texts = check_texts([row[2] for row in block], "texts")
    for j, text in enumerate(texts):
        if not isinstance(block[j][2], str):
            raise E.ConfigurationError(f"chunks[{block[j][0]}]: text must be a str")
    if isinstance(rm, EmbeddingModel):
        output = rm(texts, batch_size=batch_size, max_concurrent=max_concurrent)
        vectors, errors = output.embeddings, output.errors
        result.usage.add(output.usage)
    else:
        vectors = embed(texts, rm, batch_size=batch_size, max_concurrent=max_concurrent)
        errors = [None] * len(texts)
    dim = int(vectors.shape[1])
    if not created:
        store.check_model(name, dim)
        store.create(dim)
        store.write_meta(name, dim)
        created = True
    else:
        store.check_model(name, dim)
    good = [j for j, e in enumerate(errors) if e is None]
    for j, e in enumerate(errors):
        if e is not None:  # named by the chunk, not by its place in this window
            pos, cid = block[j][0], block[j][1]
            text = str(e).split(": ", 1)[-1]
            result.failed += 1
            result.errors.append((cid, type(e)(f"chunks[{pos}] (id {cid!r}): {text}",
                                               index=pos, status=e.status,
                                               attempts=e.attempts, body=e.body)))
    if good:
        payloads = []
        for j in good:
            _pos, cid, text, payload = block[j]
            payload = dict(payload)
            if store_text:
                payload.setdefault("text", text)
            if not isinstance(cid, (int,)) or isinstance(cid, bool):
                payload.setdefault("id", _plain(cid))
            else:
                payload.setdefault("id", int(cid))
            payloads.append(payload)
        np = _np()
        store.upsert([point_ids[j] for j in good], vectors[np.asarray(good)], payloads)
        result.upserted += len(good)
    return created


class SearchHit(NamedTuple):
    """One retrieved chunk: its id (as ingested), cosine similarity, and payload."""

    id: Any
    score: float
    payload: dict


def _embed_queries(rm: Any, queries: Any, name: str = "queries"):
    if isinstance(queries, str):
        raise E.ConfigurationError(f"{name} must be a list of strings (use [query] for one)")
    return embed(check_texts(queries, name), rm, progress=False)


def _check_k(K: Any) -> None:
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise E.ConfigurationError(f"K must be an integer >= 1, got {K!r}")


def search(queries: Sequence[str], index: Any, K: int = 5, *, model: Any = None,
           collection: Optional[str] = None, client: Any = None) -> List[List[SearchHit]]:
    """The K nearest chunks of each query (queries embedded concurrently, searched in one
    batch call), best first."""
    _check_k(K)
    rm = settings.resolve_rm(model)
    store = _Store(index, collection, client)
    store.check_model(_model_name(rm))
    if not store.exists():
        raise E.ConfigurationError(f"{store.where} has no vectors yet: ingest into it first")
    vectors = _embed_queries(rm, queries)
    store.check_model(_model_name(rm), int(vectors.shape[1]))
    return [[SearchHit(p.payload.get("id", p.id) if p.payload else p.id, float(p.score),
                       dict(p.payload or {})) for p in points]
            for points in store.search(vectors, K)]


# -- the DataFrame accessors (registered when pandas is imported: see _pandas_hook) ----------

def _register() -> None:
    import pandas as pd

    @pd.api.extensions.register_dataframe_accessor("sem_index")
    class SemIndexAccessor:
        """``df.sem_index(col, index_dir)``: embed the column into a Qdrant collection and
        remember the index in ``df.attrs["index_dirs"][col]`` (as LOTUS does); returns the
        DataFrame. The collection is rebuilt on each call; index labels must be int or str
        (they are how sem_search finds the rows again)."""

        def __init__(self, df: pd.DataFrame):
            self._df = df

        def __call__(self, col_name: str, index_dir: Any, *, model: Any = None,
                     batch_size: Optional[int] = None, progress: bool = True,
                     client: Any = None) -> pd.DataFrame:
            df = self._df
            if col_name not in df.columns:
                raise E.ConfigurationError(
                    f"column {col_name!r} not found in the DataFrame; it has "
                    f"{list(map(str, df.columns))}")
            rm = settings.resolve_rm(model)
            texts = check_texts(df[col_name].tolist(), f"df[{col_name!r}]")
            store = _Store(index_dir, None, client)
            name = _model_name(rm)
            store.check_model(name, getattr(rm, "_dim", None))
            vectors = embed(texts, rm, batch_size=batch_size, progress=progress)
            dim = int(vectors.shape[1])
            store.check_model(name, dim)
            store.create(dim, recreate=True)
            store.write_meta(name, dim, column=col_name, rows=len(texts))
            labels = [_plain(v) for v in df.index.tolist()]
            bad = next((v for v in labels if isinstance(v, bool) or
                        not isinstance(v, (int, str))), None)
            if bad is not None:
                raise E.ConfigurationError(
                    f"sem_index needs int or str index labels, got {bad!r}: "
                    "reset_index() first")
            step = 4096
            for start in range(0, len(texts), step):
                stop = min(len(texts), start + step)
                store.upsert(list(range(start, stop)), vectors[start:stop],
                             [{"label": labels[i]} for i in range(start, stop)])
            index_dirs = dict(df.attrs.get("index_dirs", {}))
            index_dirs[col_name] = index_dir
            df.attrs["index_dirs"] = index_dirs
            return df

    @pd.api.extensions.register_dataframe_accessor("sem_search")
    class SemSearchAccessor:
        """``df.sem_search(col, query, K=5)``: the K rows nearest to the query, best first
        (LOTUS's shape; ``return_scores`` adds ``vec_scores<suffix>``). Rows of the indexed
        frame that are no longer in ``df`` are passed over. ``.batch(col, queries, K)`` does
        many queries at once and returns one such frame per query."""

        def __init__(self, df: pd.DataFrame):
            self._df = df

        def __call__(self, col_name: str, query: str, K: int = 5, *,
                     return_scores: bool = False, suffix: str = "_sim_score",
                     model: Any = None, client: Any = None) -> pd.DataFrame:
            if not isinstance(query, str):
                raise E.ConfigurationError(
                    "query must be a str; use df.sem_search.batch(col, queries, K) for many")
            return self.batch(col_name, [query], K, return_scores=return_scores,
                              suffix=suffix, model=model, client=client)[0]

        def batch(self, col_name: str, queries: Sequence[str], K: int = 5, *,
                  return_scores: bool = False, suffix: str = "_sim_score",
                  model: Any = None, client: Any = None) -> List[pd.DataFrame]:
            df = self._df
            _check_k(K)
            index_dir = df.attrs.get("index_dirs", {}).get(col_name)
            if index_dir is None:
                raise E.ConfigurationError(
                    f"column {col_name!r} has no index: call df.sem_index({col_name!r}, "
                    "index_dir) first")
            rm = settings.resolve_rm(model)
            store = _Store(index_dir, None, client)
            meta = store.check_model(_model_name(rm))
            if not store.exists():
                raise E.ConfigurationError(f"{store.where} has no vectors: call sem_index")
            vectors = _embed_queries(rm, queries)
            store.check_model(_model_name(rm), int(vectors.shape[1]))
            total = (meta or {}).get("rows") or store.client.count(store.collection).count
            present = df.index
            frames = []
            want = min(K, len(df))
            k = want
            pending = list(range(len(queries))) if want else []
            found: Dict[int, tuple] = {q: ([], []) for q in range(len(queries))}
            while pending:
                answers = store.search(vectors[pending], k)
                still = []
                for q, points in zip(pending, answers):
                    labels, scores = [], []
                    for p in points:
                        label = (p.payload or {}).get("label", p.id)
                        if label in present:
                            labels.append(label)
                            scores.append(float(p.score))
                    if len(labels) >= want or k >= total:
                        found[q] = (labels[:want], scores[:want])
                    else:
                        still.append(q)  # rows filtered out of df: look further
                pending, k = still, min(total, k * 2)
            for q in range(len(queries)):
                labels, scores = found[q]
                frame = df.loc[labels]
                frame.attrs["index_dirs"] = df.attrs.get("index_dirs")
                if return_scores:
                    frame = frame.copy()
                    frame["vec_scores" + suffix] = scores
                frames.append(frame)
            return frames
