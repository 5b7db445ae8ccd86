"""The persistent answer cache (semex.cache): keys, hits, resume after SIGKILL, faults.

Everything runs for real: the C engine against the fake server, SQLite files in tmp_path,
and separate processes where the behaviour is about processes (SIGKILL, two writers, a file
size limit)."""
import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

import semex
from semex import cli
from semex.cache import Cache

KEY_ENV = "SEMEX_CACHE_TEST_KEY"
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(semex.__file__)))


def requests_sent(server):
    return server.stats()["requests"]


def env_for(server):
    env = dict(os.environ, **{KEY_ENV: server.api_key})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


# -- hits and keys ------------------------------------------------------------------------
def test_a_second_run_sends_only_the_new_prompts_and_reports_what_it_saved(
        make_lm, server, tmp_path):
    path = tmp_path / "c.sqlite3"
    prompts = [f"question {i}" for i in range(300)]
    first = make_lm(cache=str(path), input_price_per_million=1.0,
                    output_price_per_million=2.0)
    answers = semex.llm_batch(prompts, model=first, max_concurrent=32)
    assert answers == [f"echo: question {i}" for i in range(300)]
    assert requests_sent(server) == 300
    paid = first.total_usage
    assert paid.cached == 0
    first.cache.flush()

    server.reset()
    second = make_lm(cache=str(path), input_price_per_million=1.0,
                     output_price_per_million=2.0)
    again = semex.llm_batch(prompts + ["a new one"], model=second, max_concurrent=32)
    assert again == answers + ["echo: a new one"]
    assert requests_sent(server) == 1
    usage = second.total_usage
    assert usage.cached == 300
    assert usage.cached_prompt_tokens == paid.prompt_tokens
    assert usage.cached_completion_tokens == paid.completion_tokens
    assert usage.cost_saved == pytest.approx(paid.cost)
    assert usage.requests == 1 and usage.prompt_tokens < 10
    assert "300 answered from the cache" in usage.summary()


def test_the_key_covers_model_url_and_request_fields_but_not_the_api_key(
        make_lm, server, tmp_path):
    path = str(tmp_path / "c.sqlite3")
    prompts = ["alpha", "beta"]
    base = make_lm(cache=path)
    semex.llm_batch(prompts, model=base)
    base.cache.flush()
    assert requests_sent(server) == 2

    def sent_by(**options):
        server.reset()
        fields = options.pop("fields", {})
        lm = make_lm(cache=path, **options)
        assert semex.llm_batch(prompts, model=lm, **fields) == ["echo: alpha", "echo: beta"]
        lm.cache.flush()
        return requests_sent(server)

    assert sent_by() == 0
    assert sent_by(temperature=0.5) == 2
    assert sent_by(max_tokens=7) == 2
    assert sent_by(fields={"response_format": {"type": "json_object"}}) == 2
    assert sent_by(extra_body={"top_p": 0.5}) == 2
    # the same conversation written as messages hits the plain-prompt entry
    server.reset()
    lm = make_lm(cache=path)
    out = lm([[{"role": "user", "content": "alpha"}]])
    assert out.outputs == ["echo: alpha"] and requests_sent(server) == 0
    # the file never holds the key
    raw = b"".join(open(path + s, "rb").read() for s in ("", "-wal") if
                   os.path.exists(path + s))
    assert server.api_key.encode() not in raw


def test_another_api_key_still_hits(server, tmp_path):
    """The key is not part of the cache key: a rotated key reuses the answers."""
    path = str(tmp_path / "c.sqlite3")
    lm = semex.LM("test-model", api_base=server.base_url, api_key=server.api_key, cache=path)
    assert semex.llm_batch(["gamma"], model=lm) == ["echo: gamma"]
    lm.cache.flush()
    server.reset()
    other = semex.LM("test-model", api_base=server.base_url, api_key="sk-rotated", cache=path)
    assert semex.llm_batch(["gamma"], model=other) == ["echo: gamma"]
    assert requests_sent(server) == 0
    lm.close()
    other.close()


