"""Register ``df.sem_extract`` without importing pandas ourselves.

pandas costs ~100 MB of RSS and ~0.5 s of import time; ``llm_batch`` users never need it. If
pandas is already imported, the accessor is registered now. Otherwise a one-shot finder on
``sys.meta_path`` waits for ``import pandas`` and registers the accessor right after pandas'
own module body has run (so ``import semex; import pandas as pd; pd.DataFrame(...).sem_extract``
works in either order). The finder never loads anything itself: it asks the remaining finders
for pandas' spec and wraps that spec's ``exec_module``; for any other name it answers None.
"""
from __future__ import annotations

import importlib
import logging
import sys
import threading
from typing import Any, Optional

_log = logging.getLogger("semex")
_lock = threading.Lock()
_registered = False


def _register_now() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    importlib.import_module("semex.accessor")
    importlib.import_module("semex.retrieval")._register()  # df.sem_index, df.sem_search


class _PandasImportHook:
    """A meta-path finder that only watches for the top-level ``pandas`` package."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[Any]:
        if fullname != "pandas":
            return None
        _remove_hook()
        for finder in sys.meta_path:  # the rest of the chain, without us
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:  # a legacy loader: register on first use instead
            return spec

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            try:
                _register_now()
            except Exception:  # noqa: BLE001 - never break the user's `import pandas`
                _log.exception("semex: could not register the DataFrame accessor")

        try:
            loader.exec_module = exec_then_register  # this spec's loader instance only
        except (AttributeError, TypeError):
            return spec
        return spec


_hook: Optional[_PandasImportHook] = None


def _remove_hook() -> None:
    global _hook
    with _lock:
        if _hook is not None:
            try:
                sys.meta_path.remove(_hook)
            except ValueError:
                pass
            _hook = None


def register_accessor_with_pandas() -> None:
    """Register the accessor now if pandas is loaded, else as soon as it is."""
    global _hook
    if "pandas" in sys.modules:
        _register_now()
        return
    with _lock:
        if _hook is None:
            _hook = _PandasImportHook()
            sys.meta_path.insert(0, _hook)
