"""Programs written for LOTUS and for RLM-style llm_batch/parallel_query helpers run
unchanged on semex: their idioms, verbatim, against the fake server over real HTTP."""
import asyncio
import inspect
import logging

import pandas as pd
import pytest

import semex
from semex import errors as E

FIELDS = {"sentiment": None, "product": None}


def docs_of(texts):
    return [{"text": t} for t in texts]


def chat_requests(server):
    return [r for r in server.log() if r["key"] is not None]


# -- 1. failed prompts are strings that say "Error:" -------------------------------------------

def test_join_and_error_check_idioms_survive_a_failed_item(server, make_lm):
    lm = make_lm(max_retries=0)
    semex.settings.configure(lm=lm)
    try:
        results = semex.llm_batch(["one", "two [[fail=500]]", "three"])
        joined = "\n".join(results)  # crashed when a failure was an exception object
        assert joined.startswith("echo: one\nError: ") and joined.endswith("\necho: three")
        flags = ["Error:" in r for r in results]
        assert flags == [False, True, False]
        assert isinstance(results[1], semex.ErrorText)
        assert isinstance(results[1].error, E.ServerError) and results[1].error.status == 500
    finally:
        semex.settings.configure(lm=None)


def test_a_second_parallel_query_stage_passes_failed_items_through_unsent(server, make_lm):
    lm = make_lm(max_retries=0)
    chunks = ["alpha", "beta [[fail=503]]", "gamma"]
    first = semex.parallel_query("Summarize: {chunk}", chunks, model=lm)
    assert isinstance(first[1], semex.ErrorText)
    server.reset()
    second = semex.parallel_query("Translate: {chunk}", first, model=lm)
    assert second[0] == "echo: Translate: echo: Summarize: alpha"
    assert second[2] == "echo: Translate: echo: Summarize: gamma"
    assert second[1] is not None and second[1] == first[1]  # the same failure, in its place
    assert second[1].error is first[1].error
    assert len(chat_requests(server)) == 2  # the failed item was not sent

    server.reset()
    sent = semex.parallel_query("Translate: {chunk}", first, model=lm, error_items="send")
    assert sent[1] == "echo: Translate: " + first[1]
    assert len(chat_requests(server)) == 3

    # the exception objects of errors="objects" pass through the same way
    objects = semex.parallel_query("Summarize: {chunk}", chunks, model=lm, errors="objects")
    again = semex.parallel_query("Q: {chunk}", objects, model=lm, errors="objects")
    assert again[1] is objects[1]


def test_async_helpers_and_error_strings(server, make_lm):
    lm = make_lm(max_retries=0)

    async def main():
        answer = await lm.query_async("hello")
        failed = await lm.query_async("bad [[fail=404]]")
        batch = await lm.batch_completion(["a", {"role": "user", "content": "b"},
                                           [{"role": "user", "content": "c [[fail=500]]"}]],
                                          None, max_concurrent=2)
        via_fn = await semex.llm_query_async("fn", model=lm)
        return answer, failed, batch, via_fn

    answer, failed, batch, via_fn = asyncio.run(main())
    assert answer == "echo: hello" and via_fn == "echo: fn"
    assert isinstance(failed, semex.ErrorText) and "404" in failed
    assert batch[:2] == ["echo: a", "echo: b"] and batch[2].startswith("Error: ")
    with pytest.raises(E.APIStatusError):
        lm.query("bad [[fail=404]]", errors="raise")


def test_sync_helpers_work_inside_a_running_event_loop(server, make_lm):
    lm = make_lm()

    async def notebook_cell():
        # no await: the sync API called from a coroutine, as a Jupyter cell does
        return (semex.llm_query("q", model=lm), lm.query("r", system_prompt="be brief"),
                lm.batch_completion_sync(["s", "t"], 16, 2))

    one, two, many = asyncio.run(notebook_cell())
    assert one == "echo: q" and two == "echo: r" and many == ["echo: s", "echo: t"]
    assert {r["key"] for r in chat_requests(server)} >= {"s", "t"}


