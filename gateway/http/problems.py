"""RFC 9457 problem responses (``application/problem+json``) with a stable ``code``."""

from __future__ import annotations

from typing import Any, Final

import orjson
from aiohttp import web

from gateway.errors import GatewayError

CONTENT_TYPE: Final = "application/problem+json"
TYPE_BASE: Final = "https://atp-gateway.dev/problems/"

# aiohttp's own HTTP errors (no route, wrong method, body too large, requests its parser
# refused) as stable codes.
_HTTP_CODES: Final = {
    400: ("bad_request", "Bad request"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    408: ("request_timeout", "Request timeout"),
    413: ("payload_too_large", "Request body too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    500: ("internal_error", "Internal error"),
}


# Where a problem response carries its code for whoever counts it (aiohttp responses hold state).
PROBLEM_CODE: Final = web.ResponseKey("problem_code", str)


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body = _body(status, code, title, detail, request_id)
    body.update(extra)
    return _respond(status, body, headers)


def from_error(exc: GatewayError, request_id: str | None) -> web.Response:
    # Built directly, not through problem_response's keywords: a refused reservation (the
    # flash-sale answer) comes through here on every request.
    body = _body(exc.http_status, exc.code, exc.title, exc.detail, request_id)
    headers = None
    for key, value in exc.extra.items():
        header = _HEADER_EXTRAS.get(key)
        if header is None:
            body[key] = value
        elif headers is None:
            headers = {header: str(value)}
        else:
            headers[header] = str(value)
    return _respond(exc.http_status, body, headers)


# Extras of an error that are response headers, not members of the body.
_HEADER_EXTRAS: Final = {"retry_after": "Retry-After", "accept_encoding": "Accept-Encoding"}


def _body(
    status: int, code: str, title: str, detail: str, request_id: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if request_id:
        body["request_id"] = request_id
    return body


def _respond(status: int, body: dict[str, Any], headers: dict[str, str] | None) -> web.Response:
    response = web.Response(
        status=status, body=orjson.dumps(body), content_type=CONTENT_TYPE, headers=headers
    )
    response[PROBLEM_CODE] = body["code"]  # for the metrics: errors by code, without parsing
    return response


def for_status(
    status: int, detail: str, request_id: str | None, *, code: str | None = None
) -> web.Response:
    """A problem for a bare HTTP status (and optionally a more precise code than its own)."""
    default_code, title = _HTTP_CODES.get(status, ("http_error", "HTTP error"))
    return problem_response(status, code or default_code, title, detail, request_id=request_id)


def from_http_exception(exc: web.HTTPException, request_id: str | None) -> web.Response:
    code, title = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    detail = exc.text or exc.reason
    if exc.status == 413:
        detail = "the request body is larger than 1 MiB"
    return problem_response(exc.status, code, title, detail, request_id=request_id, headers=headers)
