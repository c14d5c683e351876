"""Process lifecycle: the flag that stops intake, and the health of background workers."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class Lifecycle:
    # Set when shutdown begins: new work is refused with 503 while in-flight work drains.
    draining: bool = False
    # Named background workers and whether they are running; readiness reports them.
    workers: dict[str, str] = dataclasses.field(default_factory=dict)