def test_rows_of_a_rerun_get_their_own_entries_with_hits_and_misses_interleaved(
        make_lm, server, tmp_path):
    """The hit path across windows (the first of 256 rows, then 1,024) that mix hits and
    misses, conversations among plain prompts, duplicates and texts JSON escapes: every row
    gets its own answer, only the misses are sent, and the saved tokens are the hits'."""
    path = str(tmp_path / "c.sqlite3")
    prompts = [f"q {i}" for i in range(2600)]
    odd = ['a "quote" and a \\ backslash', "tab\tnew\nline\x01\x1f\x7f end",
           "naïve — 東京 \U0001F600", "\u2028 separators \u2029", "\x00 nul"]
    for j, text in enumerate(odd):
        prompts[3 * (40 + 150 * j)] = f"{j}: {text} end"  # cached below (a multiple of 3)
    cached = prompts[::3]
    first = make_lm(cache=path, max_concurrency=64)
    assert semex.llm_batch(cached, model=first, max_concurrent=64) == \
        [f"echo: {p}" for p in cached]
    paid = first.total_usage
    first.cache.flush()

    server.reset()
    items = list(prompts)
    items[300] = [{"role": "user", "content": prompts[300]}]  # hits the prompt's entry
    items[301] = [{"role": "user", "content": prompts[301]}]  # a miss
    items[2599] = prompts[0]  # a duplicate of a hit
    again = make_lm(cache=path, max_concurrency=64)
    out = semex.llm_batch(items, model=again, max_concurrent=64)
    assert out == [f"echo: {p}" for p in prompts[:2599]] + [f"echo: {prompts[0]}"]
    hits = len(cached) + 1
    assert requests_sent(server) == len(items) - hits
    usage = again.total_usage
    assert usage.cached == hits and usage.requests == len(items) - hits
    first_row = semex.llm_batch([prompts[0]], model=make_lm(cache=False)).usage
    assert usage.cached_prompt_tokens == paid.prompt_tokens + first_row.prompt_tokens
    assert usage.cached_completion_tokens == \
        paid.completion_tokens + first_row.completion_tokens
    # finish reasons come with the answers, a miss's from its request
    server.reset()
    lm = make_lm(cache=path)
    answer = lm([[{"role": "user", "content": p}] for p in prompts[:6]])
    assert answer.outputs == [f"echo: {p}" for p in prompts[:6]]
    assert answer.finish_reasons == ["stop"] * 6 and requests_sent(server) == 0


def test_entries_written_by_the_whole_body_key_are_hits(make_lm, server, tmp_path):
    """The key of a plain prompt is computed without building its body; it must stay the
    key of the body (request_key over the canonical fields and the body after its shared
    prefix), which is what every existing cache holds."""
    path = str(tmp_path / "c.sqlite3")
    lm = make_lm(cache=path, temperature=0.25, max_tokens=9)
    url = server.base_url + "/chat/completions"
    canonical = json.dumps({"model": "test-model", "temperature": 0.25, "max_tokens": 9},
                           sort_keys=True).encode()
    prompts = ["plain", 'with "quotes" \\ and\nbreaks', "ünïcödé \U0001F600", "\x00\x1f"]
    rows = []
    for i, prompt in enumerate(prompts):
        messages = json.dumps([{"role": "user", "content": prompt}], ensure_ascii=False)
        rows.append((semex.cache.request_key(url, canonical + b"\0" + messages.encode()
                                             + b"}"), f"stored {i}", "length", 3, 4, 7))
    lm.cache.put_many(rows)
    lm.cache.flush()
    assert semex.llm_batch(prompts, model=lm, system_prompt=None) == \
        [f"stored {i}" for i in range(4)]
    assert requests_sent(server) == 0
    assert lm.total_usage.cached_completion_tokens == 16
    out = lm([[{"role": "user", "content": p}] for p in prompts])
    assert out.finish_reasons == ["length"] * 4 and requests_sent(server) == 0