def test_query_helpers_check_their_input_before_sending(server, make_lm):
    lm = make_lm()
    with pytest.raises(E.ConfigurationError, match="prompt must be"):
        lm.query(42)
    with pytest.raises(E.ConfigurationError, match="errors must be"):
        semex.llm_query("x", model=lm, errors="nope")
    with pytest.raises(E.ConfigurationError, match="error_items"):
        semex.llm_batch(["x"], model=lm, error_items="drop")
    assert chat_requests(server) == []


# -- 2. map_reduce ------------------------------------------------------------------------------

def test_map_reduce_reduces_in_rounds_that_fit_the_context(server, make_lm):
    lm = make_lm()
    chunks = [f"c{i} " + "x" * 100 for i in range(8)]
    final = semex.map_reduce("Summarize: {chunk}", chunks, "Combine: {answers}", model=lm,
                             max_context_tokens=64)
    for i in range(8):
        assert f"c{i} " in final
    keys = [r["key"] for r in chat_requests(server)]
    mapped = [k for k in keys if k.startswith("Summarize: ")]
    reduced = [k for k in keys if k.startswith("Combine: ")]
    assert len(mapped) == 8
    # 8 answers of ~120 characters, 256 characters a prompt: 4 groups, then pairs, then one
    assert len(reduced) == 4 + 2 + 1


def test_map_reduce_halves_a_group_the_provider_finds_too_long(server, make_lm):
    lm = make_lm(max_retries=0)
    chunks = [f"part{i}" for i in range(4)]
    # the server rejects reduce prompts over 60 characters as a context overflow, and its
    # "summary" is the part names it was given
    final = semex.map_reduce("M {chunk}", chunks, "[[maxlen=60]][[ids=part]] R {answers}",
                             model=lm)
    assert final == "part0 part1 part2 part3"
    reduced = [r for r in server.log() if r["key"] and r["key"].startswith("[[maxlen=60]]")]
    # all four at once overflowed; halves of two fit; then the two halves' answers
    assert [r["outcome"] for r in reduced] == [400, 200, 200, 200]


def test_map_reduce_leaves_failed_chunks_out_and_can_raise(server, make_lm, caplog):
    lm = make_lm(max_retries=0)
    with caplog.at_level(logging.WARNING, logger="semex"):
        final = semex.map_reduce("M {chunk}", ["a", "b [[fail=500]]", "c"], "R {answers}",
                                 model=lm)
    assert final == "echo: R echo: M a\n\necho: M c"
    assert "1 of 3 mapped chunks failed" in caplog.text
    with pytest.raises(E.BatchError) as caught:
        semex.map_reduce("M {chunk}", ["a", "b [[fail=500]]"], "R {answers}", model=lm,
                         errors="raise")
    assert caught.value.results[0] == "echo: M a"
    with pytest.raises(E.ConfigurationError, match="answers"):
        semex.map_reduce("M {chunk}", ["a"], "no placeholder", model=lm)


def test_map_reduce_async(server, make_lm):
    lm = make_lm()
    final = asyncio.run(semex.map_reduce_async("M {chunk}", ["a", "b"], "R {answers}",
                                               model=lm))
    assert final == "echo: R echo: M a\n\necho: M b"


# -- 3. a refused batch falls back to its documents ---------------------------------------------

def test_async_sem_extract_batch_of_ten_with_a_refused_document(server, make_lm):
    lm = make_lm(max_retries=0)
    texts = [f"doc{i}" for i in range(10)]
    texts[6] = "doc6 [[refuse]]"

    async def main():
        return await semex.sem_extract_async(docs_of(texts), lm, FIELDS, batch_size=10,
                                             progress=False)

    out = asyncio.run(main())
    for i in range(10):
        if i == 6:
            assert isinstance(out.errors[6], E.APIStatusError) and out.errors[6].status == 400
            assert "content filter" in str(out.errors[6])
            assert out.outputs[6] == {"sentiment": None, "product": None}
        else:
            assert out.errors[i] is None
            assert out.outputs[i] == {"sentiment": f"sentiment:doc{i}",
                                      "product": f"product:doc{i}"}
    # halving, not one request per document: 10 -> 5+5 -> 3+2 -> 2+1 -> 1+1
    assert len(chat_requests(server)) < 10


