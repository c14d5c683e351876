"""What the users saw, written by each Locust process to the run folder for the report.

- ``outcomes-<pid>.jsonl``: per wall-clock second, endpoint, status and problem ``code``, a count,
  the summed latency and the ``Retry-After`` seen (sum, max): the timeline of 2xx / 409 / 503
  the plots draw, and the totals the contract check reads (Locust's own stats know failures,
  not the allowed 409s and 503s).
- ``orders-<pid>.jsonl``: ``{"a": id}`` before an order is sent and ``{"k": id}`` once it was
  answered 202 or 200: every acknowledged order must reach the ERP, and nothing the ERP got may
  be an id no user sent (an attempt cut off by the end of the run may have reached it).
- ``ops-<pid>.jsonl``: the operator's limit changes, with when they were sent and answered.

Counters are flushed about once a second by the locustfile and at the end; each process writes
only its own files, so no locking across processes.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

Key = tuple[int, str, int, str]  # second, endpoint, status, code


class Recorder:
    def __init__(self, out_dir: str) -> None:
        self._dir = Path(out_dir)
        self._counts: Counter[Key] = Counter()
        self._millis: dict[Key, float] = {}
        self._retry_after: dict[Key, tuple[float, float]] = {}  # sum, max
        self._files: dict[str, IO[str]] = {}

    def _file(self, kind: str) -> IO[str]:
        handle = self._files.get(kind)
        if handle is None:
            # Opened lazily, in the process that writes (Locust forks its workers after import).
            handle = open(self._dir / f"{kind}-{os.getpid()}.jsonl", "a")  # noqa: SIM115
            self._files[kind] = handle
        return handle

    def outcome(
        self, endpoint: str, status: int, code: str, millis: float, retry_after: float | None
    ) -> None:
        key = (int(time.time()), endpoint, status, code)
        self._counts[key] += 1
        self._millis[key] = self._millis.get(key, 0.0) + millis
        if retry_after is not None:
            total, most = self._retry_after.get(key, (0.0, 0.0))
            self._retry_after[key] = (total + retry_after, max(most, retry_after))

    def order(self, kind: str, order_id: str) -> None:
        """``kind``: ``a`` (about to send) or ``k`` (acknowledged). Written at once: an order
        acknowledged must be on disk even if the process is killed right after."""
        handle = self._file("orders")
        handle.write(json.dumps({kind: order_id}) + "\n")
        handle.flush()

    def ops(self, entry: dict[str, Any]) -> None:
        handle = self._file("ops")
        handle.write(json.dumps(entry) + "\n")
        handle.flush()

    def flush(self) -> None:
        counts, millis, waits = self._counts, self._millis, self._retry_after
        self._counts, self._millis, self._retry_after = Counter(), {}, {}
        if counts:
            handle = self._file("outcomes")
            for key, n in counts.items():
                second, endpoint, status, code = key
                row: dict[str, Any] = {"t": second, "endpoint": endpoint, "status": status}
                row |= {"code": code, "n": n, "ms": round(millis[key], 3)}
                if key in waits:
                    row |= {"ra_sum": waits[key][0], "ra_max": waits[key][1]}
                handle.write(json.dumps(row) + "\n")
            handle.flush()

    def close(self) -> None:
        self.flush()
        for handle in self._files.values():
            handle.close()
        self._files.clear()
