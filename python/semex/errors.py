"""Exceptions raised by semex, and the typed error objects that failed items carry.

A failed item never comes back as a string that could pass for an answer: it is an instance
of one of these classes, with the item's index, the HTTP status and the number of attempts.
Messages never contain API keys or request headers.
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "SemexError",
    "ConfigurationError",
    "RequestError",
    "APIStatusError",
    "AuthenticationError",
    "QuotaExceededError",
    "RateLimitError",
    "ServerError",
    "RequestTimeoutError",
    "APIConnectionError",
    "ResponseTooLargeError",
    "AbortedError",
    "RequestCancelledError",
    "TransportError",
    "ResponseFormatError",
    "BatchError",
]


class SemexError(Exception):
    """Base class of every semex exception."""


class ConfigurationError(SemexError, ValueError):
    """A parameter or input is wrong; raised before any request is sent."""


class RequestError(SemexError):
    """One request failed in the end (after any retries).

    Attributes: ``index`` (position of the item in the input), ``status`` (last HTTP status,
    0 if none), ``attempts``, ``body`` (the provider's error text, when it sent one).
    """

    def __init__(self, message: str, *, index: int = -1, status: int = 0, attempts: int = 0,
                 body: Optional[str] = None):
        super().__init__(message)
        self.index = index
        self.status = status
        self.attempts = attempts
        self.body = body

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), str(self), self.index, self.status, self.attempts,
                           self.body))


def _rebuild(cls, message, index, status, attempts, body):
    return cls(message, index=index, status=status, attempts=attempts, body=body)


class APIStatusError(RequestError):
    """The provider answered with an HTTP status that is not retried (e.g. 400, 404, 422)."""


class AuthenticationError(APIStatusError):
    """401/403: the API key is missing, wrong, or lacks permission. Stops the whole batch."""


class QuotaExceededError(APIStatusError):
    """429 insufficient_quota: the account is out of credit. Stops the whole batch."""


class RateLimitError(APIStatusError):
    """429 rate limits persisted through every retry."""


class ServerError(APIStatusError):
    """408/409/5xx persisted through every retry."""


class RequestTimeoutError(RequestError):
    """The request timed out on every attempt."""


class APIConnectionError(RequestError):
    """The connection failed, was dropped, or the response was cut short, on every attempt."""


class ResponseTooLargeError(RequestError):
    """The response body exceeded the configured cap (``max_response_bytes``)."""


class AbortedError(RequestError):
    """Not completed because another request of the same call hit an authentication or
    quota error, which stops the call at once rather than burning retries."""


class RequestCancelledError(RequestError):
    """Cancelled: the awaiting task was cancelled, Ctrl-C was pressed, or the engine closed."""


class TransportError(RequestError):
    """A local error retrying cannot fix (malformed URL, TLS verification failure, ...)."""


class ResponseFormatError(RequestError):
    """The provider answered 200 but the response could not be read (not JSON, no choices,
    no message content)."""


class BatchError(SemexError):
    """Raised after a run when items failed and the caller asked for exceptions.

    ``results`` holds the full partial result (nothing computed is lost) and ``errors`` the
    per-item errors (``None`` for items that succeeded)."""

    def __init__(self, message: str, *, results: Any = None, errors: Any = None):
        super().__init__(message)
        self.results = results
        self.errors = errors
