"""JSON in and out of handlers: msgspec encoders/decoders built once, errors as 422 problems."""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from gateway.atp.validation import malformed_json_is_invalid
from gateway.errors import ValidationFailed

T = TypeVar("T")
_encoder: Final = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(value), status=status, content_type="application/json")


async def read_json(request: web.Request, schema: type[T]) -> T:
    """Read and validate a body; a failure names the path of the field (msgspec's own)."""
    body = await request.read()
    decoder = _decoders.get(schema)
    if decoder is None:
        decoder = _decoders[schema] = msgspec.json.Decoder(schema)
    with malformed_json_is_invalid():
        try:
            return decoder.decode(body)  # type: ignore[no-any-return]
        except msgspec.ValidationError as exc:
            message, _, path = str(exc).partition(" - at `")
            field = path.rstrip("`").removeprefix("$").removeprefix(".")
            raise ValidationFailed([{"field": field, "message": message}]) from None