def test_a_5xx_that_outlasts_retries_fails_only_its_document(server, make_lm):
    lm = make_lm(max_retries=1)
    texts = [f"d{i}" for i in range(20)]
    texts[13] = "d13 [[fail=502]]"
    out = semex.sem_extract(docs_of(texts), lm, FIELDS, batch_size=10, progress=False)
    assert [i for i, e in enumerate(out.errors) if e is not None] == [13]
    assert isinstance(out.errors[13], E.ServerError)
    assert out.outputs[12]["product"] == "product:d12"


def test_a_request_level_400_is_not_multiplied_by_splitting(server, make_lm):
    lm = make_lm(max_retries=0)
    texts = [f"d{i} [[fail=400]]" for i in range(20)]  # every prompt is refused
    out = semex.sem_extract(docs_of(texts), lm, FIELDS, batch_size=10, progress=False)
    assert all(isinstance(e, E.APIStatusError) for e in out.errors)
    assert len(chat_requests(server)) == 2  # one per batch, no halving


def test_auth_failure_in_a_batch_is_not_split(server, make_lm):
    lm = make_lm(api_key="sk-wrong")
    with pytest.raises(E.AuthenticationError) as caught:
        semex.sem_extract(docs_of([f"d{i}" for i in range(10)]), lm, FIELDS,
                          batch_size=10, progress=False)
    assert all(isinstance(e, E.AuthenticationError) for e in caught.value.errors)
    assert len(chat_requests(server)) == 1


def test_accessor_with_a_refused_row_keeps_its_neighbours(server, make_lm):
    lm = make_lm(max_retries=0)
    df = pd.DataFrame({"text": [f"r{i}" for i in range(10)]})
    df.loc[3, "text"] = "r3 [[refuse]]"
    out = df.sem_extract(["text"], FIELDS, model=lm, batch_size=10, progress=False)
    assert out["product"].isna().tolist() == [i == 3 for i in range(10)]
    assert "content filter" in out.loc[3, "extract_error"]


# -- 4. LOTUS drop-in names ---------------------------------------------------------------------

def test_lotus_import_path_and_provider_prefix(server):
    from semex.models import LM

    lm = LM("openai/gpt-4o-mini", api_base=server.base_url, api_key=server.api_key,
            rate_limit=600, tpm_limit=100000)
    try:
        assert lm.model == "gpt-4o-mini" and lm.provider == "openai"
        assert lm.rpm == 600 and lm.tpm == 100000
        assert semex.llm_batch(["x"], model=lm) == ["echo: x"]
        assert chat_requests(server)[-1]["model"] == "gpt-4o-mini"
    finally:
        lm.close()
    hf = semex.LM("meta-llama/Llama-3.1-8B-Instruct", api_base=server.base_url)
    assert hf.model == "meta-llama/Llama-3.1-8B-Instruct" and hf.provider is None
    vllm = semex.LM("hosted_vllm/meta-llama/Llama-3.1-8B", api_base=server.base_url)
    assert vllm.model == "meta-llama/Llama-3.1-8B"


