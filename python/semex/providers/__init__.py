"""Where an LM's requests go and how they authenticate: the provider seam.

A provider says the URL of a chat request, the header that carries the key, and where its
defaults come from (environment variables):
- ``openai`` and any OpenAI-compatible server (vLLM, llama.cpp, Ollama, LM Studio, Groq,
  Together, OpenRouter, DeepSeek, Mistral, xAI), chosen by a LiteLLM/LOTUS-style
  ``provider/model`` prefix; answers read by csrc/chatjson.c;
- ``azure``: Azure OpenAI deployments (deployment URL, ``api-version``, ``api-key``), the
  same wire format;
- ``anthropic`` (Messages API) and ``gemini`` (generateContent): native dialects with their
  own bodies and answers (:class:`_native.Dialect`, one module each), read by
  csrc/nativejson.c. ``"anthropic/<model>"`` and ``"gemini/<model>"`` select them too.

Also the transport settings every provider shares: whether a base URL is local (no key
needed) and which CA bundle verifies TLS.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from .. import errors as E

__all__ = ["DEFAULT_BASE", "PROVIDERS", "Endpoint", "dialect_of", "is_local", "key_variables",
           "resolve_endpoint", "tls_settings"]

DEFAULT_BASE = "https://api.openai.com/v1"

# LiteLLM/LOTUS-style "provider/model" prefixes of OpenAI-compatible APIs: the prefix picks
# the default base URL and key variable and is not sent (a real provider rejects
# "openai/gpt-4o-mini"). Names with any other slash ("meta-llama/Llama-3-8B" on vLLM) are
# sent as they are. base None: OPENAI_BASE_URL or OpenAI's; key None: no key variable.
PREFIXES: Dict[str, tuple] = {
    "openai": (None, "OPENAI_API_KEY"),
    "hosted_vllm": (None, "HOSTED_VLLM_API_KEY"),
    "ollama": ("http://localhost:11434/v1", None),
    "ollama_chat": ("http://localhost:11434/v1", None),
    "lm_studio": ("http://localhost:1234/v1", None),
    "groq": ("https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    "deepseek": ("https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
    "mistral": ("https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
    "openrouter": ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    "together_ai": ("https://api.together.xyz/v1", "TOGETHERAI_API_KEY"),
    "xai": ("https://api.x.ai/v1", "XAI_API_KEY"),
}

# Native dialects: provider -> (base URL variable, default base, key variables in order).
NATIVE: Dict[str, tuple] = {
    "anthropic": ("ANTHROPIC_BASE_URL", "https://api.anthropic.com", ("ANTHROPIC_API_KEY",)),
    "gemini": ("GEMINI_API_BASE", "https://generativelanguage.googleapis.com",
               ("GEMINI_API_KEY", "GOOGLE_API_KEY")),
}
PROVIDERS = ("openai", "anthropic", "gemini", "azure")


def key_variables(provider: Optional[str]) -> tuple:
    """The environment variables an LM of `provider` reads its key from, in order."""
    if provider in NATIVE:
        return NATIVE[provider][2]
    if provider == "azure":
        return ("AZURE_OPENAI_API_KEY",)
    return ("OPENAI_API_KEY",)


def dialect_of(provider: Optional[str]) -> Any:
    """The native dialect of `provider` (None: the OpenAI wire format)."""
    if provider == "anthropic":
        from .anthropic import Anthropic

        return Anthropic()
    if provider == "gemini":
        from .gemini import Gemini

        return Gemini()
    return None


AZURE_API_VERSION = "2024-10-21"  # a GA version of the Azure OpenAI data-plane API


def split_provider(model: str) -> tuple:
    """(provider or None, the model name to send)."""
    prefix, sep, rest = model.partition("/")
    if sep and rest and (prefix in PREFIXES or prefix in NATIVE or prefix == "azure"):
        return prefix, rest
    if sep and prefix in ("azure_ai", "bedrock", "vertex_ai"):
        raise E.ConfigurationError(
            f"model {model!r}: the {prefix!r} provider is not supported yet; use an "
            "OpenAI-compatible endpoint of it with api_base=... and the model name alone")
    return None, model


@dataclass
class Endpoint:
    """An LM's resolved target. ``key`` is the secret: never shown (the LM keeps it)."""

    provider: Optional[str]
    model: str          # the name sent (the deployment, for Azure)
    api_base: str
    url: str            # where chat requests go
    api_version: Optional[str]
    key: Optional[str]
    auth_header: Callable[[str], str]  # key -> the "Name: value" header line
    dialect: Any = None  # a native dialect (_native.Dialect); None: OpenAI's wire format

    def __repr__(self) -> str:
        return f"Endpoint(provider={self.provider!r}, url={self.url!r}, key=<hidden>)"


def _bearer(key: str) -> str:
    return f"Authorization: Bearer {key}"


def _azure_key(key: str) -> str:
    return f"api-key: {key}"


