"""mode="batch": the provider's Batch API (/v1/files, /v1/batches) end to end against the C
mock (benchmarks/mock/batches.c), which answers each batch line with the same builders as
its online routes, on a fast-forward clock, with injectable faults. Counts are read at the
server (/_stats: batch_files, batches_created, batch_lines and online requests)."""
import asyncio
import subprocess
import sys

import pytest

import semex
from semex import errors as E

FAST = semex.BatchMode(poll_interval=0.02, max_poll_interval=0.1)


@pytest.fixture
def start_mock(start_cmock):
    return lambda *options: start_cmock("--batch-seconds", "0.2", *options)


def lm_for(mock, **options):
    options.setdefault("input_price_per_million", 1.0)
    options.setdefault("output_price_per_million", 4.0)
    return semex.LM("gpt-4o-mini", api_base=mock.base, api_key="sk-test-secret", **options)


def test_llm_batch_in_batch_mode_equals_online_at_half_price(start_mock):
    mock = start_mock()
    prompts = [f"question {i}" for i in range(40)] + ["question 3", "question 7"]
    with lm_for(mock) as lm:
        online = semex.llm_batch(prompts, lm)
        before = mock.stats()
        batched = semex.llm_batch(prompts, lm, mode=FAST)
    after = mock.stats()
    assert list(batched) == list(online) == [f"echo: {p}" for p in prompts]
    # one file, one batch, one line per unique prompt; nothing sent online
    assert after["batch_files"] - before["batch_files"] == 1
    assert after["batches_created"] - before["batches_created"] == 1
    assert after["batch_lines"] - before["batch_lines"] == 40
    assert after["requests"] == before["requests"]
    assert batched.usage.batched == 40 and batched.usage.cache_hits == 2
    assert batched.usage.prompt_tokens == online.usage.prompt_tokens - \
        2 * (online.usage.prompt_tokens // 42)  # the duplicates were not sent
    per_token = online.usage.cost / (online.usage.prompt_tokens +
                                     4 * online.usage.completion_tokens)
    assert batched.usage.cost == pytest.approx(0.5 * per_token * (
        batched.usage.prompt_tokens + 4 * batched.usage.completion_tokens))
    assert "answered by the Batch API" in batched.usage.summary()


def test_sem_extract_and_the_accessor_in_batch_mode_equal_online(start_mock):
    pd = pytest.importorskip("pandas")
    mock = start_mock()
    docs = [{"review": f"The blender number {i} broke after {i} days."} for i in range(25)]
    cols = {"product": "the product", "days": "how many days"}
    with lm_for(mock) as lm:
        online = semex.sem_extract(docs, lm, cols, batch_size=5, progress=False)
        before = mock.stats()
        batched = semex.sem_extract(docs, lm, cols, batch_size=5, progress=False, mode=FAST)
        after = mock.stats()
        assert batched.outputs == online.outputs and not any(batched.errors)
        assert after["batches_created"] - before["batches_created"] == 1  # every prompt
        assert after["requests"] == before["requests"]
        frame = pd.DataFrame(docs)
        out = frame.sem_extract("review", cols, model=lm, batch_size=1, progress=False,
                                mode=FAST)
        assert list(out["product"]) == [o["product"] for o in online.outputs]


def test_async_forms_in_batch_mode(start_mock):
    mock = start_mock()

    async def main():
        with lm_for(mock) as lm:
            answers = await semex.llm_batch_async(["a", "b", "c"], lm, mode=FAST)
            extracted = await semex.sem_extract_async(
                [{"t": "x"}, {"t": "y"}], lm, {"name": None}, progress=False, mode=FAST)
            return answers, extracted
    answers, extracted = asyncio.run(main())
    assert list(answers) == ["echo: a", "echo: b", "echo: c"]
    assert not any(extracted.errors) and len(extracted.outputs) == 2
    assert mock.stats()["batches_created"] == 2


def test_a_job_resumes_its_batch_in_another_process_and_pays_once(start_mock, tmp_path):
    mock = start_mock("--batch-seconds", "1.0")
    cache = str(tmp_path / "cache.sqlite3")
    prompts = [f"resume me {i}" for i in range(30)]
    script = (
        "import sys, semex\n"
        f"lm = semex.LM('gpt-4o-mini', api_base={mock.base!r}, api_key='k', cache={cache!r})\n"
        "try:\n"
        f"    semex.llm_batch({prompts!r}, lm, mode=semex.BatchMode(wait=False))\n"
        "except semex.errors.BatchSubmitted as exc:\n"
        "    print(' '.join(exc.batch_ids))\n")
    submitted = subprocess.run([sys.executable, "-c", script], capture_output=True,
                               text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    (batch_id,) = submitted.stdout.split()
    assert mock.stats()["batches_created"] == 1
    with semex.LM("gpt-4o-mini", api_base=mock.base, api_key="k", cache=cache) as lm:
        answers = semex.llm_batch(prompts, lm, mode=FAST)
        assert list(answers) == [f"echo: {p}" for p in prompts]
        assert answers.usage.batched == 30
        stats = mock.stats()
        assert stats["batches_created"] == 1 and stats["batch_lines"] == 30  # resumed
        # and with the answers cached, a third run needs neither the batch nor the network
        again = semex.llm_batch(prompts, lm, mode=FAST)
    assert list(again) == list(answers) and again.usage.cached == 30
    assert again.usage.batched == 0
    assert mock.stats() == stats
    assert batch_id in [b["id"] for b in semex.Cache(cache).list_batches()]


def test_without_an_answer_cache_a_rerun_downloads_the_finished_batch(start_mock):
    mock = start_mock()
    with lm_for(mock) as lm:
        first = semex.llm_batch(["p1", "p2"], lm, mode=FAST)
        second = semex.llm_batch(["p1", "p2", "p3"], lm, mode=FAST)
    assert list(second) == ["echo: p1", "echo: p2", "echo: p3"]
    stats = mock.stats()
    assert stats["batches_created"] == 2 and stats["batch_lines"] == 3  # p1, p2 paid once
    assert list(first) == list(second)[:2]


def test_a_job_above_the_limits_is_split_into_batches(start_mock):
    mock = start_mock("--batch-max-requests", "8")
    prompts = [f"split {i}" for i in range(20)]
    with lm_for(mock) as lm:
        answers = semex.llm_batch(prompts, lm, mode=semex.BatchMode(
            poll_interval=0.02, max_requests=8))
        assert list(answers) == [f"echo: {p}" for p in prompts]
        assert mock.stats()["batches_created"] == 3
        # and by bytes: each input file stays under max_bytes
        small = semex.llm_batch([f"bytes {i}" for i in range(7)], lm,
                                mode=semex.BatchMode(poll_interval=0.02, max_bytes=600))
        assert list(small) == [f"echo: bytes {i}" for i in range(7)]
        batches = mock.get("/batches")["data"][:mock.stats()["batches_created"] - 3]
        assert len(batches) >= 3
        sizes = [mock.get("/files/" + b["input_file_id"])["bytes"] for b in batches]
        assert max(sizes) <= 600 and sum(b["request_counts"]["total"] for b in batches) == 7
    with pytest.raises(E.ConfigurationError, match="above the batch file limit"):
        semex.llm_batch(["x" * 500], lm_for(mock), mode=semex.BatchMode(max_bytes=300))


def test_error_lines_fail_only_their_rows(start_mock):
    mock = start_mock("--batch-error-every", "4")
    prompts = [f"row {i}" for i in range(12)]
    with lm_for(mock) as lm:
        answers = semex.llm_batch(prompts, lm, mode=FAST, errors="objects")
    for i, answer in enumerate(answers):
        if (i + 1) % 4 == 0:
            assert isinstance(answer, E.APIStatusError) and answer.status == 400, answer
            assert f"item {i}" in str(answer) and "refused" in str(answer)
        else:
            assert answer == f"echo: row {i}"
    assert answers.usage.failed == 3 and answers.usage.batched == 9
    # a re-run sends only the three that failed (in a new batch); the rest are the first
    # batch's answers, counted as saved
    lines = mock.stats()["batch_lines"]
    with lm_for(mock) as lm:
        again = semex.llm_batch(prompts, lm, mode=FAST)
    assert list(again) == [f"echo: {p}" for p in prompts]
    assert mock.stats()["batch_lines"] - lines == 3 and mock.stats()["batches_created"] == 2
    assert again.usage.batched == 3 and again.usage.cached == 9


def test_an_expired_batch_keeps_its_finished_lines_and_falls_back_online_on_request(
        start_mock):
    mock = start_mock("--batch-expire-at", "0.5")
    prompts = [f"late {i}" for i in range(10)]
    with lm_for(mock) as lm:
        answers = semex.llm_batch(prompts, lm, mode=FAST, errors="objects")
        assert [a for a in answers[:5]] == [f"echo: {p}" for p in prompts[:5]]
        for i, error in enumerate(answers[5:], start=5):
            assert isinstance(error, E.BatchJobError) and "batch_expired" in str(error)
            assert error.index == i
        assert mock.stats()["requests"] == 0
        rescued = semex.llm_batch(prompts, lm, mode=semex.BatchMode(
            poll_interval=0.02, fallback="online"))
    assert list(rescued) == [f"echo: {p}" for p in prompts]
    # the re-run took the five answered from the first batch (paid and reported by the
    # first run: counted as saved), put the other five in a new batch (which expired at half
    # too) and sent the rest online
    stats = mock.stats()
    assert stats["batches_created"] == 2 and 0 < stats["requests"] <= 5
    assert rescued.usage.cached == 5
    assert rescued.usage.batched + stats["requests"] == 5


def test_transient_line_errors_go_online_with_fallback(start_mock):
    mock = start_mock("--batch-transient-every", "3")
    prompts = [f"t {i}" for i in range(9)]
    with lm_for(mock) as lm:
        answers = semex.llm_batch(prompts, lm, mode=semex.BatchMode(
            poll_interval=0.02, fallback="online"))
    assert list(answers) == [f"echo: {p}" for p in prompts]
    assert mock.stats()["requests"] == 3 and answers.usage.batched == 6


def test_a_batch_that_fails_validation_fails_every_row_with_the_reason(start_mock):
    mock = start_mock("--batch-fail")
    with lm_for(mock) as lm:
        answers = semex.llm_batch(["a", "b"], lm, mode=FAST, errors="objects")
        assert all(isinstance(a, E.BatchJobError) and "failed validation" in str(a)
                   for a in answers)
        assert "--batch-fail" in str(answers[0])
        semex.llm_batch(["a", "b"], lm, mode=FAST, errors="objects")
    assert mock.stats()["batches_created"] == 2  # a failed batch is not resumed


def test_bad_batch_options_are_refused_before_anything_is_sent(start_mock):
    mock = start_mock()
    lm = lm_for(mock)
    for mode, message in (("batches", "mode must be"),
                          (semex.BatchMode, "mode must be")):
        with pytest.raises(E.ConfigurationError, match=message):
            semex.llm_batch(["x"], lm, mode=mode)
    for kwargs, message in (({"poll_interval": 0}, "poll_interval"),
                            ({"fallback": "retry"}, "fallback"),
                            ({"completion_window": "1h"}, "completion_window"),
                            ({"max_requests": 0}, "max_requests"),
                            ({"discount": 2}, "discount")):
        with pytest.raises(E.ConfigurationError, match=message):
            semex.BatchMode(**kwargs)
    with pytest.raises(E.ConfigurationError, match="stream"):
        semex.llm_batch(["x"], lm, mode="batch", stream=True)
    with pytest.raises(E.ConfigurationError, match="semex.LM"):
        semex.sem_extract([{"t": "x"}], lambda batch: ["{}"], {"a": None}, mode="batch")
    azure = semex.LM("azure/dep", api_base="http://127.0.0.1:1", api_key="k",
                     api_version="2024-06-01")
    with pytest.raises(E.ConfigurationError, match="provider='azure'"):
        semex.llm_batch(["x"], azure, mode="batch")
    assert mock.stats()["batch_files"] == 0


def test_a_server_without_the_batch_api_is_a_clear_error(server, make_lm):
    lm = make_lm()
    with pytest.raises(E.APIStatusError, match="does this server offer the Batch API"):
        semex.llm_batch(["x"], lm, mode=FAST)
    assert "sk-" not in repr(lm)


def test_the_batch_cli_shows_fetches_and_cancels(start_mock, tmp_path, monkeypatch):
    from semex.cli import main

    mock = start_mock("--batch-seconds", "30")
    cache = str(tmp_path / "c.sqlite3")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cli-secret")
    table = tmp_path / "in.csv"
    table.write_text("text\nalpha\nbeta\n")
    out = tmp_path / "out.csv"
    argv = ["extract", str(table), "--col", "text", "--out", "name", "-o", str(out),
            "--api-base", mock.base, "--model", "m", "--cache", cache, "--batch",
            "--poll-interval", "0.05"]
    assert main(argv + ["--no-wait"]) == 0
    assert not out.exists()
    (record,) = semex.Cache(cache).list_batches()
    capsys_lines: list = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: capsys_lines.append(" ".join(
        str(x) for x in a)))
    assert main(["batch", "status", "--cache", cache]) == 0
    line = capsys_lines[-1]
    assert record["id"] in line and ("in_progress" in line or "validating" in line), line
    assert "sk-cli-secret" not in " ".join(capsys_lines)
    assert main(["batch", "cancel", record["id"], "--cache", cache]) == 0
    assert "cancelling" in capsys_lines[-1]
    assert main(["batch", "status", record["id"], "--cache", cache]) == 0
    assert "cancelled" in capsys_lines[-1]
    assert main(["batch", "cancel", "--cache", cache]) == 2
    assert main(["batch", "status", "batch_nope", "--cache", cache]) == 2


def test_batch_fetch_fills_the_cache_for_the_next_run(start_mock, tmp_path, monkeypatch):
    from semex.cli import main

    mock = start_mock()
    cache = str(tmp_path / "c.sqlite3")
    prompts = ["f1", "f2", "f3"]
    lm = semex.LM("m", api_base=mock.base, api_key="k", cache=cache)
    with pytest.raises(E.BatchSubmitted) as submitted:
        semex.llm_batch(prompts, lm, mode=semex.BatchMode(wait=False))
    lm.close()
    semex.Cache(cache).close()
    import time
    time.sleep(0.3)  # the mock's batch ends after 0.2 s
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(
        str(x) for x in a)))
    assert main(["batch", "fetch", "--cache", cache]) == 0
    assert "3 answers stored" in printed[-1] and submitted.value.batch_ids[0] in printed[-1]
    with semex.LM("m", api_base=mock.base, api_key="k", cache=cache) as lm:
        answers = semex.llm_batch(prompts, lm, mode=FAST)
    assert list(answers) == ["echo: f1", "echo: f2", "echo: f3"] and answers.usage.cached == 3


