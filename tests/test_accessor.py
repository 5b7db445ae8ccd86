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
