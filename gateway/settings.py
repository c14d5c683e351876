"""Settings, read once at start-up from the environment (and optionally a TOML file).

Nothing else in the gateway reads ``os.environ``: everything it needs arrives through
:class:`Settings`, which is frozen so a handler cannot change configuration under another.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

ROLES: Final = frozenset({"storefront", "feed", "ops"})
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable and why."""


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    role: str
    key: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Processes serving the port (SO_REUSEPORT) under one parent; GATEWAY_WORKERS=auto: one a core.
    workers: int = 1
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    postgres_dsn: str = dataclasses.field(
        default="postgresql://postgres@127.0.0.1:5432/postgres", repr=False
    )
    kafka_bootstrap: str = ""
    kafka_topics: tuple[str, ...] = ("inventory-events",)
    kafka_group: str = "atp-gateway"
    # Tests against tansu need short sessions; real Kafka rejects anything under 6 s.
    kafka_session_timeout_ms: int = 10_000
    api_keys: tuple[ApiKey, ...] = dataclasses.field(default=(), repr=False)
    log_level: str = "info"
    event_horizon_seconds: int = 7 * 24 * 3600
    shutdown_timeout_seconds: float = 10.0
    access_log: bool = False
    reservation_max_ttl: int = 3600
    # Bounds on waiting for a dependency: a command (or connect) that takes longer is a 503.
    redis_timeout_seconds: float = 2.0
    postgres_timeout_seconds: float = 3.0
    # A request body that has not fully arrived this long after its headers is a 408.
    body_timeout_seconds: float = 10.0
    # How far in the future an event's occurred_at may lie (clocks of feeds drift).
    max_clock_skew_seconds: int = 300
    # The ERP the order writers feed; empty: orders are buffered, none are sent.
    erp_url: str = ""
    erp_timeout_seconds: float = 5.0
    erp_max_attempts: int = 10
    # The shared limit's starting values (ops change them live; PostgreSQL keeps the change).
    erp_rate_per_second: float = 50.0
    erp_burst: int = 10
    erp_max_concurrency: int = 16
    # Back-pressure: past either limit, intake answers 503 buffer_full until below 80% of both.
    buffer_max_depth: int = 100_000
    buffer_max_age_seconds: float = 3600.0

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], config_file: str | Path | None = None
    ) -> Settings:
        """Build settings from a TOML file (optional) overlaid by ``GATEWAY_*`` variables."""
        raw: dict[str, str] = {}
        if config_file is not None:
            raw.update(_read_toml(Path(config_file)))
        raw.update({k: v for k, v in environ.items() if k.startswith(_PREFIX)})
        values: dict[str, Any] = {}
        for name, (field, parse) in _PARSERS.items():
            if name in raw:
                try:
                    values[field] = parse(raw[name].strip())
                except SettingsError as exc:
                    shown = "(hidden)" if name in _SECRETS else repr(raw[name])
                    raise SettingsError(f"invalid {name}={shown}: {exc}") from None
        return cls(**values)


_PREFIX: Final = "GATEWAY_"
# Values that may hold credentials are never echoed in errors.
_SECRETS: Final = frozenset({"GATEWAY_API_KEYS", "GATEWAY_POSTGRES_DSN", "GATEWAY_REDIS_URL"})


def _read_toml(path: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from None
    out: dict[str, str] = {}
    for key, value in data.items():
        name = key.upper()
        if not name.startswith(_PREFIX):
            name = _PREFIX + name
        if isinstance(value, bool):
            out[name] = "1" if value else "0"
        elif isinstance(value, list):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = str(value)
    return out


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise SettingsError("must be an integer") from None
        if not lo <= value <= hi:
            raise SettingsError(f"must be between {lo} and {hi}")
        return value

    return parse


MAX_WORKERS: Final = 256


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return max(1, min(MAX_WORKERS, _usable_cores()))
    return _int(1, MAX_WORKERS)(text)


def _usable_cores() -> int:
    # The cores this process may run on (a container's cpuset), not the machine's.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise SettingsError("must be a number") from None
        if not lo <= value <= hi:
            raise SettingsError(f"must be between {lo} and {hi}")
        return value

    return parse


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise SettingsError("must be 0 or 1")


def _nonempty(text: str) -> str:
    if not text:
        raise SettingsError("must not be empty")
    return text


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not any(text.startswith(s + "://") for s in schemes):
            raise SettingsError(
                f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}"
            )
        return text

    return parse