# -- embeddings: the answer cache and the Batch API ---------------------------------------------
def embedder(mock, **options):
    options.setdefault("max_batch_inputs", 8)
    options.setdefault("price_per_million", 1.0)
    return semex.EmbeddingModel("emb", api_base=mock.base, api_key="sk-test-secret",
                                **options)


def test_embed_with_the_cache_sends_only_new_texts(start_mock, tmp_path):
    np = pytest.importorskip("numpy")
    mock = start_mock()
    cache = str(tmp_path / "e.sqlite3")
    texts = [f"text {i}" for i in range(50)]
    with embedder(mock, cache=False) as plain:
        reference = semex.embed(texts + ["new"], plain, progress=False)
    sent = mock.stats()["requests"]
    with embedder(mock, cache=cache) as model:
        first = semex.embed(texts, model, progress=False)
        assert mock.stats()["requests"] - sent == 7  # 50 texts, 8 a request
        again = semex.embed(texts + ["new"], model, progress=False)
    assert mock.stats()["requests"] - sent == 8   # only "new" went out
    assert np.array_equal(first, reference[:50]) and np.array_equal(again, reference)
    assert model.total_usage.cached == 50 and model.total_usage.cost_saved > 0
    # another process, another model setting: dimensions is part of the key
    with embedder(mock, cache=cache, dimensions=16) as other:
        wide = semex.embed(texts[:3], other, progress=False)
    assert wide.shape == (3, 16) and mock.stats()["requests"] - sent == 9


