"""The progress bar: tqdm.auto (a widget in notebooks, text in terminals), per document."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional


class ProgressBar:
    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "doc"):
        self.n = 0
        self.total = total
        self._bar: Any = None
        self._started = time.monotonic()
        self._last_postfix = 0.0
        if enabled and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def advance(self, k: int) -> None:
        if k:
            self.update_to(self.n + k)

    def update_to(self, n: int, stats: Optional[Dict[str, Any]] = None) -> None:
        n = max(self.n, min(self.total, n))
        if self._bar is not None:
            if n > self.n:
                self._bar.update(n - self.n)
            now = time.monotonic()
            if stats and now - self._last_postfix >= 0.5:
                self._postfix(stats, now)
        self.n = n

    def _postfix(self, stats: Dict[str, Any], now: float) -> None:
        self._last_postfix = now
        elapsed = max(1e-9, now - self._started)
        rate = stats.get("admitted", 0) / elapsed
        postfix = {"req/s": f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"}
        if stats.get("tokens"):  # known once a window of answers has been read
            postfix["tokens"] = stats["tokens"]
        postfix.update(retries=stats.get("retries", 0), **{"429s": stats.get("http_429", 0)},
                       errors=stats.get("errors", 0))
        if stats.get("timeouts"):
            postfix["timeouts"] = stats["timeouts"]
        self._bar.set_postfix(postfix, refresh=False)

    def close(self, stats: Optional[Dict[str, Any]] = None) -> None:
        """End the bar; with ``stats``, its last figures first (a run shorter than the
        refresh interval would otherwise end showing none: errors=0, req/s=0)."""
        if self._bar is not None:
            if stats:
                self._postfix(stats, time.monotonic())
                self._bar.refresh()
            self._bar.close()
            self._bar = None


def progress_reporter(progress: Any, total: int, desc: str, *, default: bool = False,
                      unit: str = "item") -> "tuple[Optional[Callable[[int, int], None]], Callable[[], None]]":
    """One meaning of ``progress=`` everywhere: True shows a tqdm bar, False (or None, when
    ``default`` is False) shows nothing, a callable is called as ``progress(done, total)``.

    Returns (callback or None, close); close() ends the bar and is safe to call twice."""
    from .errors import ConfigurationError

    if progress is None:
        progress = default
    if callable(progress) and not isinstance(progress, bool):
        return progress, _nothing
    if progress is True:
        bar = ProgressBar(total, desc, unit=unit)

        def advance(done: int, _total: int) -> None:
            bar.update_to(done)
        return advance, bar.close
    if progress is False:
        return None, _nothing
    raise ConfigurationError(
        "progress must be True (a progress bar), False (none) or a callable "
        f"progress(done, total); got {type(progress).__name__}")


def _nothing() -> None:
    pass
