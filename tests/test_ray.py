"""semex.ray on a local Ray instance against the fake server, and LM pickling."""
import pickle
import warnings

import pandas as pd
import pytest

import semex
from semex import errors as E

ray = pytest.importorskip("ray")
import semex.ray  # noqa: E402

FIELDS = {"sentiment": None, "product": None}


@pytest.fixture(scope="module")
def ray_local(fakeserver_port):
    from conftest import API_KEY

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OPENAI_API_KEY": API_KEY}})
    yield
    ray.shutdown()


def test_an_lm_pickles_as_its_settings_without_the_key(server, make_lm):
    lm = make_lm(api_key="sk-PICKLE-secret", extra_headers={"X-Trace": "1",
                                                             "X-Api-Key": "hidden"})
    data = pickle.dumps(lm)
    assert b"sk-PICKLE-secret" not in data and b"hidden" not in data
    again = pickle.loads(data)
    assert isinstance(again, semex.LM) and again is not lm
    assert again.model == lm.model and again.api_base == lm.api_base
    assert again.extra_headers == {"X-Trace": "1"}
    assert pickle.loads(data) is again  # one LM per settings in a process: one engine


def test_map_batches_with_actors_equals_the_pandas_accessor(ray_local, server, make_lm):
    lm = make_lm()
    df = pd.DataFrame({"id": range(30), "text": [f"doc{i}" for i in range(30)]})
    ds = ray.data.from_pandas([df.iloc[k:k + 10] for k in range(0, 30, 10)])
    out = ds.map_batches(semex.ray.SemExtract, batch_format="pandas", batch_size=8,
                         concurrency=2,
                         fn_constructor_kwargs={"input_cols": ["text"], "output_cols": FIELDS,
                                                "model": lm, "batch_size": 4})
    got = out.to_pandas().sort_values("id").reset_index(drop=True)
    want = df.sem_extract(["text"], FIELDS, model=lm, batch_size=4, progress=False)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_actors_share_one_rate_limit(ray_local, server, make_lm):
    def run(cluster_limit):
        server.reset()
        server.configure(rpm=600)  # 10/s, a burst of 10
        try:
            lm = make_lm(rpm=600, max_concurrency=16, max_retries=12)
            # four blocks, both actors get work: ~5 s of it each at the limit, so that they
            # overlap even when one starts seconds after the other (a loaded machine)
            frames = [pd.DataFrame({"text": [f"r{cluster_limit}{k}-{i}" for i in range(24)]})
                      for k in range(4)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", E.PartialFailureWarning)
                out = ray.data.from_pandas(frames).map_batches(
                    semex.ray.SemExtract, batch_format="pandas", batch_size=24, concurrency=2,
                    fn_constructor_kwargs={"input_cols": ["text"], "output_cols": FIELDS,
                                           "model": lm, "batch_size": 1,
                                           "cluster_limit": cluster_limit}).to_pandas()
            return (sum(1 for r in server.log() if r["outcome"] == 429),
                    int(out["extract_error"].notna().sum()))
        finally:
            server.configure(rpm=None)

    leased, lost = run(True)
    alone, _ = run(False)
    assert lost == 0
    # the control overshoots; the shared budget all but never does (a few 429s at most
    # where the lease and the server's bucket drift apart on a loaded machine)
    assert alone > 5 and leased <= 6 and leased * 5 <= alone, (leased, alone)
