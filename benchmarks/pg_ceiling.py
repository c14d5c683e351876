"""PostgreSQL's insert-rate ceiling: one-row ``INSERT`` per commit over N asyncpg connections.

The PostgreSQL baseline commits once per reservation, so this is what it could reach if its HTTP
and its locking cost nothing: the same client library, the same pool size, the same database
(fsync and ``synchronous_commit`` as the server has them), run from the server's core with the
backends pinned where the baseline's are (``--backend-core``). The table
``baseline_insert_ceiling`` is made and emptied here.

    python -m benchmarks.pg_ceiling --dsn DSN [--connections 16] [--duration 5] [--warmup 1]
        [--backend-core 1]

Prints one JSON line: ``rows_per_s``, ``rows``, ``seconds``, ``connections``, the CPU of this
client and of the backends (% of one core).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence

import asyncpg
import orjson
import uvloop

from benchmarks.procs import process_cpu_seconds

_TABLE = """
CREATE TABLE IF NOT EXISTS baseline_insert_ceiling (
    id bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
)
"""
_INSERT = "INSERT INTO baseline_insert_ceiling (id) VALUES ($1)"


async def measure(
    dsn: str, connections: int, duration: float, warmup: float, backend_core: int | None
) -> dict[str, float]:
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    try:
        await conns[0].execute(_TABLE)
        await conns[0].execute("TRUNCATE baseline_insert_ceiling")
        backends = [int(await c.fetchval("SELECT pg_backend_pid()")) for c in conns]
        if backend_core is not None:
            for pid in backends:
                with contextlib.suppress(OSError):  # not ours to pin (another user's server)
                    os.sched_setaffinity(pid, {backend_core})
        start = time.perf_counter() + warmup
        stop = start + duration
        counts = [0] * connections

        async def insert(n: int, conn: asyncpg.Connection) -> None:
            i = 0
            while (now := time.perf_counter()) < stop:
                await conn.execute(_INSERT, n * 1_000_000_000 + i)  # autocommit: one commit
                i += 1
                if now >= start:
                    counts[n] += 1

        cpu0 = time.process_time()
        pg0 = sum(process_cpu_seconds(pid) for pid in backends)
        await asyncio.gather(*(insert(n, c) for n, c in enumerate(conns)))
        wall = duration + warmup
        pg = sum(process_cpu_seconds(pid) for pid in backends) - pg0
        client = time.process_time() - cpu0
    finally:
        for c in conns:
            await c.close()
    rows = sum(counts)
    return {
        "rows_per_s": rows / duration,
        "rows": rows,
        "seconds": duration,
        "connections": connections,
        "client_cpu_percent": round(100 * client / wall, 1),
        "postgres_cpu_percent": round(100 * pg / wall, 1),
    }


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pg_ceiling", description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--backend-core", type=int)
    a = parser.parse_args(argv)
    result = uvloop.run(measure(a.dsn, a.connections, a.duration, a.warmup, a.backend_core))
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
