"""JSON in and out of handlers: msgspec encoders/decoders built once, errors as 422 problems."""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from gateway.atp.validation import malformed_json
from gateway.errors import ValidationFailed

T = TypeVar("T")
# Every body the API takes (1,000 events, 100 reservation lines) fits with room to spare.
MAX_BODY: Final = 1024 * 1024
_encoder: Final = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(value), status=status, content_type="application/json")


async def read_body(request: web.Request) -> bytes:
    """The request body, at most ``MAX_BODY`` bytes (413 beyond).

    A storefront's body arrives with its headers, so it is usually whole in the buffer when the
    handler starts: it is taken from there without the two awaits of ``request.read()``.
    """
    content = request.content
    if not content.is_eof():
        return await request.read()  # still arriving: aiohttp reads it, within client_max_size
    body = content.read_nowait()
    if len(body) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(body))
    return body


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
