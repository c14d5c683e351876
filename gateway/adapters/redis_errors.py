"""What a Redis failure means to the client: the one classification every Redis path uses.

================================================  =========================================
what happened                                      answer
================================================  =========================================
never sent: gate closed, connect refused or        503 ``dependency_unavailable``: nothing
timed out, queued past the timeout, Redis behind   was applied
by more than the timeout, pool or queue full
sent, no answer (reply timeout, connection lost    a write: 503 ``outcome_unknown`` (it may
after the write), or only part of a batch of       have run; retry with the same ids); a
writes ran                                         read: 503 ``dependency_unavailable``
Redis refused it (OOM, READONLY, LOADING, BUSY,    503 ``dependency_unavailable``: refused
MASTERDOWN, CLUSTERDOWN, TRYAGAIN, NOREPLICAS,     commands do not run
NOAUTH, WRONGPASS, max number of clients)
any other error reply (WRONGTYPE, a script's       500: damaged data or a defect
runtime error)
================================================  =========================================

Everything here runs only once something has failed: the hot path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    MaxConnectionsError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import (
    RETRY_AFTER,
    DependencyDown,
    GatewayError,
    OutcomeUnknown,
    Overloaded,
    Unavailable,
)

# Commands that change nothing. Any verb not listed counts as a write: when in doubt, the honest
# answer to a lost reply is "it may have been applied".
_READS: Final = frozenset(
    {
        "GET", "MGET", "HGET", "HMGET", "HGETALL", "HEXISTS", "HLEN", "EXISTS", "TYPE", "TTL",
        "PTTL", "STRLEN", "SCARD", "SISMEMBER", "SMEMBERS", "ZCARD", "ZSCORE", "ZRANGE",
        "ZRANGEBYSCORE", "ZRANK", "LLEN", "LRANGE", "SCAN", "HSCAN", "ZSCAN", "TIME", "PING",
        "ECHO", "INFO", "DBSIZE", "CLIENT", "SELECT", "AUTH", "HELLO", "EVALSHA_RO", "EVAL_RO",
        # Loading a script into the cache changes no data.
        "SCRIPT",
    }
)  # fmt: skip
# Error replies by which Redis refuses to run a command now (it did not run): retry later. The
# last three refuse the connection itself (a password rotated or missing, the server full of
# clients): the dependency cannot serve this gateway now, which is no defect of the request.
_REFUSALS: Final = (
    "OOM ", "READONLY", "MASTERDOWN", "NOREPLICAS", "LOADING", "BUSY", "CLUSTERDOWN", "TRYAGAIN",
    "MISCONF", "NOAUTH", "WRONGPASS", "max number of clients",
)  # fmt: skip
# redis-py's words for a failure before anything was written.
_NOT_SENT_MARKS: Final = ("connecting to", "Too many connections", "max number of clients")


def has_writes(commands: Iterable[Sequence[Any]]) -> bool:
    for command in commands:
        verb = command[0]
        if isinstance(verb, bytes):
            verb = verb.decode()
        if str(verb).upper() not in _READS:
            return True
    return False


def is_refusal(message: str) -> bool:
    # Redis prefixes an error raised inside a script with where it came from; look anywhere.
    return any(refusal in message for refusal in _REFUSALS)


def not_sent(reason: str) -> DependencyDown:
    return DependencyDown(
        f"redis is unavailable ({reason}); nothing was applied",
        dependency="redis",
        retry_after=RETRY_AFTER,
    )


def no_reply(reason: str, commands: Iterable[Sequence[Any]]) -> Unavailable:
    """Sent and not answered: a write may have run, a read changed nothing."""
    return NoAnswer.because(reason) if has_writes(commands) else not_sent(reason)


class NoAnswer(OutcomeUnknown):
    """Writes sent and not answered. Remembers why, for the reads of the same batch; built
    like any gateway error too (``type(e)(e.detail, **e.extra)``), with a generic reason."""

    reason = "no answer"

    @classmethod
    def because(cls, reason: str) -> NoAnswer:
        error = cls(
            f"redis did not answer ({reason}); the write may have been applied: retry with the "
            "same ids to learn the outcome",
            dependency="redis",
            retry_after=RETRY_AFTER,
        )
        error.reason = reason
        return error


def error_reply(reply: BaseException) -> GatewayError:
    """An error reply in place of a command's result."""
    message = str(reply)
    if isinstance(reply, (BusyLoadingError, AuthenticationError)) or is_refusal(message):
        return DependencyDown(
            f"redis refused the command: {message}", dependency="redis", retry_after=RETRY_AFTER
        )
    if isinstance(reply, (RedisConnectionError, RedisTimeoutError)):
        # redis-py's pipelines put a timeout or a dropped connection in place of each reply:
        # sent, not answered (narrowed for reads by the caller).
        return NoAnswer.because(message)
    return GatewayError(f"redis failed the command: {message}")


def classify(exc: BaseException, commands: Sequence[Sequence[Any]]) -> GatewayError:
    """Any exception out of a Redis client, as the gateway error it means for ``commands``."""
    if isinstance(exc, GatewayError):
        return narrow(exc, commands)
    if isinstance(exc, MaxConnectionsError):
        return Overloaded("too many Redis calls at once", retry_after=RETRY_AFTER)
    if isinstance(exc, (ResponseError, BusyLoadingError, AuthenticationError)):
        return error_reply(exc)
    if isinstance(exc, RedisClusterException):  # no node reachable, a slot not covered
        return not_sent(str(exc))
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)):
        message = str(exc) or type(exc).__name__
        if any(mark in message for mark in _NOT_SENT_MARKS):
            return not_sent(message)
        return no_reply(message, commands)
    return GatewayError(f"redis client failed: {exc!r}")


def narrow(error: GatewayError, commands: Sequence[Sequence[Any]]) -> GatewayError:
    """``error`` as it applies to ``commands``, a part of what failed: one exception each (a
    shared one would collect every raiser's traceback), and reads of a batch whose writes may
    have run changed nothing themselves."""
    if isinstance(error, OutcomeUnknown) and not has_writes(commands):
        return not_sent(error.reason if isinstance(error, NoAnswer) else NoAnswer.reason)
    return copy(error)


def copy(error: GatewayError) -> GatewayError:
    if isinstance(error, NoAnswer):
        return NoAnswer.because(error.reason)
    if isinstance(error, Unavailable) or type(error) is GatewayError:
        return type(error)(error.detail, **error.extra)
    return error


def combine(
    outcomes: Sequence[Any], commands: Sequence[Sequence[Any]], errors: Sequence[GatewayError]
) -> GatewayError:
    """The one error for a batch where ``errors`` (classified) failed among ``outcomes``.

    A defect stays a 500. Otherwise, if any write may have run (a command that succeeded, one
    with no answer), the batch as a whole may have been applied: ``outcome_unknown``."""
    for error in errors:
        if not isinstance(error, Unavailable):
            return error
    if len(errors) < len(outcomes) and has_writes(commands):
        detail = "; ".join(sorted({e.detail for e in errors}))
        return NoAnswer.because(f"only part of a batch of writes ran: {detail}")
    unknown = [e for e in errors if isinstance(e, OutcomeUnknown)]
    return narrow(unknown[0] if unknown else errors[0], commands)


def raise_for_replies(replies: Sequence[Any], commands: Sequence[Sequence[Any]]) -> None:
    """Raise the gateway error of a batch whose replies hold error replies in place."""
    errors = [error_reply(r) for r in replies if isinstance(r, BaseException)]
    if errors:
        raise combine(replies, commands, errors)
