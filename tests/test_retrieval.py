"""sem_index / sem_search / ingest / search on Qdrant's local mode, embeddings from the fake
server (a hashed bag of words: texts sharing words are nearest)."""
import numpy as np
import pandas as pd
import pytest

import semex
from semex import errors as E

pytest.importorskip("qdrant_client")

COURSES = ["Probability and Random Processes", "Optimization Methods in Engineering",
           "Digital Design and Integrated Circuits", "Computer Security",
           "Introduction to Computer Science", "Introduction to Data Science",
           "Introduction to Machine Learning", "Introduction to Robotics",
           "Network Security and Cryptography", "Deep Learning"]


@pytest.fixture
def rm(server):
    model = semex.EmbeddingModel("test-embed", api_base=server.base_url,
                                 api_key=server.api_key, dimensions=64, timeout=10.0)
    yield model
    model.close()


def embedding_requests(server):
    return [r for r in server.log() if r.get("embeddings")]


def test_sem_index_then_sem_search_finds_the_nearest_rows(rm, tmp_path):
    df = pd.DataFrame({"course": COURSES, "units": range(len(COURSES))})
    out = df.sem_index("course", str(tmp_path / "idx"), model=rm, progress=False)
    assert out is df and df.attrs["index_dirs"] == {"course": str(tmp_path / "idx")}
    hits = df.sem_search("course", "security", K=2, model=rm)
    assert list(hits.columns) == ["course", "units"]
    assert set(hits["course"]) == {"Computer Security", "Network Security and Cryptography"}
    scored = df.sem_search("course", "computer security", K=3, return_scores=True, model=rm)
    assert scored["course"].iloc[0] == "Computer Security"
    scores = scored["vec_scores_sim_score"].tolist()
    assert scores == sorted(scores, reverse=True) and len(scores) == 3


def test_sem_search_passes_over_rows_filtered_out(rm, tmp_path):
    df = pd.DataFrame({"course": COURSES}, index=[f"c{i}" for i in range(len(COURSES))])
    df.sem_index("course", str(tmp_path / "idx"), model=rm, progress=False)
    subset = df[df["course"] != "Computer Security"]
    hits = subset.sem_search("course", "computer security", K=2, model=rm)
    assert "Computer Security" not in set(hits["course"])
    assert len(hits) == 2 and all(label in subset.index for label in hits.index)


def test_batch_search_embeds_all_queries_in_one_call(rm, server, tmp_path):
    df = pd.DataFrame({"course": COURSES})
    df.sem_index("course", str(tmp_path / "idx"), model=rm, progress=False)
    server.reset()
    queries = ["security", "learning", "robotics", "data science"]
    frames = df.sem_search.batch("course", queries, K=1, model=rm)
    assert [f["course"].iloc[0] for f in frames] == [
        "Computer Security", "Deep Learning", "Introduction to Robotics",
        "Introduction to Data Science"]
    reqs = embedding_requests(server)
    assert len(reqs) == 1 and reqs[0]["inputs"] == queries


def test_an_index_of_another_model_or_dimension_is_refused(rm, server, tmp_path):
    df = pd.DataFrame({"course": COURSES})
    where = str(tmp_path / "idx")
    df.sem_index("course", where, model=rm, progress=False)
    other = semex.EmbeddingModel("other-model", api_base=server.base_url,
                                 api_key=server.api_key, dimensions=64)
    narrow = semex.EmbeddingModel("test-embed", api_base=server.base_url,
                                  api_key=server.api_key, dimensions=32)
    try:
        with pytest.raises(E.ConfigurationError, match="'other-model'.*another index"):
            df.sem_search("course", "security", K=1, model=other)
        with pytest.raises(E.ConfigurationError, match="64-dimensional.*32-dimensional"):
            df.sem_search("course", "security", K=1, model=narrow)
        with pytest.raises(E.ConfigurationError, match="'test-embed'"):
            df.sem_index("course", where, model=other, progress=False)
    finally:
        other.close()
        narrow.close()