@pytest.mark.parametrize("json_form", [True, False], ids=["json", "rows"])
def test_the_hit_lookup_returns_texts_exactly_in_key_order(tmp_path, json_form):
    """Cache._answers (one query per window) against get_many: the same texts, finish
    reasons and token sums, misses as None, whether SQLite aggregates the window as JSON
    or hands back rows (an SQLite without JSON functions, or a window holding a bytes
    value, which JSON cannot carry)."""
    cache = Cache(tmp_path / "c.sqlite3")
    cache._json = json_form
    texts = ["", "plain", 'quote " \\ /', "\x00\x01\x1f\x7f\t\n\r\b\f", "é東\U0001F600\u2028",
             "x" * 70_000]
    keys = [bytes([i]) * 16 for i in range(40)]
    rows = [(k, texts[i % len(texts)], ("stop", "length", None)[i % 3], i, 2 * i, 3 * i)
            for i, k in enumerate(keys) if i % 4]
    rows.append((b"\xff" * 16, b"\x00bytes", None, 1, 1, 2))
    cache.put_many(rows)
    assert cache.flush()
    want = cache.get_many(keys)
    found = cache._answers(b"".join(keys))
    assert found.values == [None if e is None else e.value for e in want]
    assert found.finish_reasons == [None if e is None else e.finish_reason for e in want]
    assert found.misses == [i for i, e in enumerate(want) if e is None]
    assert found.prompt_tokens == sum(e.prompt_tokens for e in want if e is not None)
    assert found.completion_tokens == sum(e.completion_tokens for e in want if e is not None)
    mixed = cache._answers(b"".join(keys[:3]) + b"\xff" * 16)
    assert mixed.values == [None, want[1].value, want[2].value, b"\x00bytes"]
    assert cache._answers(b"") is None
    cache.close()


def test_the_hit_lookup_refreshes_the_last_use_of_old_entries(tmp_path):
    path = tmp_path / "c.sqlite3"
    cache = Cache(path)
    cache.put_many([(bytes([i]) * 16, f"v{i}", "stop", 1, 1, 2) for i in range(10)])
    assert cache.flush()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE entries SET used_at = used_at - 7200 WHERE key < ?", (b"\x05" * 16,))
    conn.commit()
    old = dict(conn.execute("SELECT key, used_at FROM entries"))
    cache._answers(b"".join(bytes([i]) * 16 for i in range(10)))
    cache.put_many([(b"z" * 16, "later", "stop", 1, 1, 2)])  # committed with the touch
    assert cache.flush()
    new = dict(conn.execute("SELECT key, used_at FROM entries"))
    assert [new[k] > old[k] for k in sorted(old)] == [True] * 5 + [False] * 5  # hits only
    conn.close()
    cache.close()


def test_the_engine_keys_plain_prompts_as_hashlib_keys_their_bodies():
    """csrc/jsonstr.c + blake2b.c against hashlib over the JSON string Python writes:
    every escape, UTF-8 of 1-4 bytes, texts and heads across blake2b's 128-byte blocks;
    a text it cannot key (not a str, a lone surrogate) hands the window back (None)."""
    import hashlib
    import random

    from semex import _engine

    encode = json.JSONEncoder(ensure_ascii=False).encode
    rng = random.Random(7)
    alphabet = ['a', 'Z', ' ', '"', '\\', '/', '\n', '\t', '\r', '\b', '\f', '\x00', '\x01',
                '\x1f', '\x7f', '\x80', 'é', '\xff', 'Ā', '東', '\u2028', '\uffff',
                '\U0001F600', '\U0010FFFF']
    texts = ["", "plain", "x" * 127, "y" * 128, "z" * 129, "w" * 5000]
    for _ in range(400):
        size = rng.choice([1, 7, 31, 32, 33, 150, 400])
        texts.append("".join(rng.choice(alphabet) for _ in range(size)))
        texts.append("".join(rng.choice(["q"] * 30 + alphabet[:12]) for _ in range(size)))
    for head_size in (0, 1, 110, 127, 128, 129, 300):
        head = bytes(rng.randrange(256) for _ in range(head_size))
        want = b"".join(hashlib.blake2b(head + encode(t).encode() + b"}]}",
                                        digest_size=16).digest() for t in texts)
        assert _engine.prompt_keys(head, b"}]}", texts) == want
    assert _engine.prompt_keys(b"h", b"", []) == b""
    assert _engine.prompt_keys(b"h", b"", ["fine", "\ud800 lone"]) is None
    assert _engine.prompt_keys(b"h", b"", ["fine", 3]) is None

    class Text(str):
        pass
    assert _engine.prompt_keys(b"h", b"", [Text("a subclass")]) is None