def resolve_endpoint(name: str, provider: Optional[str], api_base: Optional[str],
                     api_key: Optional[str], api_version: Optional[str]) -> Endpoint:
    """Provider, model, URL and key of ``LM(name, provider=, api_base=, api_key=,
    api_version=)``, from the arguments, the name's prefix and the environment; every
    mistake is a ConfigurationError before anything is sent."""
    prefix, model = split_provider(name)
    if provider is not None:
        if provider not in PROVIDERS:
            raise E.ConfigurationError(
                f"provider must be one of {', '.join(map(repr, PROVIDERS))}, got "
                f"{provider!r} (another OpenAI-compatible API: provider='openai' with its "
                "api_base)")
        if prefix not in (None, provider, "openai"):
            raise E.ConfigurationError(
                f"model {name!r} names the provider {prefix!r}, but provider={provider!r}")
        prefix = provider
    if prefix in NATIVE:
        return _native_endpoint(prefix, model, api_base, api_key, api_version)
    azure = prefix == "azure"
    base_default, key_variable = PREFIXES.get(prefix, (None, "OPENAI_API_KEY"))
    if azure:
        base_default, key_variable = os.environ.get("AZURE_OPENAI_ENDPOINT"), \
            "AZURE_OPENAI_API_KEY"
        if not (api_base or base_default):
            raise E.ConfigurationError(
                "Azure OpenAI needs its endpoint: pass api_base='https://<resource>."
                "openai.azure.com' or set AZURE_OPENAI_ENDPOINT")
    if api_base:
        base = api_base
    elif base_default is None:
        base = (os.environ.get("HOSTED_VLLM_API_BASE") if prefix == "hosted_vllm"
                else None) or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE
    else:
        base = base_default
    if not isinstance(base, str) or not base.startswith(("http://", "https://")):
        raise E.ConfigurationError(f"api_base must be an http:// or https:// URL, got {base!r}")
    base = base.rstrip("/")
    version = None
    if azure:
        from urllib.parse import quote

        version = api_version or os.environ.get("OPENAI_API_VERSION") or AZURE_API_VERSION
        deployments = "" if "/openai/deployments/" in base else \
            f"/openai/deployments/{quote(model, safe='')}"
        url = f"{base}{deployments}/chat/completions?api-version={quote(version, safe='')}"
    else:
        if api_version is not None:
            raise E.ConfigurationError("api_version is for provider='azure'")
        url = base + "/chat/completions"
    key = api_key if api_key is not None else (
        os.environ.get(key_variable) if key_variable else None)
    if api_key is None and not key and not is_local(base):
        raise E.ConfigurationError(
            f"no API key for {base}: set {key_variable or 'OPENAI_API_KEY'} or pass "
            "api_key=... (a server on this machine or your network needs none; api_key='' "
            "sends none on purpose)")
    return Endpoint(prefix, model, base, url, version, key or None,
                    _azure_key if azure else _bearer)


def _native_endpoint(provider: str, model: str, api_base: Optional[str],
                     api_key: Optional[str], api_version: Optional[str]) -> Endpoint:
    base_variable, base_default, key_variables_ = NATIVE[provider]
    if api_version is not None:
        raise E.ConfigurationError("api_version is for provider='azure'")
    base = api_base or os.environ.get(base_variable) or base_default
    if not isinstance(base, str) or not base.startswith(("http://", "https://")):
        raise E.ConfigurationError(f"api_base must be an http:// or https:// URL, got {base!r}")
    base = base.rstrip("/")
    if not model:
        raise E.ConfigurationError(f"provider={provider!r} needs a model name")
    key = api_key
    if key is None:
        key = next((os.environ[v] for v in key_variables_ if os.environ.get(v)), None)
        if not key and not is_local(base):
            raise E.ConfigurationError(
                f"no API key for {base}: set {' or '.join(key_variables_)} or pass "
                "api_key=...")
    dialect = dialect_of(provider)
    return Endpoint(provider, model, base, dialect.url(base, model), None, key or None,
                    dialect.auth_header, dialect)


def is_local(url: str) -> bool:
    """A base URL on this machine or a private network (no key needed to reach it): a
    loopback, private or link-local address, or a host name without a dot (a container's
    or a LAN host's name)."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost") or host.endswith(".local") \
            or "." not in host and ":" not in host:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local or \
        address.is_unspecified


def tls_settings(verify_tls: Any) -> tuple:
    """(verify, CA bundle file or None, CA directory or None) from ``verify_tls`` (True,
    False or a path) and, for True, the variables the Python ecosystem reads: requests'
    REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE, then OpenSSL's SSL_CERT_FILE / SSL_CERT_DIR."""
    if verify_tls is False:
        return False, None, None
    if verify_tls is True:
        for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
            path = os.environ.get(variable)
            if path:
                return _ca_path(path, f"${variable}")
        path = os.environ.get("SSL_CERT_DIR")
        if path:
            return _ca_path(path, "$SSL_CERT_DIR")
        return True, None, None
    if isinstance(verify_tls, (str, os.PathLike)):
        return _ca_path(os.fspath(verify_tls), "verify_tls")
    raise E.ConfigurationError("verify_tls must be True, False or the path of a CA bundle "
                               f"(or a directory of CA certificates), got {verify_tls!r}")


def _ca_path(path: str, where: str) -> tuple:
    if os.path.isdir(path):
        return True, None, path
    if os.path.isfile(path):
        return True, path, None
    raise E.ConfigurationError(f"{where} = {path!r}: no such CA bundle file or directory")
