"""df.sem_extract and df.sem_extract.async_extract."""
import asyncio

import numpy as np
import pandas as pd
import pytest

import semex
from semex import errors as E

FIELDS = {"sentiment": "positive/negative/neutral", "product": None}


def test_accessor_adds_columns_in_row_order_with_nan_ints_and_unicode(server, make_lm):
    df = pd.DataFrame({
        "text": ["naïve café ☕", np.nan, "plain", "東京の店"],
        "stars": [5, 3, 1, 4],
    }, index=[10, 20, 30, 40])
    out = df.sem_extract(["text", "stars"], FIELDS, model=make_lm(), progress=False)
    assert list(out.index) == [10, 20, 30, 40]
    assert list(out.columns) == ["text", "stars", "sentiment", "product", "extract_error"]
    # row 20 has only the int column: "[stars]: 3" is its first line
    assert list(out["sentiment"]) == ["sentiment:naïve café ☕", "sentiment:3",
                                      "sentiment:plain", "sentiment:東京の店"]
    assert out["extract_error"].isna().all()
    assert list(df.columns) == ["text", "stars"]  # the input frame is untouched


def test_failed_rows_have_missing_cells_and_an_error(server, make_lm):
    df = pd.DataFrame({"text": ["ok", "bad [[fail=404]]", "fine"]})
    out = df.sem_extract("text", FIELDS, model=make_lm(), use_batch_processing=False,
                         progress=False)
    assert pd.isna(out.loc[1, "sentiment"]) and "404" in out.loc[1, "extract_error"]
    assert out.loc[0, "sentiment"] == "sentiment:ok" and pd.isna(out.loc[0, "extract_error"])


def test_on_error_raise_carries_the_partial_frame(server, make_lm):
    df = pd.DataFrame({"text": ["ok", "bad [[fail=404]]"]})
    with pytest.raises(E.BatchError) as info:
        df.sem_extract(["text"], FIELDS, model=make_lm(), use_batch_processing=False,
                       progress=False, on_error="raise")
    frame = info.value.results
    assert isinstance(frame, pd.DataFrame) and frame.loc[0, "sentiment"] == "sentiment:ok"


def test_async_accessor_inside_a_running_loop(server, make_lm):
    df = pd.DataFrame({"text": [f"row {i}" for i in range(30)]})

    async def cell():
        return await df.sem_extract.async_extract(["text"], FIELDS, model=make_lm(),
                                                  batch_size=4, progress=False)

    out = asyncio.run(cell())
    assert list(out["product"]) == [f"product:row {i}" for i in range(30)]


def test_sync_accessor_inside_a_running_loop_like_a_notebook_cell(server, make_lm):
    df = pd.DataFrame({"text": ["nb1", "nb2"]})

    async def cell():
        return df.sem_extract(["text"], FIELDS, model=make_lm(), progress=False)

    out = asyncio.run(cell())
    assert list(out["sentiment"]) == ["sentiment:nb1", "sentiment:nb2"]


def test_settings_default_model_and_quotes(server, make_lm, monkeypatch):
    monkeypatch.setattr(semex.settings, "lm", make_lm())
    df = pd.DataFrame({"text": ["quote me"]})
    out = df.sem_extract(["text"], FIELDS, extract_quotes=True, return_raw_outputs=True,
                         progress=False)
    assert out.loc[0, "sentiment_quote"] == "quote me"
    assert '"sentiment"' in out.loc[0, "raw_output"]


def test_checks_happen_before_any_request(server, make_lm):
    df = pd.DataFrame({"text": ["x"]})
    lm = make_lm()
    with pytest.raises(E.ConfigurationError, match=r"\['nope'\] not found"):
        df.sem_extract(["nope"], FIELDS, model=lm)
    with pytest.raises(E.ConfigurationError, match="empty"):
        df.sem_extract(["text"], {}, model=lm)
    with pytest.raises(E.ConfigurationError, match="on_error"):
        df.sem_extract(["text"], FIELDS, model=lm, on_error="ignore")
    assert server.log() == []


def test_empty_frame_gets_the_columns_and_sends_nothing(server, make_lm):
    df = pd.DataFrame({"text": pd.Series([], dtype=object)})
    out = df.sem_extract(["text"], FIELDS, model=make_lm(), progress=False)
    assert list(out.columns) == ["text", "sentiment", "product", "extract_error"]
    assert len(out) == 0 and server.log() == []