@pytest.mark.parametrize("system_prompt", [None, "be brief"])
def test_every_dialect_keys_a_plain_prompt_as_its_body_and_a_rerun_sends_nothing(
        make_dialect_lm, server, tmp_path, system_prompt):
    from semex import _engine
    from semex.lm import _Job

    path = str(tmp_path / "c.sqlite3")
    prompts = ["one", 'two "quoted"\n', "東京 \U0001F600"]
    lm = make_dialect_lm(cache=path, max_tokens=50)
    job = _Job(lm, prompts, {}, None, prompts=True, system_prompt=system_prompt)
    keyed = job.cached
    assert _engine.prompt_keys(keyed.prompt_head, keyed.prompt_close, prompts) == b"".join(
        semex.cache.chat_keys(keyed.base, keyed.skip, job.bodies_at(range(3))))
    first = semex.llm_batch(prompts, model=lm, system_prompt=system_prompt)
    assert all(a.startswith("echo: ") for a in first)
    lm.cache.flush()
    server.reset()
    again = make_dialect_lm(cache=path, max_tokens=50)
    assert semex.llm_batch(prompts, model=again, system_prompt=system_prompt) == first
    assert requests_sent(server) == 0 and again.total_usage.cached == 3


def test_errors_are_not_cached(make_lm, server, tmp_path):
    path = str(tmp_path / "c.sqlite3")
    prompts = ["fine", "broken [[fail=500]]"]
    lm = make_lm(cache=path, max_retries=0)
    out = semex.llm_batch(prompts, model=lm, errors="objects")
    assert out[0] == "echo: fine" and isinstance(out[1], semex.RequestError)
    lm.cache.flush()
    server.reset()
    again = make_lm(cache=path, max_retries=0)
    out = semex.llm_batch(prompts, model=again, errors="objects")
    assert isinstance(out[1], semex.RequestError)
    assert requests_sent(server) == 1  # only the failed one is asked again
    assert again.cache.info()["entries"] == 1


def test_async_calls_and_settings_use_the_cache(make_lm, server, tmp_path):
    path = str(tmp_path / "c.sqlite3")
    semex.settings.configure(cache=path)
    try:
        lm = make_lm()
        assert lm.cache is not None and lm.cache.path == path
        out = asyncio.run(semex.llm_batch_async([f"q{i}" for i in range(50)], model=lm))
        assert out == [f"echo: q{i}" for i in range(50)]
        lm.cache.flush()
        server.reset()
        again = make_lm()
        out = asyncio.run(semex.llm_batch_async([f"q{i}" for i in range(60)], model=again))
        assert out == [f"echo: q{i}" for i in range(60)]
        assert requests_sent(server) == 10
        off = make_lm(cache=False)
        assert off.cache is None
        semex.llm_batch(["q1"], model=off)
        assert requests_sent(server) == 11
    finally:
        semex.settings.configure(cache=False)
    assert make_lm().cache is None  # off by default in the library


