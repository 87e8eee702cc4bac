"""Failures an adapter reports, one class per kind a user must tell apart.

Each class carries a locale key (``error.<kind>``) for the short message shown
in the chat and an optional ``detail`` from upstream (secrets scrubbed before
it is shown). Adapters translate their SDK's exceptions into these, so the
streaming layer and the UI never see a provider's own exception types.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class: something went wrong talking to a model."""

    kind = "unknown"

    def __init__(self, detail: str = "", *, status: int | None = None):
        super().__init__(detail or self.kind)
        self.detail = detail
        self.status = status


class AuthenticationError(ModelError):
    kind = "auth"  # 401 / 403: bad or missing key


class NotFoundError(ModelError):
    kind = "not_found"  # 404: unknown model, deployment or path


class BadRequestError(ModelError):
    kind = "bad_request"  # 400: e.g. context too long, bad parameter


class RateLimitError(ModelError):
    kind = "rate_limit"  # 429

    def __init__(self, detail: str = "", *, status: int | None = 429, retry_after: float | None = None):
        super().__init__(detail, status=status)
        self.retry_after = retry_after


class ServerError(ModelError):
    kind = "server"  # 5xx


class UnreachableError(ModelError):
    kind = "unreachable"  # connection refused, DNS failure


class TimeoutError(ModelError):  # noqa: A001 - deliberate, namespaced by module
    kind = "timeout"


class InterruptedError(ModelError):  # noqa: A001
    kind = "interrupted"  # the stream was cut before its clean end


class ContentFilterError(ModelError):
    kind = "content_filter"


class NotAcceptableError(ModelError):
    kind = "not_acceptable"  # 406: a configuration problem (content negotiation)


class ModelLoadError(ModelError):
    kind = "model_load"  # a local model could not be loaded


def for_status(status: int, detail: str, retry_after: float | None = None) -> ModelError:
    """The error class for an HTTP status answered before any token."""
    if status in (401, 403):
        return AuthenticationError(detail, status=status)
    if status == 404:
        return NotFoundError(detail, status=status)
    if status == 406:
        return NotAcceptableError(detail, status=status)
    if status == 408:
        return TimeoutError(detail, status=status)
    if status == 429:
        return RateLimitError(detail, status=status, retry_after=retry_after)
    if status >= 500:
        return ServerError(detail, status=status)
    return BadRequestError(detail, status=status)


class ContextOverflowError(ModelError):
    """The question (with the system prompt) alone is longer than the model's context allows."""

    kind = "context_overflow"

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"{tokens} tokens > {limit}")
        self.tokens, self.limit = tokens, limit


class DocumentOverflowError(ContextOverflowError):
    """As ContextOverflowError, for a question with documents: ``largest`` (name, tokens) is the
    document that takes the most of it."""

    kind = "document_overflow"

    def __init__(self, tokens: int, limit: int, largest: tuple[str, int]):
        super().__init__(tokens, limit)
        self.largest = largest


class TimeLimitError(ModelError):
    """The reply ran longer than the app allows one to (``runs.max_seconds``) and was stopped."""

    kind = "time_limit"

    def __init__(self, seconds: float):
        super().__init__(f"longer than {seconds:g} s")
        self.seconds = seconds
