"""Process-wide defaults: ``semex.settings.configure(lm=semex.LM(...))`` (as in LOTUS).

``settings.context(lm=...)`` overrides them for one thread or asyncio task only (a
ContextVar overlay, as LOTUS's ``settings.context`` does).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Any, Dict, Iterator, Optional

from .errors import ConfigurationError

__all__ = ["Settings", "settings"]


_overlay: "contextvars.ContextVar[Optional[Dict[str, Any]]]" = contextvars.ContextVar(
    "semex_settings", default=None)


class Settings:
    """Defaults used when a call does not name them.

    lm: the default model for llm_batch, parallel_query, llm_query, map_reduce and
        sem_extract.
    rm: the default embedding ("retrieval") model for embed, sem_index and sem_search.
    helper_lm: LOTUS's second model setting; kept for programs that set it.
    cache: the persistent answer cache (semex.cache) of every LM built without its own
        ``cache=``: False (the default: off), True (the default file), a path, or a
        ``semex.Cache``.
    enable_cache: LOTUS's cache switch: True is ``cache=True`` (the default file), False
        is ``cache=False``.
    """

    _fields = ("lm", "rm", "helper_lm", "cache", "enable_cache")

    def __init__(self) -> None:
        self.lm: Any = None
        self.rm: Any = None
        self.helper_lm: Any = None
        self.enable_cache: bool = False
        self.cache: Any = False
        self._built: Dict[tuple, Any] = {}  # (class, name or None) -> LM / EmbeddingModel
        self._guard = threading.Lock()

    def __getattribute__(self, name: str) -> Any:
        if name in Settings._fields:
            overlay = _overlay.get()
            if overlay is not None and name in overlay:
                return overlay[name]
        return object.__getattribute__(self, name)

    def _check(self, options: Dict[str, Any]) -> Dict[str, Any]:
        """The options checked, with cache/enable_cache turned into the Cache to use."""
        for name, value in options.items():
            if name not in self._fields:
                raise ConfigurationError(
                    f"unknown setting {name!r}; known settings: {', '.join(self._fields)}")
            if name == "enable_cache" and not isinstance(value, bool):
                raise ConfigurationError(
                    f"enable_cache must be True or False, got {value!r}")
        options = dict(options)
        if "enable_cache" in options and "cache" not in options:
            options["cache"] = options["enable_cache"]
        if "cache" in options:
            from .cache import resolve  # here: cache imports errors only, but lazily opened

            value = options["cache"]
            options["cache"] = False if value is None else resolve(value, "settings cache")
            options["enable_cache"] = options["cache"] is not False
        return options

    def configure(self, **options: Any) -> None:
        """Set defaults, e.g. ``configure(lm=LM("gpt-4o-mini"), cache=True)``."""
        options = self._check(options)
        for name, value in options.items():
            setattr(self, name, value)

    @contextlib.contextmanager
    def context(self, **options: Any) -> Iterator["Settings"]:
        """Override settings in this thread or asyncio task only, until the block ends."""
        options = self._check(options)
        token = _overlay.set({**(_overlay.get() or {}), **options})
        try:
            yield self
        finally:
            _overlay.reset(token)

    def __repr__(self) -> str:
        return (f"Settings(lm={self.lm!r}, rm={self.rm!r}, cache={self.cache!r})")

    def resolve_lm(self, model: Optional[Any]) -> Any:
        """The model a call should use: the one given (a name: this process's LM of that
        name), else the configured default, else an LM built from OPENAI_BASE_URL /
        OPENAI_API_KEY / SEMEX_MODEL when those are set."""
        from .lm import LM  # import here: lm imports settings' siblings

        return self._resolve(model, self.lm, LM, "model", "lm=semex.LM(...)")

    def resolve_rm(self, model: Optional[Any]) -> Any:
        """The embedding model a call should use, by the same rules as resolve_lm."""
        from .embed import EmbeddingModel

        return self._resolve(model, self.rm, EmbeddingModel, "embedding model",
                             "rm=semex.EmbeddingModel(...)")

    def _resolve(self, model: Optional[Any], configured: Any, cls: type, what: str,
                 hint: str) -> Any:
        if model is not None and not isinstance(model, str):
            return model
        if model is None and configured is not None:
            return configured
        if model is None and not (os.environ.get("OPENAI_API_KEY")
                                  or os.environ.get("OPENAI_BASE_URL")):
            raise ConfigurationError(
                f"no {what}: pass model=semex.{cls.__name__}(...) or call "
                f"semex.settings.configure({hint}) first "
                "(or set OPENAI_API_KEY / OPENAI_BASE_URL)")
        # one object per class and name (None: from the environment), so a call that names
        # its model does not start a new engine every time
        key = (cls, model)
        with self._guard:
            built = self._built.get(key)
            if built is None:
                built = self._built[key] = cls(model) if model is not None else cls()
            return built


settings = Settings()
