"""Small builders shared by tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

NOW = datetime.now(UTC).replace(microsecond=0)


def at(seconds: float) -> str:
    """RFC 3339 time ``seconds`` after the run's reference time (recent: inside the horizon)."""
    return (NOW + timedelta(seconds=seconds)).isoformat()


def event(
    event_id: str,
    kind: str,
    quantity: int,
    t: float,
    *,
    sku: str = "SKU-1",
    location: str = "L1",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "type": kind,
        "sku": sku,
        "location": location,
        "quantity": quantity,
        "occurred_at": at(t),
        **extra,
    }
