"""Command line: ``gateway serve | migrate | demo``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import asyncpg

from gateway.adapters.migrations import CLI_LOCK_WAIT, MigrationLockBusy, migrate_dsn
from gateway.logs import configure_logging
from gateway.server import serve
from gateway.settings import Settings, SettingsError


def _settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    return Settings.from_env(environ if environ is not None else dict(os.environ), args.config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--config", help="TOML file of settings (environment variables win)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the HTTP API and the Kafka consumer")
    migrate = sub.add_parser("migrate", help="apply pending PostgreSQL migrations")
    migrate.add_argument(
        "--lock-wait",
        type=float,
        default=CLI_LOCK_WAIT,
        metavar="SECONDS",
        help="how long to wait for another process's migration to finish before giving up "
        f"(default {CLI_LOCK_WAIT:g})",
    )
    sub.add_parser("demo", help="start missing services, seed a demo catalogue and serve it")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from gateway.dev.demo import run_demo

            return run_demo(args.config)
        settings = _settings(args)
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        configure_logging(settings.log_level)
        return _migrate(settings, args.lock_wait)
    serve(settings)
    return 0


def _migrate(settings: Settings, lock_wait: float) -> int:
    """Apply pending migrations; PostgreSQL unreachable or refusing, or the migration lock held
    by another session for all of ``lock_wait`` seconds, is one line and exit 1."""
    try:
        applied = asyncio.run(
            migrate_dsn(
                settings.postgres_dsn, settings.postgres_timeout_seconds, lock_wait=lock_wait
            )
        )
    except MigrationLockBusy as exc:
        print(f"gateway: cannot migrate: {exc}; --lock-wait waits longer", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # OSError covers refused, unresolvable and timed out (TimeoutError). The DSN is not
        # echoed: it may hold a password; asyncpg's messages name host and port, not secrets.
        reason = str(exc).strip() or "no answer in time"
        print(
            f"gateway: cannot migrate: PostgreSQL: {type(exc).__name__}: {reason}",
            file=sys.stderr,
        )
        return 1
    print(f"applied migrations: {applied or 'none pending'}")
    return 0
