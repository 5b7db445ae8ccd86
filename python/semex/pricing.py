"""Built-in prices, so ``usage.cost`` shows without typing prices.

Prices are US dollars per million tokens (input, output), as the providers list them for
standard (non-batch, non-cached) requests. They change: the table says what it knew on
``PRICES_AS_OF``; ``LM(input_price_per_million=..., output_price_per_million=...)`` overrides
them for one model object, :func:`set_price` for every LM of that model name in the process.

A model name matches its entry exactly or as a dated/suffixed variant of it
(``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``; the longest matching entry wins, so
``gpt-4o-mini`` is not priced as ``gpt-4o``). Names of local or unknown models have no price
and their cost stays None.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

from .errors import ConfigurationError

__all__ = ["PRICES_AS_OF", "price_for", "set_price"]

PRICES_AS_OF = "2025-08"

# model -> (input $/1M tokens, output $/1M tokens)
_BUILTIN: Dict[str, Tuple[float, float]] = {
    # OpenAI
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o1": (15.00, 60.00),
    "o1-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
    "text-embedding-ada-002": (0.10, 0.0),
    # Anthropic
    "claude-opus-4": (15.00, 75.00),
    "claude-opus-4-1": (15.00, 75.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-3-5-sonnet": (3.00, 15.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-opus": (15.00, 75.00),
    "claude-3-haiku": (0.25, 1.25),
    # Google Gemini
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.0-flash-lite": (0.075, 0.30),
    "gemini-1.5-pro": (1.25, 5.00),
    "gemini-1.5-flash": (0.075, 0.30),
    "text-embedding-004": (0.0, 0.0),
}

_overrides: Dict[str, Tuple[float, float]] = {}
_lock = threading.Lock()


def set_price(model: str, input_per_million: float, output_per_million: float) -> None:
    """Price ``model`` (and its dated variants) for every LM in this process."""
    if not isinstance(model, str) or not model:
        raise ConfigurationError(f"model must be a non-empty str, got {model!r}")
    for name, value in (("input_per_million", input_per_million),
                        ("output_per_million", output_per_million)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigurationError(f"{name} must be a number >= 0, got {value!r}")
    with _lock:
        _overrides[model.lower()] = (float(input_per_million), float(output_per_million))


def price_for(model: Optional[str]) -> Optional[Tuple[float, float]]:
    """(input, output) dollars per million tokens for ``model``, or None if unknown."""
    if not isinstance(model, str) or not model:
        return None
    name = model.lower().rsplit("/", 1)[-1]  # "openai/gpt-4o" or an Azure-style path
    best: Optional[Tuple[float, float]] = None
    best_len = -1
    with _lock:
        # the longest matching name wins; on a tie an override beats the built-in table
        for table, tie in ((_BUILTIN, False), (_overrides, True)):
            for key, price in table.items():
                longer = len(key) > best_len or (tie and len(key) == best_len)
                if longer and (name == key or (name.startswith(key)
                                               and name[len(key)] in "-@:.")):
                    best, best_len = price, len(key)
    return best