def test_bad_search_input_is_named(rm, tmp_path):
    df = pd.DataFrame({"course": COURSES})
    with pytest.raises(E.ConfigurationError, match="has no index"):
        df.sem_search("course", "x", K=1, model=rm)
    with pytest.raises(E.ConfigurationError, match="column 'nope' not found"):
        df.sem_index("nope", str(tmp_path / "i"), model=rm)
    df.sem_index("course", str(tmp_path / "i"), model=rm, progress=False)
    with pytest.raises(E.ConfigurationError, match="K must be an integer >= 1"):
        df.sem_search("course", "x", K=0, model=rm)
    with pytest.raises(E.ConfigurationError, match="query must be a str"):
        df.sem_search("course", ["x"], K=1, model=rm)
    bad = pd.DataFrame({"course": ["fine", None]})
    with pytest.raises(E.ConfigurationError, match=r"df\['course'\]\[1\] is (None|NaN)"):
        bad.sem_index("course", str(tmp_path / "j"), model=rm)


def test_ingest_upserts_in_windows_and_resumes_by_id(rm, server, tmp_path):
    where = str(tmp_path / "store")
    chunks = [{"id": i, "text": f"chunk {i} about {COURSES[i % len(COURSES)]}",
               "source": f"doc{i // 10}"} for i in range(45)]
    first = semex.ingest(iter(chunks[:30]), where, model=rm, window=8, progress=False)
    assert (first.upserted, first.skipped, first.failed) == (30, 0, 0)
    assert first.usage.requests == 4 and first.usage.prompt_tokens > 0
    server.reset()
    again = semex.ingest(chunks, where, model=rm, window=8, progress=False)
    assert (again.upserted, again.skipped) == (15, 30)
    sent = [t for r in embedding_requests(server) for t in r["inputs"]]
    assert sorted(sent) == sorted(c["text"] for c in chunks[30:])  # only the new ones
    hits = semex.search(["Computer Security", "Deep Learning"], where, K=3, model=rm)
    assert len(hits) == 2 and all(len(h) == 3 for h in hits)
    top = hits[0][0]
    assert "Computer Security" in top.payload["text"] and top.payload["source"].startswith("doc")
    assert top.id == top.payload["id"] and isinstance(top.id, int)


def test_ingest_a_dataframe_with_string_ids_and_failures(rm, tmp_path):
    where = str(tmp_path / "store")
    df = pd.DataFrame({"chunk_id": ["a-1", "b-2", "c-3", "d-4"],
                       "body": ["alpha text", "beta [[fail=400]]", "gamma text", "delta"],
                       "page": np.arange(4)})
    with pytest.warns(E.PartialFailureWarning, match="ingest: 1 chunks failed"):
        result = semex.ingest(df, where, model=rm, id_col="chunk_id", text_col="body",
                              payload_cols=["page"], batch_size=1, progress=False)
    assert (result.upserted, result.failed) == (3, 1)
    assert result.errors[0][0] == "b-2" and isinstance(result.errors[0][1], E.APIStatusError)
    assert str(result.errors[0][1]).startswith("chunks[1] (id 'b-2'): HTTP 400")
    assert result.errors[0][1].index == 1
    hits = semex.search(["gamma"], where, K=1, model=rm)[0]
    assert hits[0].id == "c-3" and hits[0].payload["page"] == 2
    with pytest.raises(E.ConfigurationError, match=r"column\(s\) \['nope'\] not found"):
        semex.ingest(df, where, model=rm, id_col="nope", text_col="body", progress=False)
    with pytest.raises(E.ConfigurationError, match=r"chunks\[0\]: id -1 is negative"):
        semex.ingest([(-1, "x")], where, model=rm, progress=False)


def test_import_semex_loads_neither_pandas_numpy_nor_qdrant():
    import subprocess
    import sys

    code = ("import sys, semex; print(sorted(m for m in ('pandas', 'numpy', 'qdrant_client') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_searching_an_emptied_frame_returns_empty_frames(rm, tmp_path):
    df = pd.DataFrame({"course": COURSES})
    df.sem_index("course", str(tmp_path / "idx"), model=rm, progress=False)
    empty = df[df["course"] == "nothing"]
    hits = empty.sem_search("course", "security", K=3, model=rm)
    assert len(hits) == 0 and list(hits.columns) == ["course"]
