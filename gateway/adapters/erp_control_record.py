"""Ops' control of the ERP flow in PostgreSQL: the SQL behind :class:`ErpControlRecord`.

Every change and its audit entry commit in one transaction, so the audit holds exactly the
changes made. The settings row is locked while a change reads and rewrites it: two changes from
two gateways get consecutive versions, each audited with what it really replaced. Bounds and
honest outcomes are :class:`Postgres`'s: a failure before COMMIT was sent is
``dependency_unavailable`` (nothing applied), an unanswered COMMIT ``outcome_unknown``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import asyncpg
import msgspec

from gateway.adapters.postgres import Postgres
from gateway.ports import (
    AuditEntry,
    Caller,
    DeadLetter,
    DeadLetterDetail,
    FlowSettings,
    Replayed,
)

_SETTINGS: Final = "SELECT version, rate_per_second, burst, max_concurrency, paused FROM erp_limits"
_CREATE: Final = """
    INSERT INTO erp_limits (version, rate_per_second, burst, max_concurrency, paused)
    VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"""
_SAVE: Final = """
    UPDATE erp_limits SET version = $1, rate_per_second = $2, burst = $3, max_concurrency = $4,
        paused = $5, updated_at = now()"""
_AUDIT: Final = """
    INSERT INTO ops_audit (action, key_fingerprint, request_id, before, after)
    VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)"""
_AUDIT_PAGE: Final = """
    SELECT id, at, action, key_fingerprint, request_id, before::text, after::text FROM ops_audit
    WHERE id < $1 ORDER BY id DESC LIMIT $2"""
_SENT_AND_DEAD: Final = """
    SELECT (SELECT count(*) FROM orders WHERE status = 'accepted'
                AND updated_at > now() - make_interval(secs => $1)),
           (SELECT count(*) FROM orders WHERE status = 'failed')"""
_DEAD_LETTERS: Final = """
    SELECT seq, order_id, reservation_id, attempts, last_error, created_at, updated_at
    FROM orders WHERE status = 'failed' AND seq > $1 ORDER BY seq LIMIT $2"""
_DEAD_LETTER: Final = """
    SELECT seq, order_id, reservation_id, attempts, last_error, created_at, updated_at,
           body, lines::text
    FROM orders WHERE status = 'failed' AND order_id = $1"""
# Back in the buffer as if just confirmed: due now, with every attempt ahead of it again. The
# last error stays until an answer replaces it, so a replayed order still says why it failed.
_REPLAY_SET: Final = """
    status = 'queued', attempts = 0, next_attempt_at = now(), lease_until = NULL,
    updated_at = now()"""
_REPLAY: Final = f"""
    UPDATE orders SET {_REPLAY_SET}
    WHERE order_id = ANY($1::text[]) AND status = 'failed' RETURNING order_id, seq"""
_REPLAY_NEXT: Final = f"""
    WITH next AS (
        SELECT order_id FROM orders WHERE status = 'failed' AND seq > $1
        ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED)
    UPDATE orders SET {_REPLAY_SET}
    FROM next WHERE orders.order_id = next.order_id RETURNING orders.order_id, orders.seq"""
_NO_ID: Final = 2**63 - 1
_encoder: Final = msgspec.json.Encoder()


class PostgresErpControl:
    """:class:`gateway.ports.ErpControlRecord` on the gateway's PostgreSQL port."""

    def __init__(self, db: Postgres) -> None:
        self._db = db

    async def settings(self) -> FlowSettings | None:
        row = await self._db.fetch(_SETTINGS)
        return FlowSettings(*row[0].values()) if row else None

    async def change(
        self,
        action: str,
        update: Callable[[FlowSettings], FlowSettings],
        defaults: FlowSettings,
        caller: Caller,
    ) -> tuple[FlowSettings, FlowSettings]:
        async def save(conn: asyncpg.Connection) -> tuple[FlowSettings, FlowSettings]:
            # The row is made (at version 0, the defaults) if this is the first change, so that
            # every change, the first included, locks it and reads what it replaces.
            await conn.execute(_CREATE, *defaults)
            before = FlowSettings(*(await conn.fetchrow(f"{_SETTINGS} FOR UPDATE")).values())
            after = update(before)._replace(version=before.version + 1)
            await conn.execute(_SAVE, *after)
            await conn.execute(
                _AUDIT, action, *caller, _json(before._asdict()), _json(after._asdict())
            )
            return before, after

        return await self._db.write(save)

    async def sent_and_dead(self, window_seconds: float) -> tuple[int, int]:
        (row,) = await self._db.fetch(_SENT_AND_DEAD, window_seconds)
        return int(row[0]), int(row[1])

    async def dead_letters(self, after_seq: int, limit: int) -> list[DeadLetter]:
        rows = await self._db.fetch(_DEAD_LETTERS, after_seq, limit)
        return [DeadLetter(*row.values()) for row in rows]

    async def dead_letter(self, order_id: str) -> DeadLetterDetail | None:
        rows = await self._db.fetch(_DEAD_LETTER, order_id)
        if not rows:
            return None
        *letter, body, lines = rows[0].values()
        return DeadLetterDetail(DeadLetter(*letter), bytes(body), lines.encode())

    async def replay(self, order_ids: Sequence[str], caller: Caller) -> Replayed:
        asked = list(dict.fromkeys(order_ids))  # once each, in the order asked

        async def replay(conn: asyncpg.Connection) -> Replayed:
            rows = await conn.fetch(_REPLAY, asked)
            done = {row[0] for row in rows}
            replayed = Replayed(
                [i for i in asked if i in done],
                [i for i in asked if i not in done],
                max((row[1] for row in rows), default=0),
            )
            after = {"replayed": replayed.order_ids, "not_dead_letters": replayed.not_dead_letters}
            await conn.execute(_AUDIT, "replay", *caller, None, _json(after))
            return replayed

        return await self._db.write(replay)

    async def replay_next(self, after_seq: int, limit: int, caller: Caller) -> Replayed:
        async def replay(conn: asyncpg.Connection) -> Replayed:
            rows = sorted(await conn.fetch(_REPLAY_NEXT, after_seq, limit), key=lambda r: r[1])
            replayed = Replayed([row[0] for row in rows], [], rows[-1][1] if rows else 0)
            if rows:
                after = {"all": True, "replayed": replayed.order_ids}
                await conn.execute(_AUDIT, "replay", *caller, None, _json(after))
            return replayed

        return await self._db.write(replay)

    async def audit(self, before_id: int | None, limit: int) -> list[AuditEntry]:
        rows = await self._db.fetch(_AUDIT_PAGE, _NO_ID if before_id is None else before_id, limit)
        return [_audit_entry(row) for row in rows]


def _audit_entry(row: asyncpg.Record) -> AuditEntry:
    entry_id, at, action, fingerprint, request_id, before, after = row.values()
    return AuditEntry(entry_id, at, action, fingerprint, request_id, _raw(before), _raw(after))


def _json(value: Any) -> str:
    return _encoder.encode(value).decode()


def _raw(text: str | None) -> bytes | None:
    return None if text is None else text.encode()