def test_import_semex_does_not_import_pandas_but_registers_the_accessor_when_it_loads():
    import subprocess
    import sys
    code = (
        "import sys, semex\n"
        "assert 'pandas' not in sys.modules, 'import semex pulled in pandas'\n"
        "import pandas as pd\n"
        "acc = pd.DataFrame({'a': ['x']}).sem_extract\n"
        "print(type(acc).__module__, type(acc).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["semex.accessor", "SemExtractAccessor"]


# -- streaming: chunks (lowered so that small frames cross several) ------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(semex.extract, "_CHUNK_ROWS", 5)


def test_chunked_frame_keeps_order_dedups_across_chunks_and_raises_with_the_full_frame(
        server, make_lm, small_chunks):
    texts = [f"t{i % 7}" if i % 2 else f"row {i}" for i in range(23)]
    texts[8] = texts[19] = "bad [[fail=404]]"  # in the second chunk, and repeated later
    df = pd.DataFrame({"text": texts, "n": range(23)}, index=range(100, 123))
    with pytest.raises(E.BatchError) as info:
        df.sem_extract(["text"], FIELDS, model=make_lm(), use_batch_processing=False,
                       progress=False, on_error="raise", return_raw_outputs=True)
    frame = info.value.results
    assert list(frame.index) == list(range(100, 123))
    assert list(frame.columns) == ["text", "n", "sentiment", "product", "raw_output",
                                   "extract_error"]
    good = [i for i in range(23) if i not in (8, 19)]
    assert [frame["product"].iloc[i] for i in good] == [f"product:{texts[i]}" for i in good]
    for i in (8, 19):
        assert pd.isna(frame["sentiment"].iloc[i]) and pd.isna(frame["raw_output"].iloc[i])
        assert frame["extract_error"].iloc[i].startswith(f"row {i}: ")
        assert "404" in frame["extract_error"].iloc[i]
        assert info.value.errors[i].index == i
    assert frame["extract_error"].iloc[good].isna().all()
    assert sum(e is not None for e in info.value.errors) == 2
    assert str(frame["sentiment"].dtype) == str(pd.Series(["a", None]).dtype)
    assert str(frame["extract_error"].dtype) == str(pd.Series(["a", None]).dtype)
    sent = [d for r in server.log() for d in r["doc_ids"]]
    assert sorted(sent) == sorted(set(t.split(" [[")[0] for t in texts))
    assert list(df.columns) == ["text", "n"] and df["text"].tolist() == texts


def test_chunked_frame_columns_get_the_dtypes_of_a_whole_frame(server, make_lm, small_chunks):
    from typing import Optional

    from pydantic import BaseModel

    class Row(BaseModel):
        words: int
        tags: list
        note: Optional[str] = None

    texts = [f"w {'x ' * (i % 4)}{i}".strip() for i in range(12)]
    df = pd.DataFrame({"text": texts})
    out = df.sem_extract("text", Row, model=make_lm(), batch_size=2, progress=False)
    assert out["words"].dtype == np.int64 and list(out["words"]) == [len(t) for t in texts]
    assert out["tags"].dtype == object and out["tags"].iloc[3] == texts[3].split()
    assert str(out["note"].dtype) == str(pd.Series(["a", None]).dtype)
    # the error column has one dtype, failed rows or not: text with gaps
    assert str(out["extract_error"].dtype) == str(pd.Series(["a", None]).dtype)
    assert out["extract_error"].isna().all()

    # a chunk where every value is missing, another where every row failed
    texts = [f"v{i}" for i in range(15)]
    for i in range(5, 10):
        texts[i] += " [[null]]"
    texts[12] += " [[fail=400]]"
    out = pd.DataFrame({"text": texts}).sem_extract(
        ["text"], FIELDS, model=make_lm(), use_batch_processing=False, progress=False,
        error_col=None)
    assert str(out["sentiment"].dtype) == str(pd.Series(["a", None]).dtype)
    assert out["sentiment"].iloc[5:10].isna().all() and out["sentiment"].iloc[0] == "sentiment:v0"
    assert out["extract_error"].notna().sum() == 1 and "row 12" in out["extract_error"].iloc[12]

    out = pd.DataFrame({"text": [f"z{i} [[null]]" for i in range(11)]}).sem_extract(
        ["text"], FIELDS, model=make_lm(), batch_size=3, progress=False)
    assert out["sentiment"].dtype == object and out["sentiment"].isna().all()


def test_chunked_async_accessor_and_postprocessor(server, make_lm, small_chunks):
    df = pd.DataFrame({"text": [f"q{i % 9}" for i in range(21)]})

    async def cell():
        return await df.sem_extract.async_extract(["text"], FIELDS, model=make_lm(),
                                                  batch_size=2, max_concurrent_batches=2,
                                                  progress=False)

    out = asyncio.run(cell())
    assert list(out["sentiment"]) == [f"sentiment:q{i % 9}" for i in range(21)]

    def shout(raw_outputs, model, cot):
        import json
        return [{k: v.upper() for k, v in json.loads(r).items() if k in FIELDS}
                for r in raw_outputs]

    out = df.sem_extract(["text"], FIELDS, model=make_lm(), postprocessor=shout,
                         progress=False)
    assert list(out["product"]) == [f"PRODUCT:Q{i % 9}" for i in range(21)]


def test_documents_render_from_columns_like_dict_records(server, make_lm):
    df = pd.DataFrame({"a": [1, None, 3], "b": ["x", "y", None],
                       "when": pd.to_datetime(["2024-01-02", None, "2024-03-04"])})
    rendered = semex.accessor._FrameDocuments(df, ["b", "a", "when", "a"]).render(0, 3)
    expected = [semex.extract.render_document(d)
                for d in df[["b", "a", "when"]].to_dict("records")]
    assert rendered == expected
