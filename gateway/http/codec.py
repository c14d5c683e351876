"""JSON in and out of handlers: msgspec encoders/decoders built once, errors as problems.

What a body must be (the OpenAPI document says the same):

- **Content-Type** ``application/json`` or ``application/<anything>+json``, parameters allowed;
  a ``charset``, if given, must be UTF-8 (RFC 8259: JSON is UTF-8). No Content-Type at all is
  taken as JSON: RFC 9110 (8.3) lets a recipient decide, and the API takes nothing else, so
  only a client that *declares* another type (``curl -d`` sends a form type) is refused, with
  415 ``unsupported_media_type``, before anything is read or changed.
- **Content-Encoding** absent, ``identity``, ``gzip`` (one member) or ``deflate`` (the zlib
  format, RFC 9110 8.4.1.2), decoded here to at most ``MAX_BODY`` bytes. A body that is not what
  its encoding says is 400 ``bad_encoding``; any other coding is 415 with ``Accept-Encoding``.
  aiohttp's own decompression is switched off (``gateway.http.wire.HANDLER_ARGS``): it raised
  its errors past the handler, or before routing for some codings.
- **Within ``GATEWAY_BODY_TIMEOUT_SECONDS``**: a body still arriving then is 408
  ``request_timeout`` and the connection is closed (see the guard). A client that hangs up
  mid-body is :class:`ClientGone` (499 in the metrics), not a server error.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import hdrs, web

from gateway.atp.validation import malformed_json
from gateway.errors import (
    BadEncoding,
    BadRequest,
    ClientGone,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    ValidationFailed,
)
from gateway.http.state import SETTINGS

T = TypeVar("T")
# Every body the API takes (1,000 events, 100 reservation lines) fits with room to spare.
MAX_BODY: Final = 1024 * 1024
JSON: Final = "application/json"
ACCEPTED_ENCODINGS: Final = "gzip, deflate"
# zlib's wbits per content coding: 16 + 15 reads the gzip format only, 15 the zlib format only.
_WBITS: Final = {"gzip": 31, "x-gzip": 31, "deflate": 15}
_encoder: Final = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(value), status=status, content_type=JSON)


async def read_body(request: web.Request) -> bytes:
    """The request body as JSON bytes: type checked, decoded, at most ``MAX_BODY`` bytes.

    A storefront's body arrives with its headers, so it is usually whole in the buffer when the
    handler starts: it is taken from there without the awaits (and the deadline) of the slow
    path. The header checks are plain lookups and a string compare for the usual values.
    """
    headers = request.headers
    content_type = headers.get(hdrs.CONTENT_TYPE)
    if content_type is not None and content_type != JSON and not is_json(content_type):
        raise UnsupportedMediaType(
            f"the body must be JSON (Content-Type {JSON}), not {content_type[:100]!r}"
        )
    content = request.content
    try:
        if content.is_eof():
            body = content.read_nowait()
        else:
            body = await _read_within_deadline(request)
    except ConnectionError:
        # The payload carries the error aiohttp set when the connection was lost.
        raise ClientGone("the client closed the connection before its body arrived") from None
    except web.RequestPayloadError as exc:
        raise BadRequest(f"malformed request body: {str(exc)[:200]}") from None
    if len(body) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(body))
    if hdrs.CONTENT_ENCODING in headers:
        body = _decoded(headers[hdrs.CONTENT_ENCODING], body)
    return body


async def _read_within_deadline(request: web.Request) -> bytes:
    timeout = request.app[SETTINGS].body_timeout_seconds
    try:
        async with asyncio.timeout(timeout):
            return await request.read()  # aiohttp reads it, within client_max_size (413)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None


@functools.lru_cache(maxsize=64)
def is_json(content_type: str) -> bool:
    """Whether a Content-Type names JSON (see the module's docstring); cached: clients repeat."""
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if media != JSON and not (media.startswith("application/") and media.endswith("+json")):
        return False
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in {
            "utf-8",
            "utf8",
        }:
            return False
    return True


def _decoded(coding: str, body: bytes) -> bytes:
    name = coding.strip().lower()
    if name in {"", "identity"}:
        return body
    wbits = _WBITS.get(name)
    if wbits is None:
        raise UnsupportedMediaType(
            f"Content-Encoding {coding[:40]!r} is not supported; use {ACCEPTED_ENCODINGS}",
            accept_encoding=ACCEPTED_ENCODINGS,
        )
    inflater = zlib.decompressobj(wbits)
    try:
        # Bounded: a small compressed body may inflate to gigabytes.
        data = inflater.decompress(body, MAX_BODY + 1)
    except zlib.error:
        raise BadEncoding(f"the body is not {name} data, as its Content-Encoding says") from None
    if len(data) > MAX_BODY:
        raise PayloadTooLarge("the decompressed request body is larger than 1 MiB")
    if not inflater.eof or inflater.unused_data:
        raise BadEncoding(f"the body is not one complete {name} stream")
    return data


async def read_json(request: web.Request, schema: type[T]) -> T:
    """Read and validate a body; a failure names the path of the field (msgspec's own)."""
    body = await read_body(request)
    decoder = _decoders.get(schema)
    if decoder is None:
        decoder = _decoders[schema] = msgspec.json.Decoder(schema)
    try:
        return decoder.decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).partition(" - at `")
        field = path.rstrip("`").removeprefix("$").removeprefix(".")
        raise ValidationFailed([{"field": field, "message": message}]) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise malformed_json(exc) from None
