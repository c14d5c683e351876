"""Command line: ``gateway serve | migrate | demo``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web

from gateway.adapters.postgres import migrate_dsn
from gateway.app import create_app
from gateway.logs import configure_logging
from gateway.settings import Settings, SettingsError


def _settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    return Settings.from_env(environ if environ is not None else dict(os.environ), args.config)


def serve(settings: Settings, app: web.Application | None = None) -> None:
    configure_logging(settings.log_level)
    uvloop.install()
    web.run_app(
        app if app is not None else create_app(settings),
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        access_log=None,
        print=None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--config", help="TOML file of settings (environment variables win)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the HTTP API and the Kafka consumer")
    sub.add_parser("migrate", help="apply pending PostgreSQL migrations")
    sub.add_parser("demo", help="start missing services, seed a demo catalogue and serve it")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from gateway.demo import run_demo

            return run_demo(args.config)
        settings = _settings(args)
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        configure_logging(settings.log_level)
        applied = asyncio.run(migrate_dsn(settings.postgres_dsn))
        print(f"applied migrations: {applied or 'none pending'}")
        return 0
    serve(settings)
    return 0
