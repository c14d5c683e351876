"""Decoding stock-event batches: one fast typed decode, and a thorough pass only on failure.

The fast path is a single msgspec call for the whole batch. When it fails, the batch is decoded
again event by event and field by field so the 422 lists *every* bad event and field, which is what
an integrator fixing a feed needs; the cost is only paid by invalid requests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Final, get_type_hints

import msgspec

from gateway.atp.schemas import (
    OCCURRED_AT_FLOOR,
    RawStockEventBatch,
    StockEvent,
    StockEventBatch,
)
from gateway.errors import ValidationFailed

_batch_decoder: Final = msgspec.json.Decoder(StockEventBatch)
_raw_batch_decoder: Final = msgspec.json.Decoder(RawStockEventBatch)
_event_decoder: Final = msgspec.json.Decoder(StockEvent)
_any_decoder: Final = msgspec.json.Decoder()
_timestamp_decoder: Final = msgspec.json.Decoder(datetime)
_FIELD_TYPES: Final = get_type_hints(StockEvent, include_extras=True)
_REQUIRED: Final = ("event_id", "type", "sku", "location", "quantity", "occurred_at")


DEFAULT_MAX_SKEW_SECONDS: Final = 300
_FLOOR_TEXT: Final = OCCURRED_AT_FLOOR.isoformat().replace("+00:00", "Z")


def latest_allowed(max_skew_seconds: int) -> datetime:
    """The latest ``occurred_at`` accepted now: the gateway's clock plus the allowed skew.

    Computed once per batch, not per event (measured: ~0.4 us, half of ``datetime.now`` plus
    a ``timedelta``; a tenth of a small event's decode)."""
    return datetime.fromtimestamp(time.time() + max_skew_seconds, UTC)


def semantic_errors(event: StockEvent, latest: datetime) -> list[dict[str, Any]]:
    """Rules msgspec constraints cannot express: offsets and bounds on timestamps (``latest``
    from :func:`latest_allowed`), signs per event type."""
    errors: list[dict[str, Any]] = []
    occurred_at = event.occurred_at
    if occurred_at.tzinfo is None:
        errors.append(_err("occurred_at", "must be an RFC 3339 timestamp with a UTC offset"))
    elif occurred_at > latest:
        # A feed's clock ahead by hours (or a typo of a year) would otherwise freeze the
        # position: every real snapshot after it would be older, hence stale.
        limit = latest.replace(microsecond=0).isoformat().replace("+00:00", "Z")
        errors.append(_err("occurred_at", f"must not be in the future beyond {limit}"))
    elif occurred_at < OCCURRED_AT_FLOOR:
        errors.append(_err("occurred_at", f"must not be before {_FLOOR_TEXT}"))
    if event.type == "snapshot" and event.quantity < 0:
        errors.append(_err("quantity", "a snapshot's quantity must be >= 0"))
    elif event.type == "adjustment" and event.quantity == 0:
        errors.append(_err("quantity", "an adjustment's quantity must not be 0"))
    return errors


@contextlib.contextmanager
def malformed_json_is_invalid() -> Iterator[None]:
    """Bad JSON, or JSON nested deeper than msgspec recurses, is a 422 like any bad field."""
    try:
        yield
    except (msgspec.DecodeError, RecursionError) as exc:
        raise malformed_json(exc) from None


def malformed_json(exc: msgspec.DecodeError | RecursionError) -> ValidationFailed:
    """The 422 for a body that is not JSON, or nests deeper than msgspec recurses."""
    if isinstance(exc, RecursionError):
        return ValidationFailed([_err("", "malformed JSON: nested too deeply")])
    return ValidationFailed([_err("", f"malformed JSON: {exc}")])


def decode_event(
    data: bytes | str,
    *,
    max_skew_seconds: int = DEFAULT_MAX_SKEW_SECONDS,
    latest: datetime | None = None,
) -> StockEvent:
    """Decode one event (a Kafka message value); raises ValidationFailed listing its errors.

    ``max_skew_seconds``: how far ``occurred_at`` may lie ahead of the gateway's clock.
    ``latest``: that bound itself, from :func:`latest_allowed`, for a caller decoding many
    records at once (read the clock once per batch, not once per record); when given,
    ``max_skew_seconds`` is not used."""
    if latest is None:
        latest = latest_allowed(max_skew_seconds)
    with malformed_json_is_invalid():
        try:
            event = _event_decoder.decode(data)
        except msgspec.ValidationError:
            raise ValidationFailed(_event_errors(data, latest)) from None
    errors = semantic_errors(event, latest)
    if errors:
        raise ValidationFailed(errors)
    return event


def decode_batch(
    body: bytes, *, max_skew_seconds: int = DEFAULT_MAX_SKEW_SECONDS
) -> list[StockEvent]:
    """Decode a ``{"events": [...]}`` body; on any error raise ValidationFailed listing them all.

    ``max_skew_seconds``: how far ``occurred_at`` may lie ahead of the gateway's clock."""
    latest = latest_allowed(max_skew_seconds)
    with malformed_json_is_invalid():
        try:
            events = _batch_decoder.decode(body).events
        except msgspec.ValidationError:
            raise ValidationFailed(_batch_errors(body, latest)) from None
    errors: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        errors.extend({"index": index, **e} for e in semantic_errors(event, latest))
    if errors:
        raise ValidationFailed(errors)
    return events


def _batch_errors(body: bytes, latest: datetime) -> list[dict[str, Any]]:
    try:
        raw = _raw_batch_decoder.decode(body)
    except msgspec.ValidationError as exc:
        return [_err(_path(exc, ""), _message(exc))]
    errors: list[dict[str, Any]] = []
    for index, item in enumerate(raw.events):
        errors.extend({"index": index, **e} for e in _event_errors(item, latest))
    return errors


def _event_errors(data: bytes | str | msgspec.Raw, latest: datetime) -> list[dict[str, Any]]:
    try:
        obj = _any_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return [_err("", f"malformed JSON: {exc}")]
    except RecursionError:
        return [_err("", "malformed JSON: nested too deeply")]
    if not isinstance(obj, dict):
        return [_err("", "each event must be a JSON object")]
    errors = [_err(name, "required field is missing") for name in _REQUIRED if name not in obj]
    for name, value in obj.items():
        field_type = _FIELD_TYPES.get(name)
        if field_type is None:
            errors.append(_err(name, "unknown field"))
            continue
        try:
            if name == "occurred_at":
                # Through JSON, as the fast path sees it: lax conversion takes epoch numbers.
                _timestamp_decoder.decode(msgspec.json.encode(value))
            else:
                msgspec.convert(value, field_type, strict=True)
        except msgspec.ValidationError as exc:
            errors.append(_err(name, _message(exc)))
    if not errors:
        # Every field is well typed on its own, so the only failures left are semantic.
        errors = semantic_errors(msgspec.convert(obj, StockEvent, strict=False), latest)
    return errors


def _err(field: str, message: str) -> dict[str, Any]:
    return {"field": field, "message": message}


def _message(exc: msgspec.ValidationError) -> str:
    return str(exc).split(" - at `", 1)[0]


def _path(exc: msgspec.ValidationError, default: str) -> str:
    text = str(exc)
    if " - at `" in text:
        return text.split(" - at `", 1)[1].rstrip("`").removeprefix("$.").removeprefix("$")
    return default


def parse_timestamp(value: datetime) -> int:
    """Microseconds since the epoch: the resolution the event rule compares at."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_EPOCH: Final = datetime.fromisoformat("1970-01-01T00:00:00+00:00")