def test_provider_prefix_picks_its_base_url_and_key_variable(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-SECRET")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    lm = semex.LM("anthropic/claude-3-5-haiku-latest")  # the native Messages API
    assert lm.api_base == "https://api.anthropic.com" and lm.model.startswith("claude")
    assert lm.provider == "anthropic" and lm.url.endswith("/v1/messages")
    assert "sk-ant-SECRET" not in repr(lm) and "api_key=<set>" in repr(lm)
    assert semex.LM("openai/gpt-4o").api_base == "http://127.0.0.1:9/v1"
    with pytest.raises(E.ConfigurationError, match="azure"):
        semex.LM("azure/my-deployment")


def test_lm_accepts_lotus_keywords_and_rejects_near_misses(server):
    lm = semex.LM("m", api_base=server.base_url, api_key=server.api_key, max_batch_size=8,
                  max_ctx_len=4096, top_p=0.5)
    assert lm.max_concurrency == 8 and lm.max_ctx_len == 4096 and lm.extra_body["top_p"] == 0.5
    with pytest.raises(E.ConfigurationError, match="did you mean 'max_retries'"):
        semex.LM("m", api_base=server.base_url, max_retrys=3)
    with pytest.raises(E.ConfigurationError, match="LOTUS-only"):
        semex.LM("m", api_base=server.base_url, tokenizer=object())
    with pytest.raises(E.ConfigurationError, match="disagree"):
        semex.LM("m", api_base=server.base_url, rpm=10, rate_limit=20)
    # LOTUS's call keywords are not sent to the provider
    out = lm([[{"role": "user", "content": "k"}]], show_progress_bar=False,
             progress_bar_desc="x")
    assert out.outputs == ["echo: k"]


# LOTUS 1.2.4's own signatures (lotus/sem_ops/sem_extract.py), the positional order a LOTUS
# program may rely on.
LOTUS_FUNCTION = ["docs", "model", "output_cols", "extract_quotes", "postprocessor",
                  "safe_mode", "progress_bar_desc", "return_explanations", "strategy"]
LOTUS_ACCESSOR = ["input_cols", "output_cols", "extract_quotes", "postprocessor",
                  "return_raw_outputs", "safe_mode", "progress_bar_desc",
                  "return_explanations", "strategy"]


def _positional(fn):
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]


def test_positional_order_matches_lotus():
    assert _positional(semex.sem_extract) == LOTUS_FUNCTION
    assert _positional(semex.sem_extract_async) == LOTUS_FUNCTION
    from semex.accessor import SemExtractAccessor

    assert _positional(SemExtractAccessor.__call__) == LOTUS_ACCESSOR
    assert _positional(SemExtractAccessor.async_extract) == LOTUS_ACCESSOR


def test_safe_mode_is_the_sixth_positional(server, make_lm, capsys):
    lm = make_lm()
    out = semex.sem_extract(docs_of(["a", "b"]), lm, FIELDS, False, None, True)
    assert "safe mode" in capsys.readouterr().err
    assert out.outputs[0]["product"] == "product:a"


def test_strategy_keyword_and_enable_cache(server, make_lm, caplog):
    lm = make_lm()
    df = pd.DataFrame({"text": ["p"]})

    class ReasoningStrategy:  # as lotus.types.ReasoningStrategy.DEFAULT looks
        name = "DEFAULT"

    out = df.sem_extract(["text"], FIELDS, False, None, False, False, "x", False,
                         ReasoningStrategy(), model=lm, progress=False)
    assert out.loc[0, "product"] == "product:p"
    with pytest.raises(E.ConfigurationError, match="strategy"):
        df.sem_extract(["text"], FIELDS, strategy="tree_of_thought", model=lm, progress=False)
    semex.settings.configure(enable_cache=True)  # LOTUS's switch: the default cache file
    try:
        assert isinstance(lm.cache, semex.Cache)
        assert lm.cache.path == semex.cache.default_cache_path()
        semex.llm_batch(["cached once"], model=lm)
        lm.cache.flush()
        before = server.stats()["requests"]
        assert semex.llm_batch(["cached once"], model=lm) == ["echo: cached once"]
        assert server.stats()["requests"] == before
    finally:
        semex.settings.configure(enable_cache=False)
    assert lm.cache is None
    with semex.settings.context(lm=lm):
        assert semex.llm_query("ctx") == "echo: ctx"


# -- 5. usage and progress ----------------------------------------------------------------------

