"""The gateway's one exception tree; the HTTP layer maps it to RFC 9457 problems.

GatewayError                  (500 internal_error)
├── BadRequest                (400 bad_request)
│   ├── BadEncoding           (400 bad_encoding: a Content-Encoding the body does not match)
│   └── ValidationFailed      (422 validation_error, carries each failing field)
├── Unauthorized              (401 unauthorized)
├── Forbidden                 (403 forbidden)
├── NotFound                  (404 not_found)
├── RequestTimeout            (408 request_timeout: the body did not arrive in time)
├── PayloadTooLarge           (413 payload_too_large)
├── UnsupportedMediaType      (415 unsupported_media_type)
├── ClientGone                (499, never sent: the client hung up; counted, not logged as error)
└── Unavailable               (503 …, retriable)
    ├── Overloaded            (503 overloaded)
    ├── ShuttingDown          (503 shutting_down)
    ├── DependencyDown        (503 dependency_unavailable: nothing was applied)
    │   └── ConfigNotCopied   (Redis lost the location config; the copy is not back yet)
    └── OutcomeUnknown        (503 outcome_unknown: a write was sent and not answered; it may
                               have been applied. Safe to retry with the same ids.)
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

# Seconds a client is told to wait (``Retry-After``) before retrying a retriable 503.
RETRY_AFTER: Final = 1


class GatewayError(Exception):
    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"
    retriable: ClassVar[bool] = False

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class BadRequest(GatewayError):
    http_status = 400
    code = "bad_request"
    title = "Bad request"


class BadEncoding(BadRequest):
    code = "bad_encoding"
    title = "Body does not match its Content-Encoding"


class ValidationFailed(BadRequest):
    http_status = 422
    code = "validation_error"
    title = "Request failed validation"

    def __init__(self, errors: list[dict[str, Any]], detail: str | None = None) -> None:
        n = len(errors)
        super().__init__(detail or f"{n} invalid field{'s' if n != 1 else ''}", errors=errors)
        self.errors = errors


class Unauthorized(GatewayError):
    http_status = 401
    code = "unauthorized"
    title = "Missing or unknown API key"


class Forbidden(GatewayError):
    http_status = 403
    code = "forbidden"
    title = "API key lacks the role for this endpoint"


class NotFound(GatewayError):
    http_status = 404
    code = "not_found"
    title = "Not found"


class Conflict(GatewayError):
    """409 with a code of the caller's choosing (idempotency_conflict, already_confirmed, ...)."""

    http_status = 409
    title = "Conflict"

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.code = code  # type: ignore[misc]


class InsufficientStock(GatewayError):
    http_status = 409
    code = "insufficient_stock"
    title = "Not enough stock for every line"


class RequestTimeout(GatewayError):
    http_status = 408
    code = "request_timeout"
    title = "Request body not received in time"


class UnsupportedMediaType(GatewayError):
    http_status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class ClientGone(GatewayError):
    """The client disconnected before its request was read or answered. 499 (nginx's "client
    closed request") is only a metrics label: no response reaches anyone."""

    http_status = 499
    code = "client_closed_request"
    title = "Client closed request"


class PayloadTooLarge(GatewayError):
    http_status = 413
    code = "payload_too_large"
    title = "Request body too large"


class Unavailable(GatewayError):
    http_status = 503
    code = "unavailable"
    title = "Service unavailable"
    retriable = True


class Overloaded(Unavailable):
    code = "overloaded"
    title = "Gateway overloaded"


class ShuttingDown(Unavailable):
    code = "shutting_down"
    title = "Gateway is shutting down"


class BufferFull(Unavailable):
    """The order buffer is past its depth or age limit: the order was not taken, the hold stays
    in place, and ``Retry-After`` estimates when the drain makes room."""

    code = "buffer_full"
    title = "The order buffer is full"


class DependencyDown(Unavailable):
    code = "dependency_unavailable"
    title = "A dependency is unavailable"


class OutcomeUnknown(Unavailable):
    """A write reached the dependency (or may have) and no answer came back: it may have been
    applied. Distinct from :class:`DependencyDown`, where nothing was applied. Retrying with the
    same ``reservation_id`` / ``event_id`` is safe and answers the true outcome."""

    code = "outcome_unknown"
    title = "The outcome of the request is unknown"


class ConfigNotCopied(DependencyDown):
    """Redis has lost the location config and the copy from PostgreSQL is not back yet (within
    about a second): "no such group" would be a guess, so the answer is a retriable 503."""

    def __init__(
        self,
        detail: str = "the location config is being copied back to Redis; retry shortly",
        **extra: Any,
    ) -> None:
        # The same signature as every other error, so code that copies errors can copy it.
        super().__init__(detail, **{"dependency": "redis", "retry_after": RETRY_AFTER, **extra})
