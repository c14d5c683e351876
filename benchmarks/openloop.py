"""An open-loop HTTP/1.1 load generator: a fixed request rate, latency from the intended send time.

A closed-loop tool (wrk, ab) sends the next request only when a connection is free, so when the
server stalls it stops sending and the stall is hidden ("coordinated omission"). Here request
``i`` is due at ``t0 + i / rate`` whatever happened before; it goes out on an idle keep-alive
connection, on a new connection when none is idle (up to ``--max-conns``), or waits in a queue
until one frees up. Its latency is counted from when it was *due*, so queueing shows.

One connection carries one request at a time (no pipelining); a response ends after its
``Content-Length`` bytes (chunked responses are counted as errors). Requests are GETs of
``--paths-file`` (or of the URL), used in turn, or POSTs of ``--bodies-file`` bodies to the URL's
path: the literal ``%ID%`` in a body becomes ``--id-prefix`` plus the request's number (ten
digits), so every request carries an id of its own (e.g. a reservation id that must not repeat).
Timers of the event loop (uvloop/libuv) tick in whole milliseconds, so requests leave in small
bursts: each wake-up sends what is due up to 0.5 ms ahead, so a request leaves between ~0.5 ms
early and ~0.6 ms late (``send_lag``, measured). Latency counts from the earlier of the due time
and the actual send, so an early send never flatters it and a late one (the generator's lag, or
waiting for a free connection) is part of it. ``service`` is the time from the actual send, what a
closed-loop tool would report.

    python -m benchmarks.openloop --url 'http://127.0.0.1:8090/v1/availability?sku=A&location=L' \\
        --rate 5000 --duration 10 [--paths-file F] [-H 'Authorization: Bearer k'] [--json]
    python -m benchmarks.openloop --url http://127.0.0.1:8080/v1/reservations --rate 2000 \\
        --bodies-file F --id-prefix run1- -H 'Authorization: Bearer k' --json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import uvloop

from benchmarks.openloop_io import (
    ID_PLACEHOLDER,
    OpenLoopResult,
    UniqueBodies,
    build_requests,
    format_result,
    percentile,
)

_HEADER_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_MIN_SLEEP = 0.001  # libuv timers have millisecond resolution; shorter sleeps would spin
_LOOKAHEAD = 0.0005  # send what is due this soon now: half the timer's resolution


class _Connection(asyncio.Protocol):
    __slots__ = ("buf", "gen", "intended", "need", "sent_at", "status", "transport")

    def __init__(self, gen: OpenLoopGenerator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the whole response once its header is parsed
        self.status = 0
        self.intended = -1.0  # due time of the request in flight; < 0 when idle
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they behave like one
        self.transport = cast(asyncio.Transport, transport)
        self.gen.connected(self)

    def send(self, intended: float, sent_at: float, request: bytes) -> None:
        self.intended = intended
        self.sent_at = sent_at
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if self.need < 0:
                end = buf.find(_HEADER_END)
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                at = head.find(_CONTENT_LENGTH)
                if at < 0 or not head.startswith(b"http/1."):
                    self.gen.broken(self)
                    return
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + len(_CONTENT_LENGTH) : stop if stop > 0 else len(head)])
                self.status = int(head[9:12])
                self.need = end + 4 + length
            if len(buf) < self.need:
                return
            del buf[: self.need]
            self.need = -1
            if self.intended < 0:  # an answer nobody asked for
                self.gen.broken(self)
                return
            self.gen.answered(self, self.status)
            if not buf:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class OpenLoopGenerator:
    def __init__(
        self,
        host: str,
        port: int,
        requests: Sequence[bytes] | Callable[[int], bytes],
        rate: float,
        duration: float,
        *,
        warmup: float = 1.0,
        max_conns: int = 1000,
        initial_conns: int = 64,
        max_connecting: int = 32,
        grace: float = 5.0,
    ) -> None:
        if rate <= 0 or duration <= 0:
            raise ValueError("rate and duration must be positive")
        self.host, self.port = host, port
        if callable(requests):
            self.request_for = requests
        else:  # used in turn
            fixed, count = list(requests), len(requests)
            self.request_for = lambda i: fixed[i % count]
        self.rate, self.duration, self.warmup = rate, duration, warmup
        self.max_conns, self.initial_conns, self.grace = max_conns, initial_conns, grace
        # Connection attempts at once: a burst beyond the server's listen backlog (128 for
        # aiohttp) overflows it and the kernel answers with SYN cookies and 1 s retransmits.
        self.max_connecting = max_connecting
        self.idle: list[_Connection] = []
        self.backlog: collections.deque[tuple[float, bytes]] = collections.deque()
        self.open_conns = 0
        self.connecting = 0
        self.opened = 0
        self.in_flight = 0
        self.errors = 0
        self.window_start = 0.0
        self.window_end = 0.0
        # of the requests due in the measured window: latency, answer time, send lag
        self.latencies: list[float] = []
        self.done_times: list[float] = []
        self.lags: list[float] = []
        self.service: list[float] = []  # answer time minus actual send time
        self.status_counts: collections.Counter[int] = collections.Counter()
        self._drained: asyncio.Event | None = None
        self._connect_errors = 0

    # --- connection events -------------------------------------------------------------------
    def connected(self, conn: _Connection) -> None:
        self.connecting -= 1
        self.open_conns += 1
        self.opened += 1
        self._next(conn)

    def answered(self, conn: _Connection, status: int) -> None:
        now = time.perf_counter()
        intended = conn.intended
        conn.intended = -1.0
        self.in_flight -= 1
        if intended >= self.window_start:
            sent_at = conn.sent_at
            self.latencies.append(now - (intended if intended < sent_at else sent_at))
            self.service.append(now - sent_at)
            self.done_times.append(now)
            self.status_counts[status] += 1
            if not 200 <= status < 300:
                self.errors += 1
        self._next(conn)

    def broken(self, conn: _Connection) -> None:
        if conn.transport is not None:
            conn.transport.abort()

    def lost(self, conn: _Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        self.open_conns -= 1
        if conn.intended >= 0:
            self.in_flight -= 1
            if conn.intended >= self.window_start:
                self.errors += 1
            conn.intended = -1.0
            self._maybe_drained()

    def _next(self, conn: _Connection) -> None:
        if self.backlog:
            intended, request = self.backlog.popleft()
            now = time.perf_counter()
            if intended >= self.window_start:
                self.lags.append(now - intended)
            conn.send(intended, now, request)
            self.in_flight += 1
        else:
            self.idle.append(conn)
            self._maybe_drained()

    def _maybe_drained(self) -> None:
        if self._drained is not None and self.in_flight == 0 and not self.backlog:
            self._drained.set()

    def _open(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        count = min(
            count,
            self.max_conns - self.open_conns - self.connecting,
            self.max_connecting - self.connecting,
        )
        for _ in range(max(0, count)):
            self.connecting += 1
            task = loop.create_task(
                loop.create_connection(lambda: _Connection(self), self.host, self.port)
            )
            task.add_done_callback(self._connect_done)

    def _connect_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.connecting -= 1
            self._connect_errors += 1

    # --- the schedule ---------------------------------------------------------------------
    async def run(self) -> OpenLoopResult:
        deadline = time.perf_counter() + 10
        while self.open_conns < self.initial_conns:
            if self._connect_errors or time.perf_counter() > deadline:
                raise ConnectionError(f"cannot connect to {self.host}:{self.port}")
            self._open(self.initial_conns - self.open_conns - self.connecting)
            await asyncio.sleep(0.005)
        cpu0 = time.process_time()
        interval = 1.0 / self.rate
        total = int((self.warmup + self.duration) * self.rate)
        request_for = self.request_for
        idle, backlog, lags = self.idle, self.backlog, self.lags
        t0 = time.perf_counter() + 0.01
        self.window_start = t0 + self.warmup
        self.window_end = self.window_start + self.duration
        window_start = self.window_start
        i = 0
        sleep = asyncio.sleep
        perf = time.perf_counter
        while i < total:
            now = perf()
            due = min(total, int((now + _LOOKAHEAD - t0) * self.rate) + 1)
            while i < due:
                intended = t0 + i * interval
                request = request_for(i)
                if idle:
                    if intended >= window_start:
                        lags.append(now - intended)
                    idle.pop().send(intended, now, request)
                    self.in_flight += 1
                else:
                    backlog.append((intended, request))
                i += 1
            if backlog:
                self._open(len(backlog) - self.connecting)
            delay = t0 + i * interval - _LOOKAHEAD - perf()
            await sleep(delay if delay > _MIN_SLEEP else _MIN_SLEEP)
        self._drained = asyncio.Event()
        self._maybe_drained()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), self.grace)
        cpu = time.process_time() - cpu0
        wall = perf() - t0
        unfinished = self.in_flight + len(self.backlog)
        for conn in list(self.idle):
            if conn.transport is not None:
                conn.transport.close()
        await sleep(0)
        return self._result(total, unfinished, cpu / wall * 100 if wall > 0 else 0.0)

    def _result(self, total: int, unfinished: int, cpu_percent: float) -> OpenLoopResult:
        lat = sorted(self.latencies)
        lags = sorted(self.lags)
        service = sorted(self.service)
        in_window = sum(1 for t in self.done_times if self.window_start <= t < self.window_end)
        sent_in_window = total - int(self.warmup * self.rate)
        ms = 1000.0
        return OpenLoopResult(
            target_rate=self.rate,
            duration_s=self.duration,
            sent=sent_in_window,
            completed=len(lat),
            achieved_rate=in_window / self.duration,
            errors=self.errors,
            unfinished=unfinished,
            connections=self.opened,
            p50_ms=percentile(lat, 50) * ms,
            p90_ms=percentile(lat, 90) * ms,
            p99_ms=percentile(lat, 99) * ms,
            p999_ms=percentile(lat, 99.9) * ms,
            max_ms=(lat[-1] if lat else math.nan) * ms,
            mean_ms=(sum(lat) / len(lat) if lat else math.nan) * ms,
            send_lag_p50_ms=percentile(lags, 50) * ms,
            send_lag_p99_ms=percentile(lags, 99) * ms,
            service_p50_ms=percentile(service, 50) * ms,
            service_p99_ms=percentile(service, 99) * ms,
            cpu_percent=cpu_percent,
            status_counts={str(k): v for k, v in sorted(self.status_counts.items())},
        )


def run_open_loop(
    url: str,
    rate: float,
    duration: float,
    *,
    paths: Sequence[str] = (),
    bodies: Sequence[str] = (),
    id_prefix: str = "",
    headers: Sequence[str] = (),
    warmup: float = 1.0,
    max_conns: int = 1000,
    initial_conns: int = 64,
) -> OpenLoopResult:
    """Run one open-loop measurement on a fresh uvloop event loop (blocking)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "") or "/"
    requests: Sequence[bytes] | Callable[[int], bytes]
    if bodies:
        requests = UniqueBodies(host, port, target, bodies, headers, id_prefix)
    else:
        requests = build_requests(host, port, paths or [target], headers)
    gen = OpenLoopGenerator(
        host,
        port,
        requests,
        rate,
        duration,
        warmup=warmup,
        max_conns=max_conns,
        initial_conns=initial_conns,
    )
    return uvloop.run(gen.run())


