"""Ingest over HTTP: POST pre-built 1000-event batches from a few keep-alive connections at once.

Bodies are built before the clock starts, so the client costs little more than its sockets.
Prints one JSON line: events sent, the gateway's applied/duplicate/stale counts, seconds, events/s.

    python -m benchmarks.ingest_http --url http://127.0.0.1:8080 --key FEED_KEY --events 200000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
import uvloop

from benchmarks.events import batch_bodies, make_events


async def ingest(url: str, key: str, bodies: Sequence[bytes], connections: int) -> dict[str, Any]:
    totals = {"applied": 0, "duplicate": 0, "stale": 0}
    errors: list[str] = []
    queue = list(reversed(bodies))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                async with session.post(url + "/v1/stock-events", data=body) as response:
                    payload = await response.read()
                    if response.status != 200:
                        errors.append(f"{response.status}: {payload[:200]!r}")
                        continue
                    result = orjson.loads(payload)
                    for name in totals:
                        totals[name] += int(result[name])

        cpu0 = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    return {
        **totals,
        "batches": len(bodies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "elapsed_s": elapsed,
        "events_per_s": totals["applied"] / elapsed if elapsed > 0 else 0.0,
        "client_cpu_percent": cpu / elapsed * 100 if elapsed > 0 else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ingest_http",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="the gateway's base URL")
    parser.add_argument("--key", required=True, help="an API key with the feed role")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--prefix", default="H-", help="event id and SKU prefix of this run")
    parser.add_argument("--skus", type=int, default=10_000)
    parser.add_argument("--locations", type=int, default=20)
    parser.add_argument(
        "--wait-go",
        action="store_true",
        help="print READY once the bodies are built, start on a line on stdin",
    )
    args = parser.parse_args(argv)
    events = make_events(args.events, prefix=args.prefix, skus=args.skus, locations=args.locations)
    bodies = batch_bodies(events, args.batch)
    del events
    if args.wait_go:
        print("READY", flush=True)
        sys.stdin.readline()
    result = uvloop.run(ingest(args.url.rstrip("/"), args.key, bodies, args.connections))
    result["events"] = args.events
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
