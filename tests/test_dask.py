"""semex.dask on a real local cluster (two worker processes) against the fake server."""
import os
import pickle
import warnings

import pandas as pd
import pytest

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
import dask.bag as db  # noqa: E402
import dask.dataframe as dd  # noqa: E402

from pydantic import BaseModel  # noqa: E402

import semex  # noqa: E402
import semex.dask as sdask  # noqa: E402
from semex import errors as E  # noqa: E402

FIELDS = {"sentiment": None, "product": None}


@pytest.fixture(scope="module")
def client(fakeserver_port):
    from conftest import API_KEY

    old = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = API_KEY  # the workers' own environment has the key
    try:
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=40)
    finally:
        if old is None:
            del os.environ["OPENAI_API_KEY"]
        else:
            os.environ["OPENAI_API_KEY"] = old
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def frame(n=40):
    return pd.DataFrame({"id": range(n), "text": [f"doc{i}" for i in range(n)]})


def test_ddf_sem_extract_is_lazy_and_equals_the_pandas_accessor(client, server, make_lm):
    lm = make_lm()
    df = frame()
    ddf = dd.from_pandas(df, npartitions=6)
    lazy = ddf.sem_extract(["text"], FIELDS, model=lm, batch_size=4)
    assert isinstance(lazy, dd.DataFrame)
    assert [r for r in server.log() if r["key"]] == []  # nothing ran yet
    assert list(lazy.columns) == ["id", "text", "sentiment", "product", "extract_error"]
    got = lazy.compute().sort_values("id").reset_index(drop=True)
    want = df.sem_extract(["text"], FIELDS, model=lm, batch_size=4, progress=False)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert list(got.dtypes) == list(lazy._meta.dtypes)


def _builds():
    import semex._remote

    return semex._remote.lm_builds


def test_each_worker_builds_one_engine_and_reuses_it(client, server, make_lm):
    lm = make_lm(max_concurrency=7)  # settings no other test uses
    ddf = dd.from_pandas(frame(60), npartitions=12)
    before = client.run(_builds)
    ddf.sem_extract(["text"], FIELDS, model=lm, batch_size=5).compute()
    ddf.sem_extract(["text"], FIELDS, model=lm, batch_size=3).compute()  # reused again
    after = client.run(_builds)
    built = {w: after[w] - before[w] for w in after}
    assert sum(built.values()) >= 1 and all(b <= 1 for b in built.values()), built


def test_the_key_is_not_shipped_unless_asked(client, server, make_lm):
    wrong = make_lm(api_key="sk-driver-WRONG")
    spec = sdask.LMSpec(wrong)
    assert b"sk-driver-WRONG" not in pickle.dumps(spec) and "WRONG" not in repr(spec)
    ddf = dd.from_pandas(frame(8), npartitions=2)
    # not shipped: the workers use the key in their own environment, which is right
    out = ddf.sem_extract(["text"], FIELDS, model=wrong, batch_size=4).compute()
    assert out["extract_error"].isna().all()
    # shipped: the driver's (wrong) key reaches the server, and every row fails on it
    assert b"sk-driver-WRONG" in pickle.dumps(sdask.LMSpec(wrong, ship_api_key=True))
    with pytest.raises(E.AuthenticationError):
        ddf.sem_extract(["text"], FIELDS, model=wrong, ship_api_key=True,
                        batch_size=4).compute()


def test_a_worker_without_a_key_says_how_to_fix_it(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    spec = sdask.LMSpec(semex.LM("gpt-4o-mini", api_key="sk-x"))
    with pytest.raises(E.ConfigurationError, match="ship_api_key=True"):
        spec.build()


class Row(BaseModel):  # at module level: workers import it, as with any Dask task
    words: int
    flag: bool


def test_typed_columns_keep_one_dtype_across_partitions(client, server, make_lm):
    texts = [f"w{i}" if i != 3 else "w3 [[fail=404]]" for i in range(8)]
    ddf = dd.from_pandas(pd.DataFrame({"text": texts}), npartitions=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.PartialFailureWarning)
        out = ddf.sem_extract("text", Row, model=make_lm(max_retries=0),
                              batch_size=1).compute()
    assert str(out["words"].dtype) == "Int64" and str(out["flag"].dtype) == "boolean"
    assert out["words"].isna().tolist() == [i == 3 for i in range(8)]
    assert out.loc[0, "words"] == len("w0")


def test_bad_options_fail_on_the_driver_before_anything_runs(client, server, make_lm):
    ddf = dd.from_pandas(frame(4), npartitions=2)
    with pytest.raises(E.ConfigurationError, match="not found"):
        ddf.sem_extract(["nope"], FIELDS, model=make_lm())
    with pytest.raises(E.UnknownParameterError, match="max_concurrent_batches"):
        ddf.sem_extract(["text"], FIELDS, model=make_lm(), max_concurrent=2)
    assert [r for r in server.log() if r["key"]] == []


def test_llm_batch_over_a_bag_and_a_series(client, server, make_lm):
    lm = make_lm(max_retries=0)
    prompts = [f"p{i}" for i in range(10)] + ["bad [[fail=404]]"]
    bag = db.from_sequence(prompts, npartitions=3)
    answers = sdask.llm_batch(bag, model=lm).compute()
    assert answers[:10] == [f"echo: p{i}" for i in range(10)]
    assert answers[10].startswith("Error: ") and "404" in answers[10]
    series = dd.from_pandas(pd.Series(prompts, name="q"), npartitions=4)
    out = sdask.llm_batch(series, model=lm).compute()
    assert out.tolist()[:10] == answers[:10] and out.name == "q"
    with pytest.raises(E.ConfigurationError, match="Bag"):
        sdask.llm_batch(prompts, model=lm)


def _extract_under_limit(server, make_lm, n, cluster_limit):
    server.reset()
    server.configure(rpm=600)  # 10 requests/s, a burst of 10: 429 + headers beyond that
    try:
        lm = make_lm(rpm=600, max_concurrency=16)
        ddf = dd.from_pandas(frame(n), npartitions=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", E.PartialFailureWarning)
            out = ddf.sem_extract(["text"], FIELDS, model=lm, batch_size=1,
                                  cluster_limit=cluster_limit).compute()
        return (sum(1 for r in server.log() if r["outcome"] == 429),
                int(out["extract_error"].notna().sum()))
    finally:
        server.configure(rpm=None)


def test_one_rate_limit_for_the_whole_cluster(client, server, make_lm):
    # Two workers, each applying rpm=600 itself, send twice the server's limit; leasing
    # from one budget on the scheduler keeps the cluster within it.
    leased, lost = _extract_under_limit(server, make_lm, 50, True)
    per_worker, _ = _extract_under_limit(server, make_lm, 50, False)
    assert lost == 0
    assert per_worker > 5, per_worker
    assert leased <= 2 and leased < per_worker, (leased, per_worker)


def test_the_budget_plugin_leases_and_takes_back_a_lost_workers_share():
    from semex.dask import _BudgetPlugin

    plugin = _BudgetPlugin()
    first = plugin.lease(name="b", who="w1", rpm=600, want_requests=8)
    assert first["requests"] == 8  # a burst of one second's worth: 10
    second = plugin.lease(name="b", who="w2", rpm=600, want_requests=8)
    assert 2 <= second["requests"] < 2.5 and second["retry_after"] > 0
    plugin.remove_worker(worker="w1")  # w1 reported 8 unused: they come back
    third = plugin.lease(name="b", who="w2", rpm=600, want_requests=8,
                         left_requests=second["requests"])
    assert third["requests"] >= 8 - 0.5
