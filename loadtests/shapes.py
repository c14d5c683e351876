"""How many users each scenario wants at each moment: plain functions of the run time.

The locustfile's ``LoadTestShape`` asks :func:`target` once a second; the report draws the same
curve. The fixed users (feeds, the operator) come on top of these numbers.

- ``steady``: ramp to ``users`` at the spawn rate, hold until the end.
- ``promotion``: a tenth of ``users`` browse from the start; at ``spike_at`` (the moment the
  promotion drops, 30 % into the run) ten times as many arrive within a few seconds; they stay
  (the plateau) until 60 %, then leave evenly until 85 %, and the tenth stays to the end.
- ``flash-sale``: everyone arrives at once (the spawn rate decides how fast) and stays.
"""

from __future__ import annotations

SHAPES = ("steady", "promotion", "flash-sale")
SPIKE_AT = 0.30
PLATEAU_END = 0.60
DECAY_END = 0.85


def target(
    shape: str, run_time: float, duration: float, users: int, spawn_rate: float
) -> tuple[int, float] | None:
    """(users wanted, spawn rate) at ``run_time`` seconds, or None once the run is over."""
    if run_time >= duration:
        return None
    if shape != "promotion":
        return users, spawn_rate
    base = max(1, users // 10)
    spike_rate = max(spawn_rate, users / 3)  # the drop: the crowd lands within ~3 s
    if run_time < SPIKE_AT * duration:
        return base, spawn_rate
    if run_time < PLATEAU_END * duration:
        return users, spike_rate
    if run_time < DECAY_END * duration:
        left = (DECAY_END * duration - run_time) / ((DECAY_END - PLATEAU_END) * duration)
        return base + round((users - base) * left), spike_rate
    return base, spike_rate
