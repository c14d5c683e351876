"""What reservations need from the outside, as protocols the adapters implement.

Every port here fails with gateway errors only: 503 ``dependency_unavailable`` when nothing was
sent (or only reads), 503 ``outcome_unknown`` when a write was sent and not answered."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from gateway.errors import GatewayError


class RecordReader(Protocol):
    """Reads reservation records and indexes (and the config they name), each call answered
    in order, shared with other readers' calls by the adapter."""

    async def call_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]: ...

    async def call(self, *command: Any) -> Any: ...


class ReservationScripts(Protocol):
    """Runs a named reservation script once per (keys, args) call; the replies in order."""

    async def run(
        self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]: ...

    @property
    def timeout(self) -> float:
        """The longest a call may take (``GATEWAY_REDIS_TIMEOUT_SECONDS``)."""
        ...

    def script_error(self, message: str) -> GatewayError:
        """What an error a script step caught and answered as data means: a refused write to
        retry (503, nothing written) or damaged data or a defect (500)."""
        ...


class ReservationHolder(Protocol):
    """Holds single-node reservations: each all or nothing on its own (``reserve.lua``), in
    arrival order; how many share a call is the adapter's business."""

    def hold(self, keys: list[str], values: list[Any], locations: int) -> Awaitable[Any]:
        """The reserve script's reply for one reservation: its keys, its values, and how many
        locations its lines check. Not a coroutine: the caller awaits the answer itself, one
        frame less to resume."""
        ...

    async def close(self) -> None:
        """Refuse new reservations and cancel those not yet written."""
        ...
