"""What a newcomer hits in the first hour: nothing silent, nothing overwritten, no long
silent waits. Each test failed before the change it comes with."""
import os
import socket
import time
import warnings

import pandas as pd
import pytest

import semex
from semex import errors as E

FIELDS = {"sentiment": None, "product": None}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chat_requests(server):
    return [r for r in server.log() if r["key"] is not None]


def dead_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nobody listens there


# -- columns are never silently overwritten -----------------------------------------------------

@pytest.mark.parametrize("frame, outputs, options, clash", [
    ({"text": ["a"], "product": ["mine"]}, FIELDS, {}, "product"),      # the frame's own column
    ({"review": ["a"]}, {"review": None}, {}, "review"),                # the text it reads
    ({"text": ["a"], "extract_error": ["x"]}, FIELDS, {}, "extract_error"),  # the error column
    ({"text": ["a"], "raw_output": ["x"]}, FIELDS, {"return_raw_outputs": True}, "raw_output"),
])
def test_an_existing_column_is_not_overwritten(server, make_lm, frame, outputs, options,
                                               clash):
    df = pd.DataFrame(frame)
    col = list(frame)[0]
    with pytest.raises(E.ConfigurationError, match=f"already has the column.*{clash}"):
        df.sem_extract([col], outputs, model=make_lm(), progress=False, **options)
    assert chat_requests(server) == []
    assert df[clash].tolist() == frame[clash]  # the input is untouched


def test_an_output_named_like_the_error_column_is_refused(server, make_lm):
    df = pd.DataFrame({"text": ["a"]})
    with pytest.raises(E.ConfigurationError, match="also the error column"):
        df.sem_extract(["text"], {"extract_error": None}, model=make_lm(), progress=False)
    out = df.sem_extract(["text"], {"extract_error": None}, model=make_lm(), progress=False,
                         error_col="why")
    assert out.loc[0, "extract_error"] == "extract_error:a" and pd.isna(out.loc[0, "why"])


def test_overwrite_true_replaces_the_column(server, make_lm):
    df = pd.DataFrame({"text": ["a"], "product": ["mine"]})
    out = df.sem_extract(["text"], FIELDS, model=make_lm(), progress=False, overwrite=True)
    assert out.loc[0, "product"] == "product:a" and df.loc[0, "product"] == "mine"


# -- failures are not quiet ---------------------------------------------------------------------

def test_some_rows_failing_gives_one_visible_warning(server, make_lm):
    df = pd.DataFrame({"text": ["a", "b [[fail=404]]", "c"]})
    with pytest.warns(E.PartialFailureWarning, match="1 of 3 rows failed") as caught:
        out = df.sem_extract(["text"], FIELDS, model=make_lm(), batch_size=1, progress=False)
    assert caught[0].filename == __file__  # attributed to the caller, not to semex
    assert out["product"].isna().tolist() == [False, True, False]
    with pytest.warns(E.PartialFailureWarning):
        semex.sem_extract([{"t": "x [[fail=404]]"}, {"t": "y"}], make_lm(), FIELDS,
                          batch_size=1, progress=False)


def test_every_row_failing_on_a_bad_key_raises(server, make_lm):
    df = pd.DataFrame({"text": [f"r{i}" for i in range(5)]})
    with pytest.raises(E.AuthenticationError, match="all 5 rows failed") as caught:
        df.sem_extract(["text"], FIELDS, model=make_lm(api_key="sk-wrong"), progress=False)
    assert isinstance(caught.value.results, pd.DataFrame) and len(caught.value.results) == 5
    assert all(e is not None for e in caught.value.errors)
    assert "sk-wrong" not in str(caught.value)


def test_every_row_failing_on_a_refused_connection_raises_fast(make_lm):
    lm = semex.LM("m", api_base=f"http://127.0.0.1:{dead_port()}/v1", max_retries=6,
                  backoff_base=0.05, backoff_cap=0.2)
    try:
        df = pd.DataFrame({"text": ["a", "b"]})
        with pytest.raises(E.APIConnectionError, match="all 2 rows failed") as caught:
            df.sem_extract(["text"], FIELDS, model=lm, batch_size=1, progress=False)
        # refused connections are tried 3 times, not 1 + max_retries
        assert [e.attempts for e in caught.value.errors] == [3, 3]
    finally:
        lm.close()


