"""What the domain packages need from the outside, as protocols the adapters implement.

One neutral home for every port, named for what the domain asks (run this script on these keys,
read these fields of these records, keep this config), never for a transport's commands: the
adapters (:mod:`gateway.adapters`) translate, batch and classify. Every port fails with gateway
errors only: 503 ``dependency_unavailable`` when nothing was applied (nothing sent, or only
reads), 503 ``outcome_unknown`` when a write was sent and not answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from gateway.errors import GatewayError

# One script call: the keys it touches and its arguments.
ScriptCall = tuple[Sequence[str], Sequence[Any]]


class Scripts(Protocol):
    """A domain's Lua scripts, by file name: one run per call, the replies in order."""

    async def run(self, name: str, calls: Sequence[ScriptCall]) -> list[Any]: ...

    async def run_at_once(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One call, its reply: written now rather than with the next shared batch, for a
        call a request waits on whose next step waits on it too."""
        ...

    @property
    def timeout(self) -> float:
        """The longest a call may take (``GATEWAY_REDIS_TIMEOUT_SECONDS``)."""
        ...

    def script_error(self, message: str) -> GatewayError:
        """What an error a script step caught and answered as data means: a refused write to
        retry (503, nothing written) or damaged data or a defect (500)."""
        ...


class FieldsRead(NamedTuple):
    """Some fields of one record (a hash): the values come back in the order named."""

    key: str
    fields: Sequence[str]


class Records(Protocol):
    """Reads of the records the scripts keep. The reads of one call are answered together, and
    the adapter may share their round trip with other callers'; a missing value is None."""

    async def fields(self, reads: Sequence[FieldsRead]) -> list[list[Any]]: ...

    async def values(self, keys: Sequence[str]) -> list[Any]: ...

    async def value(self, key: str) -> Any: ...

    async def now_ms(self) -> int:
        """The store's clock (the one the scripts read), in milliseconds."""
        ...

    async def due(self, indexes: Sequence[str], until_ms: int, limit: int) -> list[list[str]]:
        """Per time-ordered index, up to ``limit`` members due at or before ``until_ms``."""
        ...

    async def count_live(self, index: str) -> int:
        """How many members of a time-ordered index are not due yet (leases still running)."""
        ...


class ValueWrite(NamedTuple):
    key: str
    value: str


class FieldWrite(NamedTuple):
    key: str
    field: str
    value: str | int


class RecordWriter(Protocol):
    """Writes values and record fields now, in the order given; raises on any failure."""

    async def write(self, writes: Sequence[ValueWrite | FieldWrite]) -> None: ...


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


class SafetyStockRow(NamedTuple):
    """One safety-stock setting: ``sku`` empty for the location's default."""

    location: str
    sku: str
    quantity: int


class ConfigSnapshot(NamedTuple):
    """The whole location config as of one version, read in one snapshot."""

    version: int
    groups: Sequence[tuple[str, Sequence[str]]]
    safety_stock: Sequence[SafetyStockRow]


class LocationConfigRecord(Protocol):
    """The durable record of the location config (groups and safety stock) and its version.

    Each save applies its change and bumps the version in one transaction and returns the new
    version; a failure before COMMIT was sent applied nothing, an unanswered COMMIT may have."""

    async def version(self) -> int:
        """The version the record holds now."""
        ...

    async def snapshot(self) -> ConfigSnapshot:
        """Everything, in one consistent read. May be slow for its size: it has a longer
        deadline of its own, and its timeout says nothing about the record's health."""
        ...

    async def save_group(self, group: str, locations: Sequence[str]) -> int: ...

    async def save_safety_stock(self, rows: Sequence[SafetyStockRow]) -> int: ...


# --- the order buffer -----------------------------------------------------------------------


class NewOrder(NamedTuple):
    """A confirmed order as the buffer takes it: ``body`` the order JSON exactly as received
    (it goes to the ERP as is), ``lines`` the held allocations it commits, as JSON."""

    order_id: str
    reservation_id: str
    customer_id: str | None
    body: bytes
    lines: bytes


class StoredOrder(NamedTuple):
    order_id: str
    reservation_id: str
    status: str  # queued | sending | accepted | failed
    hold_state: str  # pending | moved
    attempts: int
    last_error: str | None
    erp_order_id: str | None
    accepted_at: datetime | None
    created_at: datetime
    updated_at: datetime


class OrderOutbox(Protocol):
    """The durable order buffer. A row is committed before its order is acknowledged."""

    async def add(self, order: NewOrder) -> StoredOrder | None:
        """Commit the row; None when its order id or its reservation id is taken already."""
        ...

    async def add_moved(self, order: NewOrder, send_by: float) -> bool:
        """Commit the row of an order whose hold moved already (its hold is not pending); False
        when its order id or its reservation id is taken already.
        ``send_by``: the loop time after which it is not sent at all (503, nothing applied);
        once sent, PostgreSQL's statement timeout bounds it, so it commits by then or never."""
        ...

    async def find(self, order_id: str) -> StoredOrder | None: ...

    async def find_by_reservation(self, reservation_id: str) -> StoredOrder | None: ...

    async def hold_moved(self, order_id: str) -> None:
        """Record that the order's Redis hold counts as committed now."""
        ...

    def hold_moved_soon(self, order_id: str) -> asyncio.Future[None]:
        """The same, not waited for: the future answers when it is recorded (or failed).
        Raises 503 ``overloaded`` at once when too many writes wait already."""
        ...

    async def discard(self, order_id: str) -> bool:
        """Delete a row whose hold never moved (the order was never acknowledged); False if
        it moved meanwhile."""
        ...

    async def holds_pending(self, older_than_seconds: float, limit: int) -> list[StoredOrder]:
        """Rows whose Redis half is not done, committed at least ``older_than_seconds`` ago."""
        ...

    async def with_rows(self, reservation_ids: Sequence[str]) -> set[str]:
        """Which of these reservations have an order row."""
        ...


class ClaimedOrder(NamedTuple):
    """An order a writer holds (``sending``) until its lease ends."""

    order_id: str
    body: bytes
    attempts: int


class BufferDepth(NamedTuple):
    depth: int
    oldest_age_seconds: float


class OrderQueue(Protocol):
    """The writers' side of the order buffer. Claims skip rows other writers hold, so many
    writers in many processes drain it together and no order is held by two at once."""

    async def claim(self, limit: int, lease_seconds: float) -> list[ClaimedOrder]:
        """Up to ``limit`` orders due now, oldest first, none behind an earlier order of its
        customer that is still waiting; held for ``lease_seconds`` (then due again)."""
        ...

    async def accepted(self, order_id: str, erp_order_id: str | None, at: datetime) -> None: ...

    async def retry(self, order_id: str, delay_seconds: float, error: str) -> None: ...

    async def fail(self, order_id: str, error: str) -> None: ...

    async def hand_back(self, order_ids: Sequence[str]) -> None:
        """Put claimed orders that were never sent back in the queue, due now (a stopping
        writer's): their attempt does not count."""
        ...

    async def depth(self) -> BufferDepth: ...

    async def drain_rate(self, window_seconds: float) -> float:
        """Orders that left the buffer (accepted or failed) per second over the last window."""
        ...


class ErpReply(NamedTuple):
    """What the ERP answered one order: ``status`` 0 when no answer came (timeout, connection
    refused or cut); ``retry_after`` in seconds when it said."""

    status: int
    erp_order_id: str | None
    accepted_at: datetime | None
    retry_after: float | None
    error: str
    seconds: float


class ErpClient(Protocol):
    async def send(self, order_id: str, body: bytes) -> ErpReply:
        """POST one order with its idempotency key; never raises for what the ERP did."""
        ...


# --- commitments after the confirm ----------------------------------------------------------


class CommittedOrder(NamedTuple):
    """An order whose quantities count as committed: ``lines`` its allocations as JSON
    (``[{"sku", "location", "quantity"}...]``), ``accepted_at`` when the ERP accepted it."""

    seq: int
    order_id: str
    reservation_id: str
    lines: bytes
    accepted_at: datetime | None


class CommitmentLedger(Protocol):
    """The order buffer's record of which commitments still count."""

    async def accepted(self, commitment: str, after_seq: int, limit: int) -> list[CommittedOrder]:
        """Accepted orders whose commitment is ``open`` (Redis has not seen the acceptance)
        or ``waiting`` (for a snapshot), after ``after_seq``, in seq order."""
        ...

    async def counting(self, after_seq: int, limit: int) -> list[CommittedOrder]:
        """Every order whose hold moved and whose commitment is not cleared, in seq order."""
        ...

    async def mark(self, waiting: Sequence[str], cleared: Sequence[str]) -> None:
        """Record, by order id, commitments Redis has as waiting for a snapshot or cleared."""
        ...

    async def waiting(self) -> BufferDepth:
        """Accepted commitments not cleared yet: how many, and the oldest one's age."""
        ...


# --- ops control of the ERP flow ------------------------------------------------------------


class FlowSettings(NamedTuple):
    """What ops set for the ERP flow, as of one ``version`` of its record (0: never set, the
    gateway's defaults)."""

    version: int
    rate_per_second: float
    burst: int
    max_concurrency: int
    paused: bool


class Caller(NamedTuple):
    """Who asked for a change, for the audit: a fingerprint of their key, never the key."""

    key_fingerprint: str
    request_id: str


class DeadLetter(NamedTuple):
    """An order the writers gave up on (``failed``); ``seq`` is its place in confirm order."""

    seq: int
    order_id: str
    reservation_id: str
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime


class DeadLetterDetail(NamedTuple):
    """One dead letter with what was sent: the order as the storefront gave it, and its lines."""

    letter: DeadLetter
    order: bytes  # JSON, as received
    lines: bytes  # JSON array of {sku, location, quantity}


class Replayed(NamedTuple):
    """Dead letters put back in the buffer, and the ids asked for that were not dead letters."""

    order_ids: list[str]
    not_dead_letters: list[str]
    last_seq: int  # the highest ``seq`` replayed; 0 when none was


class AuditEntry(NamedTuple):
    id: int
    at: datetime
    action: str
    key_fingerprint: str
    request_id: str
    before: bytes | None  # JSON, as recorded
    after: bytes | None


class ErpControlRecord(Protocol):
    """The durable record of ops' control of the ERP flow: its settings (one versioned row), the
    dead letters of the order buffer, and the audit of every change. Each change and its audit
    entry commit in one transaction."""

    async def settings(self) -> FlowSettings | None:
        """The settings as recorded; None before the first change."""
        ...

    async def change(
        self,
        action: str,
        update: Callable[[FlowSettings], FlowSettings],
        defaults: FlowSettings,
        caller: Caller,
    ) -> tuple[FlowSettings, FlowSettings]:
        """Apply ``update`` to the recorded settings (``defaults`` before the first change)
        under a lock, bump the version, and audit it; returns (before, after)."""
        ...

    async def sent_and_dead(self, window_seconds: float) -> tuple[int, int]:
        """Orders the ERP accepted within the last window, and dead letters now."""
        ...

    async def dead_letters(self, after_seq: int, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` dead letters past ``after_seq``, in confirm order."""
        ...

    async def dead_letter(self, order_id: str) -> DeadLetterDetail | None:
        """That order if it is a dead letter, with its body and lines; else None."""
        ...

    async def replay(self, order_ids: Sequence[str], caller: Caller) -> Replayed:
        """Put these dead letters back in the buffer (due now, attempts from zero)."""
        ...

    async def replay_next(self, after_seq: int, limit: int, caller: Caller) -> Replayed:
        """Put back up to ``limit`` dead letters past ``after_seq``, in confirm order."""
        ...

    async def audit(self, before_id: int | None, limit: int) -> list[AuditEntry]:
        """Up to ``limit`` audit entries older than ``before_id``, newest first."""
        ...
