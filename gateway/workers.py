"""The parent of ``gateway serve --workers N``: N worker processes on one port, one supervisor.

Each worker is a whole gateway (``gateway serve`` in a fresh interpreter) that binds the port
with ``SO_REUSEPORT``, so the kernel spreads connections over them and no worker waits on
another. Nothing correctness needs lives in a worker's memory (holds, the buffer, the ERP rate
limit and the Kafka group are shared in Redis, PostgreSQL and Kafka), so N workers are N
gateways that happen to share a host: the sweeper, the writers and the consumers already run
safely side by side. The parent only keeps the group whole:

- a worker that dies is started again, with a backoff; a slot whose worker keeps dying within
  seconds of its start (a port taken, a bad setting) stops the group with exit status 1, since
  restarting it forever would hide the fault;
- SIGTERM or SIGINT is passed to every worker, and the parent waits for each one's drain
  (``GATEWAY_SHUTDOWN_TIMEOUT_SECONDS``, plus a margin for closing connections) before it
  exits; a worker still running then is killed;
- the workers share one ``PROMETHEUS_MULTIPROC_DIR`` (made fresh for each start and removed at
  the end), so a scrape of any worker shows the whole group (see :mod:`gateway.metrics`); the
  files of a dead worker's gauges are dropped, its counters keep counting in the totals;
- each worker gets ``PR_SET_PDEATHSIG``: if the parent is killed outright, the workers drain
  and stop instead of serving on unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Final

import structlog
from prometheus_client import multiprocess

from gateway.settings import Settings

log = structlog.get_logger(__name__)

FIRST_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 10.0
# A worker that lived this long was healthy: its next death starts the backoff over.
STABLE_SECONDS: Final = 30.0
# This many deaths in a row, each within STABLE_SECONDS of its start, stop the group.
MAX_QUICK_DEATHS: Final = 5
# Beyond a worker's own drain: closing keep-alive connections and the cleanup of its clients.
STOP_MARGIN_SECONDS: Final = 15.0
_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


class GroupFailed(Exception):
    """A worker slot kept dying at start: the group stops rather than flap."""


def run_workers(settings: Settings, config_file: str | None) -> int:
    """Serve with ``settings.workers`` processes until SIGTERM/SIGINT; the exit status."""
    with _metrics_dir() as metrics_dir, _port(settings) as port:
        command = [sys.executable, "-m", "gateway"]
        if config_file is not None:
            command += ["--config", config_file]
        env = {**os.environ, _MULTIPROC_ENV: metrics_dir, "GATEWAY_PORT": str(port)}
        group = WorkerGroup(command, env, settings.workers, settings.shutdown_timeout_seconds)
        log.info("workers_starting", workers=settings.workers, port=port, metrics_dir=metrics_dir)
        return asyncio.run(group.run())


class WorkerGroup:
    def __init__(
        self, command: Sequence[str], env: dict[str, str], count: int, drain_seconds: float
    ) -> None:
        self._command = list(command)
        self._env = env
        self._count = count
        self._stop_within = drain_seconds + STOP_MARGIN_SECONDS
        self._stopping = asyncio.Event()
        self._procs: dict[int, asyncio.subprocess.Process] = {}

    async def run(self) -> int:
        """0 when every worker drained and exited cleanly after a signal; 1 otherwise."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        slots = [asyncio.create_task(self._slot(i), name=f"worker-{i}") for i in range(self._count)]
        stop = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait([stop, *slots], return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in done if t is not stop and t.exception() is not None]
            for task in failed:
                log.error("workers_failing", error=str(task.exception()))
            self._stopping.set()
            await self._stop_all()
            statuses = await asyncio.gather(*slots, return_exceptions=True)
            # -SIGTERM: a worker still starting, before its handler was in place; it had
            # admitted nothing.
            clean = (0, -signal.SIGTERM)
            unclean = [s for s in statuses if s not in clean and not isinstance(s, GroupFailed)]
            if unclean:
                log.error("workers_stopped_uncleanly", statuses=[str(s) for s in unclean])
            return 1 if failed or unclean else 0
        finally:
            stop.cancel()
            for task in slots:
                task.cancel()

    def _on_signal(self, signum: int) -> None:
        if not self._stopping.is_set():
            log.info("workers_stopping", signal=signal.Signals(signum).name)
        self._stopping.set()

    async def _slot(self, index: int) -> int:
        """Keep one worker running until the group stops; its last exit status."""
        backoff, quick_deaths = FIRST_BACKOFF, 0
        while not self._stopping.is_set():
            proc = await asyncio.create_subprocess_exec(
                *self._command,
                "serve",
                "--workers",
                "1",
                "--worker-index",
                str(index),
                env=self._env,
                preexec_fn=_die_with_parent,
            )
            self._procs[index] = proc
            started = time.monotonic()
            log.info("worker_started", worker=index, pid=proc.pid)
            status = await proc.wait()
            del self._procs[index]
            # Its live gauges leave the sums now; its counters stay in the totals.
            multiprocess.mark_process_dead(proc.pid, self._env[_MULTIPROC_ENV])  # type: ignore[no-untyped-call]
            if self._stopping.is_set():
                log.info("worker_stopped", worker=index, pid=proc.pid, status=status)
                return status
            if time.monotonic() - started >= STABLE_SECONDS:
                backoff, quick_deaths = FIRST_BACKOFF, 0
            quick_deaths += 1
            if quick_deaths >= MAX_QUICK_DEATHS:
                raise GroupFailed(
                    f"worker {index} died {quick_deaths} times within {STABLE_SECONDS:g}s of "
                    f"starting (last status {status}); see its log lines above"
                )
            log.error("worker_died", worker=index, pid=proc.pid, status=status, restart_in=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
        return 0  # stopped between two starts: nothing ran

    async def _stop_all(self) -> None:
        procs = list(self._procs.values())
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(proc.wait()) for proc in procs]
        if not waits:
            return
        _, late = await asyncio.wait(waits, timeout=self._stop_within)
        if late:
            log.error("workers_killed", count=len(late), after_seconds=self._stop_within)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*waits, return_exceptions=True)


@contextlib.contextmanager
def _metrics_dir() -> Iterator[str]:
    """A fresh directory for the workers' metric files: one given in the environment (emptied of
    an earlier run's files, as prometheus-client asks), else a temporary one."""
    given = os.environ.get(_MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.unlink(os.path.join(given, name))
        yield given
        return
    made = tempfile.mkdtemp(prefix="gateway-metrics-")
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


@contextlib.contextmanager
def _port(settings: Settings) -> Iterator[int]:
    """The port every worker binds. Port 0 is resolved once here, and the port stays held by a
    bound (not listening) SO_REUSEPORT socket so no other program takes it between restarts."""
    if settings.port != 0:
        yield settings.port
        return
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((settings.host, 0))
        yield int(holder.getsockname()[1])


_PR_SET_PDEATHSIG: Final = 1


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
