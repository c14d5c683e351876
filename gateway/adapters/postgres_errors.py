"""What a PostgreSQL failure means: the request's own error, the server unable to serve us now
(and whether every session would meet it), and whether a COMMIT that was sent surely failed.

Classified by SQLSTATE (a class, or one code) and by what asyncpg raised; used by
:class:`gateway.adapters.postgres.Postgres` to answer 503 ``dependency_unavailable`` or
``outcome_unknown``, to close its gate, or to let an error of the request's own through.
"""

from __future__ import annotations

from typing import Final

import asyncpg

# SQLSTATEs (a class or one code) by which the server says it cannot serve us now, rather than
# that the request is wrong (class 22, 23, 42...: those stay errors of their own).
UNAVAILABLE: Final = frozenset(
    {
        "08",  # connection exception
        "25006",  # read_only_sql_transaction: a standby, e.g. right after a failover
        "25P03",  # idle_in_transaction_session_timeout: the server ended our session
        "28",  # invalid authorization: credentials rotated or revoked
        "3D000",  # invalid_catalog_name: the database is gone
        "40",  # transaction rollback: serialization failure, deadlock
        "53",  # insufficient resources: disk full, out of memory, too many connections
        "55006",  # object_in_use
        "55P03",  # lock_not_available: another session's lock outlasted lock_timeout
        "57",  # operator intervention: shutdown, cancel, cannot connect now
        "58",  # system error (I/O)
        "XX",  # internal error, data or index corrupted
    }
)
# ...and of those, the ones every session would meet: the gate closes until a probe connects.
DOWN: Final = frozenset({"08", "28", "3D000", "57P01", "57P02", "57P03", "57P04"})
# After COMMIT was sent, an ERROR of these does not prove it failed: a cancel or a shutdown can
# land as the commit completes. Any other ERROR does (an error after the commit record is
# written is a PANIC).
MAY_FOLLOW_COMMIT: Final = frozenset({"08", "57"})


def _sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def _among(sqlstate: str, codes: frozenset[str]) -> bool:
    return sqlstate[:2] in codes or sqlstate in codes


def lost(exc: BaseException) -> bool:
    """The connection failed or did not answer (asyncpg's client-side DataError is also an
    InterfaceError, and a ValueError: a defect, not a lost connection)."""
    if isinstance(exc, asyncpg.InterfaceError):
        return not isinstance(exc, ValueError)
    return isinstance(exc, OSError | asyncpg.PostgresConnectionError)  # TimeoutError included


def is_request_error(exc: BaseException) -> bool:
    """The server refused the statement for what it is (class 22, 23, 42...: the request's
    fault or a defect of ours), or something other than PostgreSQL failed."""
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(
        exc, asyncpg.PostgresConnectionError
    ):
        return not _among(_sqlstate(exc), UNAVAILABLE)
    return not lost(exc)


def proves_not_applied(exc: BaseException) -> bool:
    """The server answered with an ERROR, so it rolled back (see :data:`MAY_FOLLOW_COMMIT`).
    A FATAL ends the session whatever became of the transaction."""
    if not isinstance(exc, asyncpg.PostgresError) or isinstance(
        exc, asyncpg.PostgresConnectionError
    ):
        return False
    severity = getattr(exc, "severity_en", None) or getattr(exc, "severity", None)
    return severity == "ERROR" and not _among(_sqlstate(exc), MAY_FOLLOW_COMMIT)


def is_outage(exc: BaseException, stall: bool) -> bool:
    """Evidence that no session of ours would be served: a lost connection, a refusal every
    session would meet, or a timeout that is evidence of a stall (``stall``)."""
    if isinstance(exc, TimeoutError):
        return stall
    if lost(exc):
        return True
    return isinstance(exc, asyncpg.PostgresError) and _among(_sqlstate(exc), DOWN)


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
