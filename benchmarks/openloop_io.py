"""What the open-loop generator sends and what it reports: request bytes built once per path or
body (each body's ``%ID%`` made unique per request), the result record and its one-line summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

ID_PLACEHOLDER = "%ID%"


@dataclass
class OpenLoopResult:
    target_rate: float
    duration_s: float
    sent: int = 0
    completed: int = 0
    achieved_rate: float = 0.0
    errors: int = 0  # non-2xx answers, broken connections, malformed responses
    unfinished: int = 0  # still unanswered when the grace period ran out
    connections: int = 0  # connections opened in all
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    p999_ms: float = math.nan
    max_ms: float = math.nan
    mean_ms: float = math.nan
    send_lag_p50_ms: float = math.nan
    send_lag_p99_ms: float = math.nan
    service_p50_ms: float = math.nan  # from the actual send: what a closed-loop tool would see
    service_p99_ms: float = math.nan
    cpu_percent: float = 0.0  # of one core, this process, over the whole run
    status_counts: dict[str, int] = field(default_factory=dict)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def build_requests(
    host: str, port: int, paths: Sequence[str], headers: Sequence[str]
) -> list[bytes]:
    extra = "".join(f"{h.strip()}\r\n" for h in headers)
    return [
        f"GET {p} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode("latin-1") for p in paths
    ]


class UniqueBodies:
    """Request ``i``: a POST of body ``i % len(bodies)`` whose (first) ``%ID%`` is ``id_prefix``
    plus ``i`` in ten digits. The id has a fixed length, so each body's head (request line, headers
    with its Content-Length) and tail are built once and a request costs one concatenation."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        bodies: Sequence[str],
        headers: Sequence[str],
        id_prefix: str,
        method: str = "POST",
    ) -> None:
        if not bodies:
            raise ValueError("no bodies")
        extra = "".join(f"{h.strip()}\r\n" for h in headers)
        if not any(h.lower().startswith("content-type:") for h in headers):
            extra += "Content-Type: application/json\r\n"
        self.parts: list[tuple[bytes, bytes | None]] = []
        for body in bodies:
            head, found, tail = body.partition(ID_PLACEHOLDER)
            body_tail: bytes | None = None
            if found:
                body_head, body_tail = (head + id_prefix).encode(), tail.encode()
                length = len(body_head) + 10 + len(body_tail)
            else:
                body_head = body.encode()
                length = len(body_head)
            request_head = (
                f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
                f"Content-Length: {length}\r\n\r\n"
            ).encode("latin-1")
            self.parts.append((request_head + body_head, body_tail))
        self.count = len(self.parts)

    def __call__(self, i: int) -> bytes:
        head, tail = self.parts[i % self.count]
        if tail is None:
            return head
        return b"%b%010d%b" % (head, i, tail)


def format_result(r: OpenLoopResult) -> str:
    return (
        f"target {r.target_rate:,.0f}/s achieved {r.achieved_rate:,.0f}/s over {r.duration_s:g}s: "
        f"p50 {r.p50_ms:.2f} p90 {r.p90_ms:.2f} p99 {r.p99_ms:.2f} p99.9 {r.p999_ms:.2f} "
        f"max {r.max_ms:.2f} ms; errors {r.errors}, unfinished {r.unfinished}, "
        f"connections {r.connections}; send lag p50 {r.send_lag_p50_ms:.2f} "
        f"p99 {r.send_lag_p99_ms:.2f} ms; service p50 {r.service_p50_ms:.2f} "
        f"p99 {r.service_p99_ms:.2f} ms; generator CPU {r.cpu_percent:.0f}%"
    )
