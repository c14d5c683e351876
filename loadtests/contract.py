"""Which answers the contract allows each endpoint the users call (README, openapi.yaml).

Anything else is a failure in Locust's stats (grouped as ``HTTP <status> <code>``) and breaks
the run's contract invariant. Status 0 is a connection error or a timeout on the client side.
"""

from __future__ import annotations

from typing import Final

# endpoint -> status -> allowed problem codes (None: a success, which carries no code; the
# locustfile gives a 2xx that is not a JSON object a code, so it is not allowed)
ALLOWED: Final[dict[str, dict[int, frozenset[str] | None]]] = {
    "availability": {200: None},
    "reserve": {201: None, 409: frozenset({"insufficient_stock"})},
    "confirm": {
        202: None,
        200: None,  # a repeat of a confirm that was answered 202 (a retry after 503)
        409: frozenset({"reservation_not_held"}),  # paid after the hold expired
        503: frozenset({"buffer_full"}),
    },
    "release": {200: None},
    "order": {
        202: None,
        200: None,
        409: frozenset({"insufficient_stock"}),
        503: frozenset({"buffer_full"}),
    },
    "stock-events": {200: None},
    "ops erp": {200: None},
    "ops limits": {200: None},
}

# 503s that must carry Retry-After (the gateway's back-pressure promise).
NEEDS_RETRY_AFTER: Final = frozenset({503})


def endpoint_of(name: str) -> str:
    """The contract endpoint of a Locust request name (``availability 20 skus @group`` ->
    ``availability``)."""
    for endpoint in sorted(ALLOWED, key=len, reverse=True):
        if name == endpoint or name.startswith(endpoint + " "):
            return endpoint
    return name


def allowed(endpoint: str, status: int, code: str) -> bool:
    codes = ALLOWED.get(endpoint, {}).get(status, frozenset())
    return code == "" if codes is None else code in codes
