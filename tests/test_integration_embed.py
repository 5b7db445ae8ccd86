"""Embeddings from a real local model (SmolLM2-135M in llama.cpp, mean pooled), end to end:
semex.embed through the synchronous fallback, then sem_index / sem_search on Qdrant.

Needs `.ci/setup-llm.sh`. Skipped when the local model is not installed, except where
SEMEX_REQUIRE_LLM=1 (CI) makes that a failure.
"""
import os

import numpy as np
import pytest

import semex
from semex._local import LocalEmbedder, find_smollm2


def _available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return find_smollm2() is not None


if not _available():
    if os.environ.get("SEMEX_REQUIRE_LLM") == "1":
        raise RuntimeError("SEMEX_REQUIRE_LLM=1 but the local LLM is not installed "
                           "(run .ci/setup-llm.sh)")
    pytestmark = pytest.mark.skip(reason="local LLM not installed (run .ci/setup-llm.sh)")

TEXTS = ["The invoice for March is attached; payment is due in 30 days.",
         "Our cat sleeps on the windowsill every afternoon.",
         "Please pay the attached invoice by the end of the month.",
         "The kitten chased a ball of yarn across the floor.",
         "The invoice for March is attached; payment is due in 30 days."]


@pytest.fixture(scope="module")
def local_rm():
    return LocalEmbedder()


@pytest.mark.timeout(600)
def test_real_model_embeds_texts_in_order(local_rm):
    out = semex.embed(TEXTS, local_rm, batch_size=2, max_concurrent=2)
    assert out.shape == (len(TEXTS), 576) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-4)
    assert np.allclose(out[0], out[4], atol=1e-5)  # the same text, the same vector
    assert not np.allclose(out[0], out[1], atol=1e-3)
    sims = out @ out.T
    assert sims[0, 2] > sims[0, 1] and sims[1, 3] > sims[1, 2]  # invoices, cats


@pytest.mark.timeout(600)
def test_real_model_behind_sem_index_and_sem_search(local_rm, tmp_path):
    pytest.importorskip("qdrant_client")
    import pandas as pd

    df = pd.DataFrame({"text": TEXTS[:4]})
    df.sem_index("text", str(tmp_path / "idx"), model=local_rm, progress=False)
    hits = df.sem_search("text", "an unpaid bill", K=2, model=local_rm)
    assert len(hits) == 2 and set(hits.index) <= set(df.index)


@pytest.mark.timeout(600)
def test_the_batch_rag_recipe_runs_end_to_end(tmp_path):
    pytest.importorskip("qdrant_client")
    import subprocess
    import sys

    recipe = os.path.join(os.path.dirname(__file__), "..", "examples", "batch_rag.py")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    run = subprocess.run([sys.executable, recipe, "--index", str(tmp_path / "idx")],
                         capture_output=True, text=True, timeout=500, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("Q: ") == 4 and run.stdout.count("   A: ") == 4
    assert "ingested 12, already there 0, failed 0" in run.stderr
