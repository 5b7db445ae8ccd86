"""Exceptions raised by semex, the typed error objects that failed items carry, and the one
place that decides how a failed item looks to the caller.

Every failure is one of the ``RequestError`` classes below, with the item's index, the HTTP
status and the number of attempts. How it is handed back is the caller's choice
(``errors=``), decided by :func:`shape_results` for every list-returning entry point:

- ``"text"`` (default for ``llm_batch``/``parallel_query`` and the query helpers): an
  :class:`ErrorText`, a ``str`` whose text is ``"Error: <message>"`` and whose ``.error`` is
  the typed exception, so code written against ``List[str]`` (``"\n".join(results)``,
  ``if "Error:" in r``) keeps working and ``isinstance(r, ErrorText)`` tells failures apart;
- ``"objects"``: the exception instance itself in the item's place;
- ``"raise"``: one :class:`BatchError` after the run, carrying every result computed.

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
    "ContentBlockedError",
    "InputTooLargeError",
    "BatchError",
    "BatchJobError",
    "BatchSubmitted",
    "ErrorText",
    "PartialFailureWarning",
    "UnknownParameterError",
    "shape_results",
]


class SemexError(Exception):
    """Base class of every semex exception."""


class ConfigurationError(SemexError, ValueError):
    """A parameter or input is wrong; raised before any request is sent."""


class UnknownParameterError(ConfigurationError, TypeError):
    """A keyword the function does not take (the message suggests the closest name)."""


class PartialFailureWarning(UserWarning):
    """Some items of a call failed; the result holds their errors (shown once per call site
    by Python's default warning filter)."""


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


class ContentBlockedError(RequestError):
    """The provider answered but withheld the content: Gemini's finishReason SAFETY,
    RECITATION, ... or a prompt blocked outright (promptFeedback.blockReason), Anthropic's
    stop_reason "refusal". Not retried (the same prompt is blocked again)."""


class InputTooLargeError(RequestError):
    """An input is estimated above the model's per-input limit: not sent (embeddings'
    ``max_input_tokens``); split it into smaller chunks."""


class BatchJobError(RequestError):
    """``mode="batch"``: the provider's batch did not answer this request (it expired, was
    cancelled or failed validation, or the line carries an error). Running the same call
    again sends the requests that were not answered in a new batch."""


class BatchSubmitted(SemexError):
    """``BatchMode(wait=False)``: the batches were created and are running at the provider;
    ``batch_ids`` names them. Run the same call again later to collect the answers."""

    def __init__(self, batch_ids: Any):
        self.batch_ids = list(batch_ids)
        super().__init__(f"{len(self.batch_ids)} batch(es) submitted and running at the "
                         f"provider: {', '.join(self.batch_ids)}; run the same call again "
                         "to collect the answers (or see `semex batch status`)")

    def __reduce__(self):
        return (type(self), (self.batch_ids,))


class BatchError(SemexError):
    """Raised after a run when items failed and the caller asked for exceptions.

    ``results`` holds the full partial result (nothing computed is lost) and ``errors`` the
    per-item errors (``None`` for items that succeeded)."""

    def __init__(self, message: str, *, results: Any = None, errors: Any = None):
        super().__init__(message)
        self.results = results
        self.errors = errors


class ErrorText(str):
    """A failed item in a list of answers: the text ``"Error: <message>"`` with the typed
    exception in ``.error`` (also ``.index``, ``.status``).

    It is a ``str``, so joins, ``"Error:" in r`` and a later stage's input checks accept it;
    ``isinstance(r, semex.ErrorText)`` (or ``r.error``) tells it from an answer. A later
    ``llm_batch``/``parallel_query`` given one passes it through unsent by default."""

    error: "RequestError"

    def __new__(cls, error: "RequestError") -> "ErrorText":
        text = super().__new__(cls, f"Error: {error}")
        text.error = error
        return text

    @property
    def index(self) -> int:
        return getattr(self.error, "index", -1)

    @property
    def status(self) -> int:
        return getattr(self.error, "status", 0)

    def __reduce__(self) -> Any:
        return (ErrorText, (self.error,))


ERROR_SHAPES = ("text", "objects", "raise")


def check_error_shape(errors: Any) -> None:
    if errors not in ERROR_SHAPES:
        raise ConfigurationError(
            f"errors must be 'text' (failed items as ErrorText \"Error: ...\" strings), "
            f"'objects' (the exception instances) or 'raise' (one BatchError after the run), "
            f"got {errors!r}")


def shape_results(outputs: Any, failures: Any, errors: str, results: Any = None) -> Any:
    """The one place that turns (answers, per-item errors) into what the caller asked for.

    ``outputs[i]`` is the answer or None, ``failures[i]`` None or the item's typed error.
    Returns ``results`` (a list, created when None) filled in place: answers, and failed
    items as ``ErrorText`` ("text") or the exception ("objects"); with "raise" it raises
    ``BatchError`` when anything failed, its ``.results`` holding the "text"-shaped list."""
    if results is None:
        results = []
    if failures.count(None) == len(failures):  # nothing failed: the answers as they are
        results.extend(outputs)
        return results
    text = errors != "objects"
    first = None
    failed = 0
    for answer, error in zip(outputs, failures):
        if error is None:
            results.append(answer)
            continue
        failed += 1
        if first is None:
            first = error
        results.append(ErrorText(error) if text else error)
    if errors == "raise" and failed:
        raise BatchError(f"{failed} of {len(results)} items failed; first: {first}. "
                         "The exception's .results holds every answer computed.",
                         results=results, errors=list(failures))
    return results


def check_keywords(where: str, given: Any, known: Any) -> None:
    """Raise UnknownParameterError for keywords in ``given`` that are not ``known``,
    suggesting the closest known name."""
    if not given:
        return
    import difflib

    name = next(iter(given))
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownParameterError(f"{where} got an unexpected keyword argument {name!r}{hint}")


# Failures no row could have escaped: every row failing with one of these means the call
# itself is misconfigured or cut off (key, quota, server down, DNS, TLS), so it is raised
# rather than returned as a result made only of errors.
_CALL_LEVEL = (AuthenticationError, QuotaExceededError, AbortedError, APIConnectionError,
               TransportError)


def call_level_failure(errors: Any) -> Optional[RequestError]:
    """The cause when every item failed with call-level errors of one kind, else None."""
    cause = None
    for error in errors:
        if error is None or not isinstance(error, _CALL_LEVEL):
            return None
        if isinstance(error, AbortedError):
            continue  # stopped because another item hit the cause
        if cause is None:
            cause = error
        elif type(error) is not type(cause):
            return None
    return cause


def warn_partial(message: str) -> None:
    """One visible warning for a call where some items failed, attributed to the first
    caller outside semex (stacklevel k names the frame k-1 levels above this one)."""
    import sys
    import warnings

    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
            "semex", "asyncio"):
        level += 1
        frame = frame.f_back
    warnings.warn(message, PartialFailureWarning, stacklevel=level)