def test_embed_in_batch_mode_equals_online_and_keeps_the_per_row_contract(start_mock):
    np = pytest.importorskip("numpy")
    mock = start_mock("--batch-error-every", "3")
    texts = [f"doc {i}" for i in range(40)]
    with embedder(mock, cache=False) as model:
        online = semex.embed(texts, model, progress=False)
        before = mock.stats()
        out = model(texts, mode=FAST)
    after = mock.stats()
    assert after["batches_created"] - before["batches_created"] == 1
    assert after["requests"] == before["requests"]
    # five requests of 8 texts; the 3rd line is refused: its 8 rows are NaN with an error
    bad = set(range(16, 24))
    for i in range(40):
        if i in bad:
            assert np.isnan(out.embeddings[i]).all()
            assert isinstance(out.errors[i], E.APIStatusError) and out.errors[i].status == 400
        else:
            assert out.errors[i] is None and np.array_equal(out.embeddings[i], online[i])
    assert out.usage.batched == 4 and out.usage.failed == 8
    # run again: the four answered requests come from the recorded batch, the refused one
    # is sent again (alone in a new batch, where the mock does not refuse it)
    with embedder(mock, cache=False) as model:
        again = semex.embed(texts, model, mode=FAST, progress=False)
    assert np.array_equal(again, online)
    assert mock.stats()["batch_lines"] - after["batch_lines"] == 1
    assert model.total_usage.batched == 1 and model.total_usage.cached == 32


def test_embed_batch_fallback_and_async(start_mock):
    np = pytest.importorskip("numpy")
    mock = start_mock("--batch-expire-at", "0.5")
    texts = [f"late {i}" for i in range(32)]
    with embedder(mock, cache=False) as model:
        online = semex.embed(texts, model, progress=False)
        sent = mock.stats()["requests"]
        rescued = asyncio.run(semex.embed_async(
            texts, model, progress=False,
            mode=semex.BatchMode(poll_interval=0.02, fallback="online")))
    assert np.array_equal(rescued, online)
    assert mock.stats()["requests"] - sent == 2  # 4 requests; half expired and went online
    with pytest.raises(E.ConfigurationError, match="EmbeddingModel"):
        semex.embed(["x"], lambda t: [[0.0]] * len(t), mode="batch")