def test_every_row_failing_on_a_server_error_returns_the_rows(server, make_lm):
    df = pd.DataFrame({"text": [f"r{i} [[fail=500]]" for i in range(3)]})
    with pytest.warns(E.PartialFailureWarning, match="3 of 3"):
        out = df.sem_extract(["text"], FIELDS, model=make_lm(max_retries=0), batch_size=1,
                             progress=False)
    assert out["extract_error"].str.contains("500").all()


def test_the_bar_ends_with_the_error_count_and_a_rate_on_a_fast_run(server, make_lm, capsys):
    df = pd.DataFrame({"text": ["a", "b [[fail=404]]", "c [[fail=404]]"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.PartialFailureWarning)
        df.sem_extract(["text"], FIELDS, model=make_lm(), batch_size=1, progress=True)
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "errors=2" in last and "3/3" in last
    assert "req/s=0," not in last and "req/s=" in last


# -- no long silent waits -----------------------------------------------------------------------

def test_no_api_key_for_a_public_api_fails_before_sending(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(E.ConfigurationError, match="no API key.*OPENAI_API_KEY"):
        semex.LM("gpt-4o-mini")
    with pytest.raises(E.ConfigurationError, match="no API key.*GROQ_API_KEY"):
        semex.LM("groq/llama-3.1-8b-instant")
    for base in ("http://127.0.0.1:8000/v1", "http://localhost:11434/v1",
                 "http://10.1.2.3:8000/v1", "http://vllm:8000/v1"):
        assert semex.LM("m", api_base=base).api_base == base  # local: no key needed
    assert semex.LM("gpt-4o-mini", api_key="").api_base.startswith("https://")  # on purpose


def test_a_server_that_never_answers_is_bounded_by_total_timeout(server, make_lm):
    lm = make_lm(timeout=0.4, total_timeout=1.0, max_retries=6)
    started = time.monotonic()
    result = semex.llm_batch(["hang [[stall]]"], model=lm, errors="objects")
    elapsed = time.monotonic() - started
    error = result[0]
    assert isinstance(error, E.RequestTimeoutError)
    assert "total_timeout of 1 s spent" in str(error)
    assert 2 <= error.attempts <= 4  # not 1 + max_retries
    assert elapsed < 0.4 * 7  # far below max_retries full timeouts
    with pytest.raises(E.ConfigurationError, match="total_timeout"):
        make_lm(total_timeout=0)


def test_a_404_from_a_base_without_v1_hints_at_it(server):
    lm = semex.LM("m", api_base=server.base_url[:-len("/v1")], api_key=server.api_key,
                  max_retries=0)
    try:
        result = semex.llm_batch(["x [[fail=404]]"], model=lm)
        assert "api_base need to end in /v1" in result[0]
    finally:
        lm.close()


# -- small things -------------------------------------------------------------------------------

def test_an_unknown_keyword_suggests_the_right_name(server, make_lm):
    df = pd.DataFrame({"text": ["a"]})
    with pytest.raises(E.UnknownParameterError, match="did you mean 'max_concurrent_batches'"):
        df.sem_extract(["text"], FIELDS, model=make_lm(), max_concurrent=3)
    with pytest.raises(TypeError, match="batchsize"):
        semex.sem_extract([{"t": "a"}], make_lm(), FIELDS, batchsize=3)
    assert chat_requests(server) == []


def test_the_error_column_has_one_dtype_with_or_without_failures(server, make_lm):
    lm = make_lm()
    ok = pd.DataFrame({"text": ["a"]}).sem_extract(["text"], FIELDS, model=lm, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.PartialFailureWarning)
        bad = pd.DataFrame({"text": ["a", "b [[fail=404]]"]}).sem_extract(
            ["text"], FIELDS, model=lm, batch_size=1, progress=False)
    assert ok["extract_error"].dtype == bad["extract_error"].dtype
    assert pd.isna(ok.loc[0, "extract_error"]) and pd.isna(bad.loc[0, "extract_error"])


def test_license_file_matches_pyproject():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'license = "MIT"' in f.read()
    assert text.startswith("MIT License")
