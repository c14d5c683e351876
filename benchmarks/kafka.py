"""Ingest over Kafka: events pre-produced to a tansu topic, then consumed by a second gateway;
applied events per second from its ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import time
from typing import Any

import orjson

from benchmarks.common import LOAD_CORE, Run, http, say, start_gateway, wait_port
from benchmarks.events import make_events
from benchmarks.load import profiled
from benchmarks.measure import flag_disturbed, per_event, record_cpu
from benchmarks.procs import CpuReport, Processes, cpu_phase
from gateway.dev.services import free_port, tansu_binary

_APPLIED_KAFKA = re.compile(
    r'^gateway_stock_events_total\{(?=[^}]*source="kafka")(?=[^}]*outcome="applied")[^}]*\}\s+(\S+)',
    re.MULTILINE,
)


def kafka_applied(base: str) -> float:
    with contextlib.suppress(OSError):
        status, body = http("GET", f"{base}/metrics", timeout=2)
        if status == 200:
            match = _APPLIED_KAFKA.search(body.decode())
            return float(match.group(1)) if match else 0.0
    return -1.0


async def produce(bootstrap: str, topic: str, partitions: int, count: int) -> float:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
    values = [orjson.dumps(e) for e in make_events(count, prefix="K-")]
    # tansu rejects aiokafka's idempotent producer; whole batches per partition are fastest.
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, max_batch_size=1 << 20
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        i, n = 0, len(values)
        while i < n:
            for partition in range(partitions):
                batch = producer.create_batch()
                while i < n and batch.append(key=None, value=values[i], timestamp=None) is not None:
                    i += 1
                batch.close()
                pending.append(await producer.send_batch(batch, topic, partition=partition))
                if i >= n:
                    break
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return n / (time.perf_counter() - started)


def ingest_kafka(run: Run, processes: Processes, redis_port: int) -> None:
    cfg = run.config
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    broker = processes.start(
        "tansu",
        [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
        cores={LOAD_CORE},
    )
    wait_port(port, broker, "tansu")
    bootstrap = f"127.0.0.1:{port}"
    topic = f"bench-events-{os.getpid()}"
    produce_rate = asyncio.run(produce(bootstrap, topic, cfg.kafka_partitions, cfg.kafka_events))
    say(
        f"produced {cfg.kafka_events:,} events to {cfg.kafka_partitions} partitions "
        f"({produce_rate:,.0f} msg/s); starting a consuming gateway"
    )
    spawned = time.perf_counter()
    gateway, gport = start_gateway(
        processes,
        "gateway-kafka",
        redis_port,
        cfg.postgres_dsn,
        {
            "GATEWAY_KAFKA_BOOTSTRAP": bootstrap,
            "GATEWAY_KAFKA_TOPICS": topic,
            "GATEWAY_KAFKA_GROUP": f"bench-{os.getpid()}",
            "GATEWAY_KAFKA_SESSION_TIMEOUT_MS": "6000",
        },
    )
    base = f"http://127.0.0.1:{gport}"
    target = cfg.kafka_events
    first: tuple[float, float] | None = None
    last: tuple[float, float] = (0.0, 0.0)
    deadline = time.perf_counter() + 60 + target / 10_000
    timeline: list[tuple[float, float]] = []
    with contextlib.ExitStack() as stack:
        report: CpuReport | None = None
        while time.perf_counter() < deadline:
            if gateway.proc.poll() is not None:
                raise RuntimeError("the Kafka gateway exited:\n" + processes.log_tail(gateway))
            count = kafka_applied(base)
            now = time.perf_counter()
            if count > 0 and first is None:
                first = (now, count)
                report = stack.enter_context(cpu_phase(processes))
                stack.enter_context(profiled(run, "ingest-kafka", gateway.pid, target / 60_000))
            if count >= 0:
                timeline.append((round(now - spawned, 2), count))
            if count >= target:
                last = (now, count)
                break
            time.sleep(0.05)
    result: dict[str, Any] = {
        "events": target,
        "partitions": cfg.kafka_partitions,
        "produce_msgs_per_s": produce_rate,
        "timeline": timeline[-200:],
    }
    if report is not None and first is not None:
        record_cpu(run, "ingest kafka (from first applied)", report)
        flag_disturbed(run, "ingest kafka", report, result)
        per_event(
            result,
            report,
            {"redis": "redis", "gateway": "gateway-kafka"},
            max(c for _, c in timeline) - first[1],
        )
    if first is None or last[1] < target:
        result.update(
            {
                "events_per_s": 0.0,
                "applied": max((c for _, c in timeline), default=0),
                "error": "not all events applied before the deadline",
            }
        )
    else:
        elapsed = last[0] - first[0]
        result.update(
            {
                "applied": last[1],
                "applied_at_first_sample": first[1],
                "elapsed_s": elapsed,
                "events_per_s": (last[1] - first[1]) / elapsed if elapsed > 0 else 0.0,
                "start_to_first_applied_s": first[0] - spawned,
                "start_to_all_applied_s": last[0] - spawned,
            }
        )
    run.ingest["kafka"] = result
    say(
        f"ingest over Kafka: {result['events_per_s']:,.0f} events/s "
        f"({result.get('applied', 0):,.0f} applied; first applied "
        f"{result.get('start_to_first_applied_s', math.nan):.1f}s after start)"
    )
    processes.stop(gateway)
    processes.stop(broker)
