"""The command line of ``python -m benchmarks.run``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from benchmarks.common import RESERVATION_TTL, Config


def parse_args(argv: Sequence[str] | None, description: str | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="about a minute: shorter, smaller")
    parser.add_argument("--duration", type=float, help="seconds per wrk measurement (10; quick 4)")
    parser.add_argument("--warmup", type=float, help="wrk warm-up seconds before each (2; quick 1)")
    parser.add_argument("--rounds", type=int, help="wrk rounds, the median is kept (2; quick 1)")
    parser.add_argument("--openloop-duration", type=float, help="seconds (10; quick 4)")
    parser.add_argument("--http-events", type=int, help="events posted (300000; quick 100000)")
    parser.add_argument("--kafka-events", type=int, help="events produced (300000; quick 100000)")
    parser.add_argument("--kafka-partitions", type=int, default=4)
    parser.add_argument("--http-connections", type=int, default=4)
    parser.add_argument(
        "--postgres-dsn",
        default=os.environ.get(
            "GATEWAY_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test_bench"
        ),
        help="a database of the benchmark's own, made when missing (the orders and writer "
        "phases truncate its orders table); default $GATEWAY_BENCH_POSTGRES_DSN or "
        "postgresql://postgres@127.0.0.1:5432/test_bench",
    )
    parser.add_argument("--skip-kafka", action="store_true", help="no Kafka ingest figure")
    parser.add_argument(
        "--only",
        metavar="PHASES",
        help=f"comma-separated subset of {','.join(PHASES)} (openloop runs wrk "
        "first: it needs the saturation rates; reservations and baseline run the ceiling "
        "and redis too; baseline: the gateway beside a PostgreSQL SELECT ... FOR UPDATE "
        "server and PostgreSQL's insert ceiling; scaling: 1..N gateway workers, see "
        "--workers); 'generator' checks the open-loop generator against the ceiling at a low "
        "and a high rate",
    )
    parser.add_argument(
        "--reservation-ttl",
        type=int,
        default=RESERVATION_TTL,
        metavar="SECONDS",
        help=f"ttl_seconds of the benchmark's reservations ({RESERVATION_TTL}: longer than a "
        "run, so the expiry sweeper has nothing to release while measuring)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the gateway with py-spy (if installed) during each load",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeat a latency or saturation measurement disturbed by other "
        "work on the machine up to this many times (2)",
    )
    parser.add_argument(
        "--retry-budget",
        type=float,
        metavar="SECONDS",
        help="no more retries once the run is this old (150; quick 45)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other work on the machine to stop",
    )
    parser.add_argument(
        "--writer-rates",
        metavar="R,R,...",
        default="50,500,2000",
        help="configured ERP rates per second of the writer benchmark (50,500,2000)",
    )
    parser.add_argument(
        "--writer-window", type=float, help="writer: measured seconds per rate (10; quick 5)"
    )
    parser.add_argument(
        "--writer-warmup", type=float, help="writer: seconds before the window (2; quick 1)"
    )
    parser.add_argument(
        "--erp-latency-ms",
        type=float,
        default=20.0,
        help="writer: the ERP simulator's answer latency (20)",
    )
    parser.add_argument(
        "--burst-ms",
        type=float,
        default=50.0,
        help="writer: GATEWAY_ERP_BURST as this many ms of the rate, at least 1 (50)",
    )
    parser.add_argument(
        "--workers",
        metavar="N,N,...",
        default="1,2",
        help="scaling: gateway worker counts to measure (1,2; on a bigger machine e.g. 1,2,4)",
    )
    parser.add_argument(
        "--baseline-pool",
        type=int,
        default=16,
        help="baseline: the PostgreSQL baseline's asyncpg pool size, and the connections of "
        "the PostgreSQL insert ceiling (16)",
    )
    a = parser.parse_args(argv)
    quick = a.quick
    return Config(
        duration=a.duration or (4.0 if quick else 10.0),
        warmup=a.warmup if a.warmup is not None else (1.0 if quick else 2.0),
        rounds=a.rounds or (1 if quick else 2),
        openloop_duration=a.openloop_duration or (4.0 if quick else 10.0),
        http_events=a.http_events or (100_000 if quick else 300_000),
        kafka_events=a.kafka_events or (100_000 if quick else 300_000),
        kafka_partitions=a.kafka_partitions,
        http_connections=a.http_connections,
        redis_requests=200_000 if quick else 500_000,
        postgres_dsn=a.postgres_dsn,
        phases=_phases(a.only, a.skip_kafka, parser),
        profile=a.profile,
        wait_quiet=a.wait_quiet,
        retries=a.retries,
        retry_budget=a.retry_budget or (45.0 if quick else 150.0),
        reservation_ttl=a.reservation_ttl,
        writer_rates=_rates(a.writer_rates, parser),
        writer_window=a.writer_window or (5.0 if quick else 10.0),
        writer_warmup=a.writer_warmup if a.writer_warmup is not None else (1.0 if quick else 2.0),
        erp_latency_ms=a.erp_latency_ms,
        burst_ms=a.burst_ms,
        baseline_pool=a.baseline_pool,
        workers=_workers(a.workers, parser),
    )


PHASES = (
    "redis",
    "wrk",
    "openloop",
    "reservations",
    "http",
    "kafka",
    "orders",
    "writer",
    "baseline",
    "scaling",
)
EXTRA_PHASES = ("generator",)  # only when asked for by --only


def _rates(text: str, parser: argparse.ArgumentParser) -> tuple[float, ...]:
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        parser.error(f"--writer-rates: not numbers: {text!r}")
    if not rates or any(r <= 0 for r in rates):
        parser.error("--writer-rates: give positive rates")
    return rates


def _workers(text: str, parser: argparse.ArgumentParser) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        parser.error(f"--workers: not whole numbers: {text!r}")
    if not counts or any(n < 1 for n in counts):
        parser.error("--workers: give counts of at least 1")
    return counts


def _phases(only: str | None, skip_kafka: bool, parser: argparse.ArgumentParser) -> frozenset[str]:
    chosen = set(PHASES) if only is None else {p.strip() for p in only.split(",") if p.strip()}
    unknown = chosen - set(PHASES) - set(EXTRA_PHASES)
    if unknown:
        parser.error(
            f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {PHASES + EXTRA_PHASES}"
        )
    if "openloop" in chosen:
        chosen.add("wrk")
    if chosen & {"reservations", "baseline"}:  # their figures sit beside redis-benchmark's
        chosen.add("redis")
    if skip_kafka:
        chosen.discard("kafka")
    return frozenset(chosen)