def _dsn(*schemes: str) -> Callable[[str], str]:
    """A URL whose host part (one host or several, comma-separated) has numeric ports."""
    check_scheme = _url(*schemes)

    def parse(text: str) -> str:
        check_scheme(text)
        rest = text.split("://", 1)[1]
        netloc = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
        for host in netloc.split(","):
            if host.startswith("["):  # [IPv6]:port
                _, _, port = host.partition("]")
                port = port.removeprefix(":")
            else:
                _, _, port = host.rpartition(":") if ":" in host else ("", "", "")
            if port and not (port.isdigit() and 0 < int(port) <= 65535):
                raise SettingsError("has a port that is not a number from 1 to 65535")
        return text

    return parse


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    if not items:
        raise SettingsError("must list at least one name")
    return items


def _bootstrap(text: str) -> str:
    for part in filter(None, (p.strip() for p in text.split(","))):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SettingsError("must be a comma-separated list of host:port")
    return text


def _api_keys(text: str) -> tuple[ApiKey, ...]:
    keys: list[ApiKey] = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        role, sep, key = entry.partition(":")
        if not sep or not key:
            # Never echo the entry: it may be a secret with a typo in the role.
            raise SettingsError(f"entry {len(keys) + 1} is not role:key")
        if role not in ROLES:
            raise SettingsError(f"entry {len(keys) + 1} has unknown role {role!r}")
        keys.append(ApiKey(role, key))
    return tuple(keys)


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise SettingsError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.lower()


_PARSERS: Final[dict[str, tuple[str, Callable[[str], Any]]]] = {
    "GATEWAY_HOST": ("host", _nonempty),
    "GATEWAY_PORT": ("port", _int(0, 65535)),
    "GATEWAY_WORKERS": ("workers", _workers),
    "GATEWAY_REDIS_URL": ("redis_url", _dsn("redis", "rediss", "unix")),
    "GATEWAY_REDIS_CLUSTER": ("redis_cluster", _bool),
    "GATEWAY_POSTGRES_DSN": ("postgres_dsn", _dsn("postgresql", "postgres")),
    "GATEWAY_KAFKA_BOOTSTRAP": ("kafka_bootstrap", _bootstrap),
    "GATEWAY_KAFKA_TOPICS": ("kafka_topics", _csv),
    "GATEWAY_KAFKA_GROUP": ("kafka_group", _nonempty),
    "GATEWAY_KAFKA_SESSION_TIMEOUT_MS": ("kafka_session_timeout_ms", _int(1000, 300_000)),
    "GATEWAY_API_KEYS": ("api_keys", _api_keys),
    "GATEWAY_LOG_LEVEL": ("log_level", _log_level),
    "GATEWAY_EVENT_HORIZON_SECONDS": ("event_horizon_seconds", _int(60, 366 * 24 * 3600)),
    # aiohttp reads a timeout of 0 as "wait forever": the drain must have a bound.
    "GATEWAY_SHUTDOWN_TIMEOUT_SECONDS": ("shutdown_timeout_seconds", _float(0.1, 600)),
    "GATEWAY_ACCESS_LOG": ("access_log", _bool),
    "GATEWAY_RESERVATION_MAX_TTL": ("reservation_max_ttl", _int(1, 7 * 24 * 3600)),
    "GATEWAY_REDIS_TIMEOUT_SECONDS": ("redis_timeout_seconds", _float(0.05, 60)),
    "GATEWAY_POSTGRES_TIMEOUT_SECONDS": ("postgres_timeout_seconds", _float(0.05, 60)),
    "GATEWAY_BODY_TIMEOUT_SECONDS": ("body_timeout_seconds", _float(0.1, 600)),
    "GATEWAY_MAX_CLOCK_SKEW_SECONDS": ("max_clock_skew_seconds", _int(0, 86_400)),
    "GATEWAY_ERP_URL": ("erp_url", _url("http", "https")),
    "GATEWAY_ERP_TIMEOUT_SECONDS": ("erp_timeout_seconds", _float(0.05, 300)),
    "GATEWAY_ERP_MAX_ATTEMPTS": ("erp_max_attempts", _int(1, 1000)),
    "GATEWAY_ERP_RATE_PER_SECOND": ("erp_rate_per_second", _float(0.1, 100_000)),
    "GATEWAY_ERP_BURST": ("erp_burst", _int(1, 100_000)),
    "GATEWAY_ERP_MAX_CONCURRENCY": ("erp_max_concurrency", _int(1, 10_000)),
    "GATEWAY_BUFFER_MAX_DEPTH": ("buffer_max_depth", _int(1, 100_000_000)),
    "GATEWAY_BUFFER_MAX_AGE_SECONDS": ("buffer_max_age_seconds", _float(1, 30 * 86_400)),
}
