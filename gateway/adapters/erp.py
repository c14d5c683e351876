"""The ERP over HTTP: one POST per order, answered as an :class:`gateway.ports.ErpReply`.

Never raises for what the ERP or the network did: a timeout, a refused or cut connection is
status 0 with the reason, so the writer decides every case in one place.
"""

from __future__ import annotations

import email.utils
import time
from datetime import UTC, datetime

import msgspec
from yarl import URL

from gateway.adapters.http_client import OriginClient
from gateway.ports import ErpReply


class _Accepted(msgspec.Struct):
    erp_order_id: str | None = None
    accepted_at: str | None = None


_DECODER = msgspec.json.Decoder(_Accepted)


class HttpErpClient:
    def __init__(self, base_url: str, timeout_seconds: float) -> None:
        url = URL(base_url.rstrip("/") + "/orders")
        self._origin = str(url.origin())
        self._path = url.raw_path_qs
        self._timeout = timeout_seconds
        self._client: OriginClient | None = None

    async def start(self) -> None:
        self._client = OriginClient(self._origin)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def send(self, order_id: str, body: bytes) -> ErpReply:
        assert self._client is not None, "start() first"
        headers = {"Idempotency-Key": order_id, "Content-Type": "application/json"}
        started = time.monotonic()
        try:
            answer = await self._client.post(self._path, headers, body, self._timeout)
        except (TimeoutError, OSError) as exc:
            return ErpReply(0, None, None, None, f"{type(exc).__name__}: {exc}", _since(started))
        seconds = _since(started)
        status = answer.status
        if status in (200, 201, 409):
            try:
                accepted = _DECODER.decode(answer.body)
            except msgspec.DecodeError:
                accepted = _Accepted()
            return ErpReply(
                status, accepted.erp_order_id, _when(accepted.accepted_at), None, "", seconds
            )
        text = answer.body[:500].decode(errors="replace")
        retry_after = _retry_after(answer.headers.get("retry-after"))
        return ErpReply(status, None, None, retry_after, f"ERP answered {status}: {text}", seconds)


def _since(started: float) -> float:
    return time.monotonic() - started


def _retry_after(value: str | None) -> float | None:
    """Seconds, or an HTTP date (RFC 9110 allows both), bounded to five minutes."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, min(seconds, 300.0))


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