def main(argv: Sequence[str] | None = None) -> int:
    _escaped = ID_PLACEHOLDER.replace("%", "%%")  # argparse %-formats help strings
    parser = argparse.ArgumentParser(
        prog="openloop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="http://host:port/path?query")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    parser.add_argument("--max-conns", type=int, default=1000)
    parser.add_argument("--initial-conns", type=int, default=64)
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--paths-file", help="request paths, one a line, used in turn")
    parser.add_argument(
        "--bodies-file",
        help=f"POST these bodies (one a line, used in turn) to the URL's path; {_escaped} "
        "in a body becomes --id-prefix plus the request number",
    )
    parser.add_argument("--id-prefix", default="", help=f"what {_escaped} starts with")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    paths: list[str] = []
    if args.paths_file:
        with open(args.paths_file) as f:
            paths = [line.strip() for line in f if line.strip()]
    bodies: list[str] = []
    if args.bodies_file:
        if paths:
            parser.error("give --paths-file or --bodies-file, not both")
        with open(args.bodies_file) as f:
            bodies = [line.strip() for line in f if line.strip()]
    result = run_open_loop(
        args.url,
        args.rate,
        args.duration,
        paths=paths,
        bodies=bodies,
        id_prefix=args.id_prefix,
        headers=args.header,
        warmup=args.warmup,
        max_conns=args.max_conns,
        initial_conns=args.initial_conns,
    )
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(asdict(result)) + b"\n")
    else:
        print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
