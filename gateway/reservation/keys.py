"""Redis keys of reservations.

A reservation's record and the expiry index it sits in share a slot (hash tag ``{rsv<N>}``, N
from the id), so recording a hold and scheduling its expiry is one atomic step on a cluster too.
Sixteen buckets spread the records over the cluster; the sweeper walks all of them.
"""

from __future__ import annotations

import zlib
from typing import Final

from gateway.atp.keys import PREFIX

BUCKETS: Final = 16

# Fields of a reservation record (a hash; REC in lib.lua names them for the scripts): its status,
# the request's fingerprint, the answer it gave (held lines or shortfalls, as JSON), its expiry
# (ms) and its SKUs.
STATUS: Final = "st"
FINGERPRINT: Final = "fp"
ANSWER: Final = "resp"
EXPIRES: Final = "exp"
SKUS: Final = "skus"


# A confirmed reservation's entry in a SKU's holds hash: this prefix, then the reservation id
# (COMMITTED in lib.lua). Reservation ids hold no control character, so no hold is named so.
COMMITTED_PREFIX: Final = "\x1f"


def committed_field(reservation_id: str) -> str:
    return COMMITTED_PREFIX + reservation_id


# Whether Redis's commitments are whole or were lost and are being restored from the order
# buffer (commitments_marker.lua).
COMMITMENTS_MARKER: Final = f"{PREFIX}:commitments:state"


def bucket(reservation_id: str) -> int:
    return zlib.crc32(reservation_id.encode()) % BUCKETS


def record(reservation_id: str, bucket_of_id: int | None = None) -> str:
    n = bucket(reservation_id) if bucket_of_id is None else bucket_of_id
    return f"{PREFIX}:rsv:{{rsv{n}}}:{reservation_id}"


def expiry_index(n: int) -> str:
    # Outside the records' namespace: under ``rsv:`` a reservation named "expiry" would be
    # the index itself.
    return f"{PREFIX}:rsv-expiry:{{rsv{n}}}"


# Confirms whose order row may not be committed yet (settle.lua, unconfirm.lua): reservation id
# -> when its hold moved (ms, Redis's clock). Single node only, where a confirm moves the hold
# and writes the row at once (gateway.buffering.intake), so one key serves every bucket.
UNVERIFIED: Final = f"{PREFIX}:rsv-unverified"


def holds(sku: str) -> str:
    """Per SKU: reservation id -> what it holds of the SKU, by location."""
    return f"{PREFIX}:{{{sku}}}:h"
