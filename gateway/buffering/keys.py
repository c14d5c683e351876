"""Redis keys of the ERP flow: the shared limit, its token bucket and breaker, the calls in flight.

All three share one hash tag, so each flow script is atomic on a Redis Cluster too; every gateway
process reads and writes these, so the limit holds for all of them together. ``lib.lua`` names the
same fields for the scripts.
"""

from __future__ import annotations

from typing import Final

from gateway.atp.keys import PREFIX

_TAG: Final = "{erp}"
LIMITS: Final = f"{PREFIX}:erp:{_TAG}:limits"
FLOW: Final = f"{PREFIX}:erp:{_TAG}:flow"
IN_FLIGHT: Final = f"{PREFIX}:erp:{_TAG}:inflight"
KEYS: Final = (LIMITS, FLOW, IN_FLIGHT)

# Fields of LIMITS (what ops set) and FLOW (what the writers' outcomes made of it).
RATE: Final = "rate"
BURST: Final = "burst"
CONCURRENCY: Final = "max_concurrency"
PAUSED: Final = "paused"
VERSION: Final = "version"  # of ops' record (PostgreSQL) these limits reflect
FACTOR: Final = "factor"
STATE: Final = "state"