def test_llm_batch_reports_usage_and_cost_of_the_call(server):
    lm = semex.LM("gpt-4o-mini", api_base=server.base_url, api_key=server.api_key)
    try:
        results = semex.llm_batch(["a b c", "d [[fail=404]]"], model=lm)
        usage = results.usage
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.failed == 1 and usage.requests == 2
        expected = (usage.prompt_tokens * 0.15 + usage.completion_tokens * 0.60) / 1e6
        assert usage.cost == pytest.approx(expected)
        pq = semex.parallel_query("{chunk}!", ["x"], model=lm)
        assert pq.usage.prompt_tokens > 0
    finally:
        lm.close()


def test_price_table_matches_dated_names_and_can_be_overridden():
    from semex.pricing import price_for, set_price

    assert price_for("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert price_for("gpt-4o-2024-08-06") == (2.50, 10.00)
    assert price_for("claude-3-5-haiku-20241022") == (0.80, 4.00)
    assert price_for("gemini/gemini-2.0-flash") == (0.10, 0.40)
    assert price_for("smollm2-135m") is None
    set_price("my-finetune", 1.0, 2.0)
    assert price_for("my-finetune-v2") == (1.0, 2.0)
    assert semex.LM("my-finetune", api_base="http://127.0.0.1:9/v1")._cost(10**6, 10**6) == 3.0
    assert semex.LM("gpt-4o", api_base="http://127.0.0.1:9/v1",
                    input_price_per_million=1.0)._cost(10**6, 0) == 1.0
    with pytest.raises(E.ConfigurationError):
        set_price("x", -1, 0)


def test_sem_extract_calls_a_progress_callback(server, make_lm):
    lm = make_lm()
    seen = []
    out = semex.sem_extract(docs_of([f"t{i}" for i in range(25)]), lm, FIELDS, batch_size=4,
                            progress=lambda done, total: seen.append((done, total)))
    assert out.failed == 0
    assert seen and seen[-1] == (25, 25)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(E.ConfigurationError, match="progress"):
        semex.sem_extract(docs_of(["x"]), lm, FIELDS, progress="yes")


def test_progress_true_false_and_callbacks_on_the_batch_apis(server, make_lm, capsys):
    lm = make_lm()
    assert semex.llm_batch(["a"], model=lm, progress=False) == ["echo: a"]
    assert semex.llm_batch(["a"], model=lm, progress=True) == ["echo: a"]
    assert "1/1" in capsys.readouterr().err  # the tqdm bar
    assert lm([[{"role": "user", "content": "b"}]], progress=True).outputs == ["echo: b"]
    calls = []
    semex.parallel_query("{chunk}", ["x", "y"], model=lm, progress=lambda d, t: calls.append(t))
    assert calls and set(calls) == {2}
    server.reset()
    with pytest.raises(E.ConfigurationError, match="progress"):
        semex.llm_batch(["a"], model=lm, progress="bar")
    assert chat_requests(server) == []


def test_chain_of_thought_strategy_returns_explanations(server, make_lm):
    class ReasoningStrategy:  # lotus.types.ReasoningStrategy.COT's shape
        name = "COT"

    texts = ["alpha", "beta", "alpha"]
    for structured in (True, False):
        lm = make_lm(structured_output=structured)
        for size in (1, 3):
            out = semex.sem_extract(docs_of(texts), lm, FIELDS, False, None, False, "x", True,
                                    ReasoningStrategy(), batch_size=size, progress=False)
            assert out.explanations == ["reasoning:alpha", "reasoning:beta", "reasoning:alpha"]
            assert out.outputs[1] == {"sentiment": "sentiment:beta", "product": "product:beta"}
    df = pd.DataFrame({"text": texts})
    frame = df.sem_extract(["text"], FIELDS, return_explanations=True, strategy="zs_cot",
                           model=lm, progress=False)
    assert frame["explanation"].tolist() == out.explanations
    assert "reasoning" not in frame.columns
    with pytest.raises(E.ConfigurationError, match="collides"):
        semex.sem_extract(docs_of(["x"]), lm, {"reasoning": None}, strategy="cot")
    with pytest.raises(E.ConfigurationError, match="FEW_SHOT"):
        semex.sem_extract(docs_of(["x"]), lm, FIELDS, strategy="few_shot")
