"""The ERP over HTTP: one POST per order, answered as an :class:`gateway.ports.ErpReply`.

Never raises for what the ERP or the network did: a timeout, a refused or cut connection is
status 0 with the reason, so the writer decides every case in one place.
"""

from __future__ import annotations

import time
from datetime import datetime

import aiohttp
import msgspec
from yarl import URL

from gateway.ports import ErpReply


class _Accepted(msgspec.Struct):
    erp_order_id: str | None = None
    accepted_at: str | None = None


_DECODER = msgspec.json.Decoder(_Accepted)


class HttpErpClient:
    def __init__(self, base_url: str, timeout_seconds: float) -> None:
        # Parsed once: a str would be parsed into a URL on every call.
        self._url = URL(base_url.rstrip("/") + "/orders")
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(limit=0),
            # The ERP's cookies mean nothing here; the default jar filters them on every call.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, order_id: str, body: bytes) -> ErpReply:
        assert self._session is not None, "start() first"
        headers = {"Idempotency-Key": order_id, "Content-Type": "application/json"}
        started = time.monotonic()
        try:
            async with self._session.post(self._url, data=body, headers=headers) as resp:
                payload = await resp.read()
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return ErpReply(0, None, None, None, f"{type(exc).__name__}: {exc}", _since(started))
        seconds = _since(started)
        if status in (200, 201, 409):
            try:
                accepted = _DECODER.decode(payload)
            except msgspec.DecodeError:
                accepted = _Accepted()
            return ErpReply(
                status, accepted.erp_order_id, _when(accepted.accepted_at), None, "", seconds
            )
        text = payload[:500].decode(errors="replace")
        return ErpReply(status, None, None, retry_after, f"ERP answered {status}: {text}", seconds)


def _since(started: float) -> float:
    return time.monotonic() - started


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), 300.0))
    except ValueError:
        return None


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
