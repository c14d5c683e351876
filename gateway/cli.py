"""Command line: ``gateway serve | migrate | demo | erp-sim``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import asyncpg

from gateway.adapters.migrations import CLI_LOCK_WAIT, MigrationLockBusy, migrate_dsn
from gateway.logs import configure_logging
from gateway.settings import Settings, SettingsError


def _settings(args: argparse.Namespace) -> Settings:
    environ = dict(os.environ)
    if getattr(args, "workers", None) is not None:
        environ["GATEWAY_WORKERS"] = args.workers  # the flag wins, validated as the variable
    return Settings.from_env(environ, args.config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--config", help="TOML file of settings (environment variables win)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run the HTTP API and the Kafka consumer")
    serve_cmd.add_argument(
        "--workers",
        metavar="N",
        help="processes serving the port (SO_REUSEPORT) under one supervising parent; "
        "'auto': one per usable core (default: GATEWAY_WORKERS, else 1)",
    )
    # Set by the parent of a worker group for each worker it starts; not for people.
    serve_cmd.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    migrate = sub.add_parser("migrate", help="apply pending PostgreSQL migrations")
    migrate.add_argument(
        "--lock-wait",
        type=float,
        default=CLI_LOCK_WAIT,
        metavar="SECONDS",
        help="how long to wait for another process's migration to finish before giving up "
        f"(default {CLI_LOCK_WAIT:g})",
    )
    demo = sub.add_parser(
        "demo", help="start missing services and an ERP simulator, seed a demo catalogue, serve it"
    )
    demo.add_argument(
        "--erp-sim-port",
        type=int,
        default=8081,
        metavar="PORT",
        help="where the ERP simulator listens (default 8081; a free port when taken; 0: any); "
        "not started when GATEWAY_ERP_URL names an ERP",
    )
    _add_erp_sim(sub)
    args = parser.parse_args(argv)
    if args.command == "erp-sim":
        return _erp_sim(parser, args)
    try:
        if args.command == "demo":
            from gateway.dev.demo import run_demo

            return run_demo(args.config, args.erp_sim_port)
        settings = _settings(args)
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        configure_logging(settings.log_level)
        return _migrate(settings, args.lock_wait)
    if args.worker_index is None and settings.workers > 1:
        from gateway.workers import run_workers

        configure_logging(settings.log_level)
        return run_workers(settings, args.config)
    # Imported here: the parent of a worker group must not load the metrics (prometheus-client
    # would open files in the workers' directory under the parent's pid).
    from gateway.server import serve

    serve(settings, worker_index=args.worker_index)
    return 0


def _add_erp_sim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = sub.add_parser("erp-sim", help="serve a simulated ERP that takes confirmed orders")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8090)
    sim.add_argument("--latency-ms", type=float, default=0.0, help="mean added latency")
    sim.add_argument("--latency-jitter-ms", type=float, default=0.0, help="+- around the mean")
    sim.add_argument(
        "--error-rate", type=float, default=0.0, help="fraction of orders answered 503 (0..1)"
    )
    sim.add_argument(
        "--rate-limit-per-second", type=int, default=0, help="above it 429 (0: no limit)"
    )
    sim.add_argument("--outage", action="store_true", help="start down: every order gets 503")
    sim.add_argument(
        "--outage-window",
        action="append",
        default=[],
        metavar="START:END",
        help="seconds after start during which the sim is down (repeatable)",
    )
    sim.add_argument("--gateway-url", help="push stock snapshots of ordered positions here")
    sim.add_argument("--feed-key", help="the gateway API key (feed role) for those pushes")
    sim.add_argument("--log-level", default="info")


def _erp_sim(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from gateway.dev.erp_sim import KnobsError, knobs_from, run_sim

    if (args.gateway_url is None) != (args.feed_key is None):
        parser.error("erp-sim: --gateway-url and --feed-key go together")
    try:
        knobs = knobs_from(
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            error_rate=args.error_rate,
            rate_limit_per_second=args.rate_limit_per_second,
            outage=args.outage,
            outage_windows=args.outage_window,
        )
    except KnobsError as exc:
        print(f"gateway erp-sim: {exc}", file=sys.stderr)
        return 2
    run_sim(args.host, args.port, knobs, args.gateway_url, args.feed_key, log_level=args.log_level)
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
