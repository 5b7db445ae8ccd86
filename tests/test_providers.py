"""Provider dialects: Azure OpenAI (deployment URL, api-version, api-key header)."""
import pytest

import semex
from semex import errors as E


def chat_requests(server):
    return [r for r in server.log() if r["key"] is not None]


def test_azure_deployment_url_api_version_and_key_header(server):
    root = server.base_url[:-len("/v1")]
    lm = semex.LM("azure/my-gpt4o", api_base=root, api_key=server.api_key,
                  api_version="2024-06-01")
    try:
        assert lm.provider == "azure" and lm.model == "my-gpt4o"
        assert lm.url == f"{root}/openai/deployments/my-gpt4o/chat/completions" \
                         "?api-version=2024-06-01"
        assert semex.llm_batch(["hello"], model=lm) == ["echo: hello"]
        record = chat_requests(server)[-1]
        assert record["path"] == "/openai/deployments/my-gpt4o/chat/completions" \
                                 "?api-version=2024-06-01"
        assert record["auth_header"] == "api-key"  # not a bearer token
        assert server.api_key not in repr(lm)
    finally:
        lm.close()


def test_azure_from_the_environment(server, monkeypatch):
    root = server.base_url[:-len("/v1")]
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", root)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", server.api_key)
    monkeypatch.setenv("OPENAI_API_VERSION", "2025-01-01-preview")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with semex.LM("dep", provider="azure") as lm:
        assert lm.url.endswith("/openai/deployments/dep/chat/completions"
                               "?api-version=2025-01-01-preview")
        out = semex.sem_extract([{"t": "x"}], lm, {"product": None}, progress=False)
        assert out.outputs == [{"product": "product:x"}]
    assert chat_requests(server)[-1]["auth_header"] == "api-key"


def test_azure_needs_an_endpoint_and_rejects_mixed_providers(monkeypatch):
    monkeypatch.delenv("AZURE_OPENAI_ENDPOINT", raising=False)
    with pytest.raises(E.ConfigurationError, match="AZURE_OPENAI_ENDPOINT"):
        semex.LM("dep", provider="azure")
    with pytest.raises(E.ConfigurationError, match="provider"):
        semex.LM("groq/llama", provider="azure", api_base="http://127.0.0.1:9")
    with pytest.raises(E.ConfigurationError, match="provider must be"):
        semex.LM("m", provider="cohere", api_base="http://127.0.0.1:9/v1")
    with pytest.raises(E.ConfigurationError, match="api_version"):
        semex.LM("m", api_base="http://127.0.0.1:9/v1", api_version="2024-06-01")
