"""Several deployments of one model behind one ``LM``: endpoints, keys or regions, each
with its own limits.

``LM("gpt-4o-mini", deployments=[...])`` (or ``LM([...])``) takes a list whose entries are
``(api_base, api_key, rpm, tpm)`` tuples (shorter ones too: ``(api_base, api_key)``),
dicts with those keys and the optional ones of :class:`Deployment`, ``Deployment`` objects,
or ``LM`` objects (their endpoint, key and rpm/tpm). The C scheduler sends each request to
the deployment with the most room: each keeps its own rpm/tpm buckets, in-flight window,
cool-down after a 429 and health, a deployment that fails or refuses drains to the others,
and a retry after a failure prefers another deployment (csrc/sched.h, ``sx_deploy``).

Keys are never shown (reprs say ``<set>``) and never pickled unless asked for: an LM with
deployments travels to Dask workers and Ray actors as its settings, and each deployment's
key is read there from its ``api_key_env`` variable (or the provider's usual one).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional

from . import errors as E

__all__ = ["Deployment"]

_FIELDS = ("api_base", "api_key", "rpm", "tpm", "weight", "max_concurrency", "name",
           "api_key_env", "provider", "api_version")


class _NotShipped:
    """Stands in, in another process, for a key that was given literally and not shipped."""

    def __repr__(self) -> str:
        return "<api_key not shipped>"

    def __reduce__(self) -> Any:
        return (_not_shipped, ())


NOT_SHIPPED = _NotShipped()


def _not_shipped() -> _NotShipped:
    return NOT_SHIPPED


class Deployment:
    """One deployment of an LM with several.

    api_base:
        Its OpenAI-compatible base URL (``.../v1``), or the Azure resource endpoint.
    api_key:
        Its key; None reads ``api_key_env``, else the provider's usual variable
        (``OPENAI_API_KEY``...). ``""`` sends none. Never shown, never pickled by default.
    rpm, tpm:
        Its own requests/tokens per minute (None: no limit of its own).
    weight:
        Its share of the traffic while no limit binds (default: its rpm when the
        deployments have rpm, else equal shares).
    max_concurrency:
        Its own in-flight cap (default: the LM's ``max_concurrency``, which bounds the sum).
    name:
        How usage and stats name it (default: ``api_base``, numbered if two share one).
    api_key_env:
        The variable to read its key from, here and in every worker process.
    provider, api_version:
        As for ``LM`` (default: the LM's).
    """

    __slots__ = ("api_base", "_key", "rpm", "tpm", "weight", "max_concurrency", "name",
                 "api_key_env", "provider", "api_version", "_key_given")

    def __init__(self, api_base: str, api_key: Optional[str] = None,
                 rpm: Optional[float] = None, tpm: Optional[float] = None, *,
                 weight: Optional[float] = None, max_concurrency: Optional[int] = None,
                 name: Optional[str] = None, api_key_env: Optional[str] = None,
                 provider: Optional[str] = None, api_version: Optional[str] = None):
        if not isinstance(api_base, str) or not api_base.startswith(("http://", "https://")):
            raise E.ConfigurationError(
                f"api_base must be an http:// or https:// URL, got {api_base!r}")
        if api_key is not None and not isinstance(api_key, (str, _NotShipped)):
            raise E.ConfigurationError(
                f"api_key must be a str or None, got {type(api_key).__name__}")
        for label, value in (("rpm", rpm), ("tpm", tpm), ("weight", weight)):
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not value > 0):
                raise E.ConfigurationError(
                    f"{label} must be a positive number or None, got {value!r}")
        if max_concurrency is not None and (isinstance(max_concurrency, bool) or not isinstance(
                max_concurrency, int) or max_concurrency < 1):
            raise E.ConfigurationError(
                f"max_concurrency must be an integer >= 1 or None, got {max_concurrency!r}")
        for label, value in (("name", name), ("api_key_env", api_key_env),
                             ("provider", provider), ("api_version", api_version)):
            if value is not None and not isinstance(value, str):
                raise E.ConfigurationError(
                    f"{label} must be a str or None, got {type(value).__name__}")
        if api_key is not None and api_key_env is not None:
            raise E.ConfigurationError("give api_key or api_key_env, not both")
        self.api_base = api_base.rstrip("/")
        self._key = api_key
        self._key_given = api_key is not None
        self.rpm = rpm
        self.tpm = tpm
        self.weight = weight
        self.max_concurrency = max_concurrency
        self.name = name
        self.api_key_env = api_key_env
        self.provider = provider
        self.api_version = api_version

    @classmethod
    def from_lm(cls, lm: Any) -> "Deployment":
        """An LM's endpoint, key and limits as a deployment."""
        if getattr(lm, "deployments", None):
            raise E.ConfigurationError("an LM with deployments cannot be one deployment of "
                                       "another: list its deployments instead")
        d = cls(lm.api_base, lm._LM__api_key or "", lm.rpm, lm.tpm, provider=lm.provider,
                api_version=lm.api_version)
        d._key_given = lm._key_given
        if not lm._key_given:
            d._key = None  # it came from the environment: read it there in workers too
        return d

    def key(self, where: str) -> Optional[str]:
        """The key to send: given, from api_key_env, or None (the provider's variable)."""
        if isinstance(self._key, _NotShipped):
            raise E.ConfigurationError(
                f"{where}: its api_key was given literally and semex does not ship API keys "
                f"to other processes (this is process {os.getpid()} on {os.uname().nodename})"
                ": give the deployment api_key_env='VARIABLE' set in every worker's "
                "environment, or pass ship_api_key=True")
        if self._key is not None:
            return self._key
        if self.api_key_env is not None:
            value = os.environ.get(self.api_key_env)
            if value is None:
                raise E.ConfigurationError(
                    f"{where}: api_key_env={self.api_key_env!r} is not set in this process "
                    f"({os.getpid()} on {os.uname().nodename})")
            return value
        return None

    def settings(self, ship_api_key: bool = False) -> Dict[str, Any]:
        """What rebuilds it elsewhere: the key only if shipped (else a marker if it was
        given literally, so the other process says what is missing)."""
        out = {name: getattr(self, name) for name in _FIELDS
               if name != "api_key" and getattr(self, name) is not None}
        if self._key_given and self._key is not None:
            out["api_key"] = self._key if ship_api_key else NOT_SHIPPED
        return out

    def __repr__(self) -> str:
        parts = [f"{self.api_base!r}", f"api_key={'<set>' if self._key else None}"]
        parts += [f"{n}={getattr(self, n)!r}" for n in ("rpm", "tpm", "weight",
                                                          "max_concurrency", "name",
                                                          "api_key_env")
                  if getattr(self, n) is not None]
        return f"Deployment({', '.join(parts)})"


def parse(entries: Any) -> List[Deployment]:
    """The deployments of ``LM(deployments=entries)``, each checked, the bad one named."""
    from .lm import LM

    if isinstance(entries, (str, bytes, Mapping)) or not hasattr(entries, "__iter__"):
        raise E.ConfigurationError(
            "deployments must be a list of (api_base, api_key, rpm, tpm) tuples, dicts, "
            f"Deployment or LM objects, got {type(entries).__name__}")
    out = []
    for i, entry in enumerate(list(entries)):
        where = f"deployments[{i}]"
        try:
            if isinstance(entry, Deployment):
                d = entry
            elif isinstance(entry, LM):
                d = Deployment.from_lm(entry)
            elif isinstance(entry, Mapping):
                unknown = [k for k in entry if k not in _FIELDS]
                if unknown:
                    raise E.ConfigurationError(
                        f"unknown key {unknown[0]!r} (a deployment takes "
                        f"{', '.join(_FIELDS)}; all of them serve the LM's model)")
                if "api_base" not in entry:
                    raise E.ConfigurationError("api_base is missing")
                d = Deployment(**dict(entry))
            elif isinstance(entry, (tuple, list)):
                if not 1 <= len(entry) <= 4:
                    raise E.ConfigurationError(
                        f"a tuple is (api_base, api_key, rpm, tpm), got {len(entry)} items")
                d = Deployment(*entry)
            else:
                raise E.ConfigurationError(
                    "must be an (api_base, api_key, rpm, tpm) tuple, a dict, a Deployment or "
                    f"an LM, got {type(entry).__name__}")
        except E.ConfigurationError as exc:
            raise E.ConfigurationError(f"{where}: {exc}") from None
        except TypeError as exc:  # Deployment(**entry) with a wrong positional/keyword use
            raise E.ConfigurationError(f"{where}: {exc}") from None
        out.append(d)
    if not out:
        raise E.ConfigurationError("deployments is empty: give at least one")
    if len(out) > 1000:
        raise E.ConfigurationError(f"at most 1000 deployments, got {len(out)}")
    return out


def names(deployments: List[Deployment]) -> List[str]:
    """Their names for usage and stats: given, else api_base, numbered when repeated."""
    bases = [d.api_base for d in deployments]
    out = []
    for i, d in enumerate(deployments):
        if d.name is not None:
            out.append(d.name)
        elif bases.count(d.api_base) > 1:
            out.append(f"{d.api_base} #{i}")
        else:
            out.append(d.api_base)
    return out


def weights(deployments: List[Deployment]) -> List[float]:
    """Each one's share while no limit binds: its weight, else its rpm, else the largest
    rpm among them (a deployment without limits is not starved), else 1."""
    rpms = [d.rpm for d in deployments if d.rpm]
    top = max(rpms) if rpms else 1.0
    return [float(d.weight or d.rpm or top) for d in deployments]