def test_sem_extract_and_the_accessor_resume_through_the_lm(make_lm, server, tmp_path):
    path = str(tmp_path / "c.sqlite3")
    docs = [{"text": f"document {i}"} for i in range(120)]
    lm = make_lm(cache=path)
    first = semex.sem_extract(docs, lm, {"topic": None}, batch_size=5)
    assert first.errors == [None] * 120
    sent = requests_sent(server)
    lm.cache.flush()
    server.reset()
    again = make_lm(cache=path)
    frame = pd.DataFrame(docs).sem_extract(["text"], {"topic": None}, model=again,
                                           batch_size=5, use_batch_processing=True)
    assert requests_sent(server) == 0
    assert list(frame["topic"]) == [row["topic"] for row in first.outputs]
    assert again.total_usage.cached == sent


def test_a_cancelled_call_keeps_the_answers_it_received(make_lm, server, tmp_path):
    server.configure(latency_ms=[5, 40])
    path = str(tmp_path / "c.sqlite3")
    lm = make_lm(cache=path, max_concurrency=16)
    prompts = [f"q{i}" for i in range(2000)]

    async def cancel_midway():
        task = asyncio.ensure_future(semex.llm_batch_async(prompts, model=lm,
                                                           max_concurrent=16))
        while requests_sent(server) < 300:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    lm.cache.flush()
    kept = lm.cache.info()["entries"]
    answered = sum(r["outcome"] == 200 for r in server.log())
    # every answer that reached the client is kept (one the server had just written when
    # the connection closed may not have been read)
    assert answered - 16 <= kept <= answered
    server.reset()
    again = make_lm(cache=path, max_concurrency=16)
    assert semex.llm_batch(prompts, model=again, max_concurrent=16) == \
        [f"echo: {p}" for p in prompts]
    assert requests_sent(server) == len(prompts) - kept


# -- resume after SIGKILL -----------------------------------------------------------------
def _kill_at(proc, server, at, limit=60.0):
    deadline = time.monotonic() + limit
    while requests_sent(server) < at:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the job did not get going"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.2)  # let the server see the connections close
    return requests_sent(server)


N_RESUME = 2000


