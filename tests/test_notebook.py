"""examples/quickstart.ipynb runs top to bottom (nbclient, a real kernel, the local LLM),
so the notebook can never rot."""
import os

import pytest

from test_integration_llm import _local_llm_available

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")

nbclient = pytest.importorskip("nbclient") if os.environ.get("SEMEX_REQUIRE_LLM") != "1" \
    else __import__("nbclient")
import nbformat  # noqa: E402  (installed with nbclient)

if not _local_llm_available() and os.environ.get("SEMEX_REQUIRE_LLM") != "1":
    pytestmark = pytest.mark.skip(reason="local LLM not installed (run make demo once to install it)")


@pytest.mark.timeout(900)
def test_quickstart_notebook_executes(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    nb = nbformat.read(os.path.join(EXAMPLES, "quickstart.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": EXAMPLES}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "smollm2-135m:" in text and "requests" in text  # the usage summary
