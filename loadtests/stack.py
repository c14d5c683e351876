"""Start what a local load run needs and is missing: Redis, PostgreSQL, the ERP simulator and the
gateway (as ``GATEWAY_WORKERS`` processes on one port when this gateway knows that setting).

Redis is always a private ``redis-server`` on a free port (``gateway.dev.services``, as the demo
and the tests start it), so a run starts from empty positions. PostgreSQL is found like the demo
does (the DSN given, else a private ``initdb`` server); its database is reset at the start of the
run, which is refused for a database whose name lacks ``load`` unless forced.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gateway.dev.services import ensure_postgres, free_port, start_redis, stop_process
from gateway.settings import Settings, SettingsError

READY_TIMEOUT = 30.0


class StackError(RuntimeError):
    """The stack could not be started; the message says what to do."""


def workers_supported() -> bool:
    """Whether this gateway takes ``GATEWAY_WORKERS`` (its settings parser refuses unknown
    ``GATEWAY_`` variables, so the answer decides whether the runner may set it)."""
    try:
        Settings.from_env({"GATEWAY_WORKERS": "2"})
    except SettingsError:
        return False
    return True


async def reset_database(dsn: str, *, force: bool) -> None:
    """Create the database if missing, else drop its ``public`` schema: the gateway migrates an
    empty one at start, so every run begins with no orders, limits or audit."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/") or "postgres"
    if "load" not in name and not force:
        raise StackError(
            f"refusing to reset database {name!r} (its name lacks 'load'); "
            "use --postgres-dsn .../loadtest or --force-reset"
        )
    admin = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
            return
    finally:
        await conn.close()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise StackError(f"{what} exited at start (code {proc.returncode}):\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise StackError(f"{what} did not answer 200 on {url} within {READY_TIMEOUT:g} s")


@dataclass(kw_only=True)
class SimOptions:
    rate_limit_per_second: int
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0


@dataclass(kw_only=True)
class GatewayOptions:
    workers: int
    rate_per_second: float
    burst: int
    max_concurrency: int
    buffer_max_depth: int
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class LocalStack:
    """What the runner started; :meth:`stop` ends all of it (also registered with atexit by
    the service helpers for Redis)."""

    out_dir: Path
    gateway_url: str = ""
    sim_url: str = ""
    redis_url: str = ""
    postgres_dsn: str = ""
    workers: int = 1
    keys: dict[str, str] = field(default_factory=dict)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def start(
        self, postgres_dsn: str, sim: SimOptions, gateway: GatewayOptions, *, force_reset: bool
    ) -> None:
        found = ensure_postgres(postgres_dsn)
        # A private server the helper just started is empty: its default database will do.
        asyncio.run(reset_database(found, force=force_reset or found != postgres_dsn))
        self.postgres_dsn = found
        self.redis_url, redis_proc = start_redis()
        self._procs.append(redis_proc)
        self.keys = {
            role: f"{role}-{secrets.token_hex(8)}" for role in ("storefront", "feed", "ops")
        }
        self._start_sim(sim)
        self._start_gateway(gateway)

    def _spawn(
        self, args: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.out_dir / log_name, "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._procs.append(proc)
        return proc

    def _start_sim(self, sim: SimOptions) -> None:
        port = free_port()
        self.sim_url = f"http://127.0.0.1:{port}"
        # No --gateway-url: the simulator pushes no snapshots of what it sold, so the gateway's
        # committed units stay put until the end and "committed + reserved <= on-hand - safety
        # stock" is exact all along (a pushed snapshot lands before the acceptance it counts,
        # double-counting for a moment). The end-to-end clearing is tests/test_demo.py's job.
        args = [
            sys.executable,
            "-m",
            "gateway",
            "erp-sim",
            "--port",
            str(port),
            "--rate-limit-per-second",
            str(sim.rate_limit_per_second),
            "--latency-ms",
            str(sim.latency_ms),
            "--latency-jitter-ms",
            str(sim.latency_jitter_ms),
            "--log-level",
            "warning",
        ]
        proc = self._spawn(args, "erp-sim.log")
        _wait_http(
            f"{self.sim_url}/healthz", proc, "the ERP simulator", self.out_dir / "erp-sim.log"
        )

    def _start_gateway(self, options: GatewayOptions) -> None:
        port = free_port()
        self.gateway_url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env |= {
            "GATEWAY_PORT": str(port),
            "GATEWAY_REDIS_URL": self.redis_url,
            "GATEWAY_POSTGRES_DSN": self.postgres_dsn,
            "GATEWAY_API_KEYS": ",".join(f"{r}:{k}" for r, k in self.keys.items()),
            "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_ERP_URL": self.sim_url,
            "GATEWAY_ERP_RATE_PER_SECOND": str(options.rate_per_second),
            "GATEWAY_ERP_BURST": str(options.burst),
            "GATEWAY_ERP_MAX_CONCURRENCY": str(options.max_concurrency),
            "GATEWAY_BUFFER_MAX_DEPTH": str(options.buffer_max_depth),
            **options.extra_env,
        }
        self.workers = options.workers if workers_supported() else 1
        if options.workers > 1 and self.workers == 1:
            print(
                "loadtest: this gateway has no GATEWAY_WORKERS yet: one gateway process",
                file=sys.stderr,
            )
        if self.workers > 1:
            env["GATEWAY_WORKERS"] = str(self.workers)
        proc = self._spawn([sys.executable, "-m", "gateway", "serve"], "gateway.log", env)
        _wait_http(f"{self.gateway_url}/readyz", proc, "the gateway", self.out_dir / "gateway.log")

    def alive(self) -> list[str]:
        """What died during the run (empty: all still running)."""
        return [str(p.args) for p in self._procs if p.poll() is not None]

    def stop(self) -> None:
        for proc in reversed(self._procs):
            stop_process(proc, grace=15)
        for log in self._logs:
            log.close()