@pytest.mark.slow
def test_the_cli_rerun_of_a_killed_job_sends_only_the_rest_and_writes_the_same_file(
        server, tmp_path):
    server.configure(latency_ms=[15, 35])
    src = tmp_path / "in.csv"
    texts = [f"ticket {i} about product {i % 17}" for i in range(N_RESUME)]
    pd.DataFrame({"id": range(N_RESUME), "text": texts}).to_csv(src, index=False)
    db = tmp_path / "cache.sqlite3"

    def command(out, *extra):
        return [sys.executable, "-m", "semex", "extract", str(src), "--col", "text",
                "--out", "sentiment=positive/negative", "--out", "product",
                "--batch-size", "1", "--concurrency", "16", "-o", str(out),
                "--api-base", server.base_url, "--api-key-env", KEY_ENV,
                "--model", "test-model", *extra]

    killed = subprocess.Popen(command(tmp_path / "out.csv", "--cache", str(db)),
                              env=env_for(server), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    before_kill = _kill_at(killed, server, N_RESUME // 2)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out.csv").exists()

    server.reset()
    server.configure(latency_ms=[15, 35])
    rerun = subprocess.run(command(tmp_path / "out.csv", "--cache", str(db)),
                           env=env_for(server), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    resent = requests_sent(server)
    # every request the killed run never sent must go out now; of those it sent, only the
    # ones in flight or answered in its last fraction of a second may be sent again
    assert N_RESUME - before_kill <= resent <= N_RESUME - before_kill + 16 + 300, \
        (before_kill, resent)
    assert "answers reused from" in rerun.stderr

    server.reset()
    whole = subprocess.run(command(tmp_path / "whole.csv", "--no-cache"), env=env_for(server),
                           capture_output=True, text=True, timeout=120)
    assert whole.returncode == 0, whole.stderr
    assert requests_sent(server) == N_RESUME
    assert (tmp_path / "out.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    print(f"killed after {before_kill} requests; the re-run sent {resent}")


_JOB = textwrap.dedent("""
    import json, logging, sys
    import semex
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    kind, base, key, db, n, out = sys.argv[1:7]
    lm = semex.LM("test-model", api_base=base, api_key=key, max_concurrency=16,
                  cache=db)
    if kind == "llm_batch":
        res = semex.llm_batch([f"prompt {i}" for i in range(int(n))], model=lm,
                              max_concurrent=16)
        res = [r if isinstance(r, str) else repr(r) for r in res]
    else:
        docs = [{"text": f"doc {i}"} for i in range(int(n))]
        res = semex.sem_extract(docs, lm, {"topic": None, "size": "an integer"},
                                batch_size=4).outputs
    with open(out, "w") as f:
        json.dump(res, f)
    print(json.dumps({"cached": lm.total_usage.cached,
                      "requests": lm.total_usage.requests}))
""")


def _job(server, kind, db, n, out, **popen):
    return subprocess.Popen([sys.executable, "-c", _JOB, kind, server.base_url,
                             server.api_key, str(db), str(n), str(out)],
                            env=env_for(server), **popen)


@pytest.mark.slow
@pytest.mark.parametrize("kind,n", [("llm_batch", 2000), ("sem_extract", 4000)])
def test_a_killed_library_job_resumes_from_the_cache(server, tmp_path, kind, n):
    server.configure(latency_ms=[15, 35])
    db = tmp_path / "cache.sqlite3"
    calls = n if kind == "llm_batch" else n // 4
    proc = _job(server, kind, db, n, tmp_path / "killed.json",
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    before_kill = _kill_at(proc, server, calls // 2)

    server.reset()
    server.configure(latency_ms=[15, 35])
    rerun = _job(server, kind, db, n, tmp_path / "resumed.json", stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    resent = requests_sent(server)
    assert calls - before_kill <= resent <= calls - before_kill + 16 + 300, \
        (before_kill, resent)
    assert json.loads(out)["cached"] >= before_kill - 16 - 300
    print(f"{kind}: killed after {before_kill} of {calls} requests; the re-run sent {resent}")

    server.reset()
    whole = _job(server, kind, tmp_path / "fresh.sqlite3", n, tmp_path / "whole.json",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    whole.communicate(timeout=120)
    assert whole.returncode == 0
    assert json.loads((tmp_path / "resumed.json").read_text()) == \
        json.loads((tmp_path / "whole.json").read_text())


@pytest.mark.slow
def test_two_processes_running_the_same_job_at_once_both_finish_and_lose_nothing(
        server, tmp_path):
    server.configure(latency_ms=[2, 10])
    db = tmp_path / "cache.sqlite3"
    n = 1500
    procs = [_job(server, "llm_batch", db, n, tmp_path / f"out{i}.json",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "WARNING" not in err.upper(), err
    expected = [f"echo: prompt {i}" for i in range(n)]
    for i in range(2):
        assert json.loads((tmp_path / f"out{i}.json").read_text()) == expected
    assert requests_sent(server) <= 2 * n  # never a third time
    cache = Cache(db)
    assert cache.info()["entries"] == n
    cache.close()
    server.reset()
    third = _job(server, "llm_batch", db, n, tmp_path / "out3.json", stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert requests_sent(server) == 0 and json.loads(out)["cached"] == n


def test_a_full_disk_turns_caching_off_with_one_warning_and_the_job_finishes(
        server, tmp_path):
    """The process may write files of at most 96 KiB (RLIMIT_FSIZE): SQLite's writes past
    that fail with EFBIG as they would with ENOSPC, while the job goes on."""
    db = tmp_path / "cache.sqlite3"
    n = 3000
    script = textwrap.dedent("""
        import resource, signal, sys, runpy
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, 96 * 1024))
        import logging
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        sys.argv = ["job"] + sys.argv[1:]
        exec(compile(sys.argv.pop(1), "job", "exec"))
    """)
    proc = subprocess.run([sys.executable, "-c", script, _JOB, "llm_batch", server.base_url,
                           server.api_key, str(db), str(n), str(tmp_path / "out.json")],
                          env=env_for(server), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == \
        [f"echo: prompt {i}" for i in range(n)]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, proc.stderr
    assert "writing failed" in warnings[0] and "continues without caching" in warnings[0]
    assert requests_sent(server) == n
    # what was committed before the limit is intact and usable
    cache = Cache(db)
    kept = cache.info()["entries"]
    assert 0 < kept < n
    cache.close()


# -- bad paths and files ------------------------------------------------------------------
def test_unusable_cache_options_are_clear_errors_before_any_request(server, tmp_path):
    a_file = tmp_path / "plain.txt"
    a_file.write_text("not a folder")
    with pytest.raises(semex.errors.ConfigurationError, match="cannot create the folder"):
        semex.LM("m", api_base=server.base_url, cache=str(a_file / "cache.sqlite3"))
    with pytest.raises(semex.errors.ConfigurationError, match="is a directory"):
        semex.Cache(tmp_path)
    with pytest.raises(semex.errors.ConfigurationError, match="must be True, False"):
        semex.LM("m", api_base=server.base_url, cache=42)
    with pytest.raises(semex.errors.ConfigurationError, match="max_bytes"):
        semex.Cache(tmp_path / "c.sqlite3", max_bytes=10)
    with pytest.raises(semex.errors.ConfigurationError, match="not an SQLite database"):
        semex.Cache(a_file)
    assert a_file.read_text() == "not a folder"  # never touched
    foreign = tmp_path / "app.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(semex.errors.ConfigurationError, match="did not create.*customers"):
        semex.Cache(foreign)
    assert requests_sent(server) == 0


def test_a_non_writable_cache_folder_is_a_clear_error(server, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(semex.errors.ConfigurationError, match="not writable"):
            semex.Cache(folder / "c.sqlite3")
    finally:
        folder.chmod(0o700)


def test_a_corrupt_cache_is_moved_aside_and_rebuilt_with_a_warning(
        make_lm, server, tmp_path, caplog):
    path = tmp_path / "c.sqlite3"
    lm = make_lm(cache=str(path))
    semex.llm_batch([f"entry {i} " + "x" * 200 for i in range(400)], model=lm)
    lm.cache.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:  # scribble over every page but the first
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    server.reset()
    with caplog.at_level(logging.WARNING, logger="semex"):
        again = make_lm(cache=str(path))
        out = semex.llm_batch([f"entry {i} " + "x" * 200 for i in range(400)], model=again)
    assert out[0].startswith("echo: entry 0") and len(out) == 400
    assert all(isinstance(o, str) for o in out)
    assert requests_sent(server) == 400
    moved = [m for m in caplog.messages if "corrupt" in m and "moved it to" in m]
    assert len(moved) == 1, caplog.messages
    assert list(tmp_path.glob("c.sqlite3.corrupt-*"))
    again.cache.flush()
    assert again.cache.info()["entries"] == 400  # the new one works


def test_an_older_cache_format_is_rebuilt_with_a_warning(tmp_path, caplog):
    path = tmp_path / "c.sqlite3"
    Cache(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING, logger="semex"):
        cache = Cache(path)
    assert any("format 999" in m for m in caplog.messages)
    cache.put_many([(b"k" * 16, "v", "stop", 1, 2, 3)])
    cache.flush()
    assert cache.get_many([b"k" * 16])[0].value == "v"
    cache.close()


# -- the generic interface and eviction -----------------------------------------------------
def test_get_many_and_put_many_keep_types_order_and_misses(tmp_path):
    cache = Cache(tmp_path / "new" / "c.sqlite3")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700  # answers are private
    keys = [semex.cache.request_key("http://127.0.0.1/v1/embeddings", f"{i}".encode(),
                                    kind=b"embeddings") for i in range(2500)]
    cache.put_many([(k, bytes([i % 256]) * 8, None, i, 0, i) for i, k in enumerate(keys)
                    if i % 3])
    assert cache.flush()
    got = cache.get_many(keys)
    for i, entry in enumerate(got):
        if i % 3 == 0:
            assert entry is None
        else:
            assert entry.value == bytes([i % 256]) * 8 and entry.prompt_tokens == i
            assert entry.finish_reason is None and entry.written_at > 0
    assert cache.clear() == len([i for i in range(2500) if i % 3])
    assert cache.get_many(keys[:5]) == [None] * 5
    cache.close()


def test_the_size_limit_evicts_the_least_recently_used_first(tmp_path):
    path = tmp_path / "c.sqlite3"
    limit = 384 * 1024
    cache = Cache(path, max_bytes=limit)
    value = "v" * 1000  # about 1.4 KB per entry in the file

    def rows(tag, n=100):
        return [(f"{tag}{i:04d}".encode().ljust(16, b"."), value, "stop", 1, 1, 2)
                for i in range(n)]

    def alive(tag):
        return sum(e is not None for e in cache.get_many([r[0] for r in rows(tag)]))

    cache.put_many(rows("old"))
    cache.put_many(rows("mid"))
    cache.flush()
    assert cache.info()["bytes_used"] < limit
    # two hours pass; then "old" is used again and "mid" is not
    conn = sqlite3.connect(path)
    conn.execute("UPDATE entries SET used_at = used_at - 7200, written_at = written_at - 7200")
    conn.commit()
    conn.close()
    assert alive("old") == 100
    cache.flush()
    cache.put_many(rows("new"))  # over the limit now: back under 90% of it
    cache.flush()
    assert cache.info()["bytes_used"] <= limit
    assert alive("mid") < 100
    assert alive("old") == 100 and alive("new") == 100
    for tag in ("a", "b", "c", "d"):
        cache.put_many(rows(tag))
        cache.flush()
        assert cache.info()["bytes_used"] <= limit
    assert alive("mid") == 0 and alive("d") == 100
    cache.close()


# -- the CLI ------------------------------------------------------------------------------
def test_cli_cache_path_info_clear_and_no_cache(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, server.api_key)
    src = tmp_path / "in.csv"
    pd.DataFrame({"text": [f"row {i}" for i in range(30)]}).to_csv(src, index=False)
    default = os.path.join(os.environ["SEMEX_CACHE_DIR"], "cache.sqlite3")
    assert cli.main(["cache", "path"]) == 0
    assert capsys.readouterr().out.strip() == default

    def extract(*extra):
        code = cli.main(["extract", str(src), "--col", "text", "--out", "topic", "-o",
                         str(tmp_path / "out.csv"), "--api-base", server.base_url,
                         "--api-key-env", KEY_ENV, "--model", "test-model", "--no-progress",
                         "--batch-size", "1", *extra])
        return code, capsys.readouterr().err

    code, err = extract()
    assert code == 0 and "cache: 0 answers reused from " + default in err
    assert requests_sent(server) == 30
    code, err = extract()
    assert code == 0 and "cache: 30 answers reused" in err
    assert requests_sent(server) == 30
    code, err = extract("--no-cache")
    assert code == 0 and "cache:" not in err and requests_sent(server) == 60

    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"path: {default}" in out and "entries: 30" in out
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 30 entries" in capsys.readouterr().err
    assert cli.main(["cache", "info"]) == 0
    assert "entries: 0" in capsys.readouterr().out

    bad = tmp_path / "plain.txt"
    bad.write_text("x")
    code, err = extract("--cache", str(bad / "c.db"))
    assert code == 2 and "--no-cache" in err and "Traceback" not in err


def test_an_idle_writer_thread_ends_and_a_new_one_takes_later_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(semex.cache, "_IDLE_S", 0.2)
    cache = Cache(tmp_path / "c.sqlite3")
    cache.put_many([(b"a" * 16, "first", "stop", 1, 1, 2)])
    assert cache.flush()
    thread = cache._writer.thread
    thread.join(10)
    assert not thread.is_alive(), "the idle writer thread did not end"
    cache.put_many([(b"b" * 16, "second", "stop", 1, 1, 2)])
    assert cache.flush()
    assert [e.value for e in cache.get_many([b"a" * 16, b"b" * 16])] == ["first", "second"]
    cache.close()
