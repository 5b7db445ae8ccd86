"""Process-wide defaults: ``semex.settings.configure(lm=semex.LM(...))`` (as in LOTUS)."""
from __future__ import annotations

import os
import threading
from typing import Any, Optional

from .errors import ConfigurationError

__all__ = ["Settings", "settings"]


class Settings:
    """Defaults used when a call does not name them.

    lm: the default model for llm_batch, parallel_query and sem_extract.
    """

    _fields = ("lm",)

    def __init__(self) -> None:
        self.lm: Any = None
        self._env_lm: Any = None
        self._guard = threading.Lock()

    def configure(self, **options: Any) -> None:
        """Set defaults, e.g. ``configure(lm=LM("gpt-4o-mini"))``."""
        for name, value in options.items():
            if name not in self._fields:
                raise ConfigurationError(
                    f"unknown setting {name!r}; known settings: {', '.join(self._fields)}")
            setattr(self, name, value)

    def __repr__(self) -> str:
        return f"Settings(lm={self.lm!r})"

    def resolve_lm(self, model: Optional[Any]) -> Any:
        """The model a call should use: the one given, else the configured default, else an
        LM built from OPENAI_BASE_URL / OPENAI_API_KEY / SEMEX_MODEL when those are set."""
        from .lm import LM  # import here: lm imports settings' siblings

        if model is not None:
            if isinstance(model, str):
                return LM(model)
            return model
        if self.lm is not None:
            return self.lm
        if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
            with self._guard:
                if self._env_lm is None:
                    self._env_lm = LM()
                return self._env_lm
        raise ConfigurationError(
            "no model: pass model=semex.LM(...) or call "
            "semex.settings.configure(lm=semex.LM(...)) first "
            "(or set OPENAI_API_KEY / OPENAI_BASE_URL)")


settings = Settings()
