"""The OpenAPI document (``gateway/http/openapi.yaml``) against a live gateway, with schemathesis.

Each operation is fuzzed twice on a real port: with schema-valid requests (which must be accepted
and answered as documented) and with schema-invalid ones (which must be rejected with a 4xx).
Every response must be documented, of the documented media type and match its schema, and none
may be a 5xx. Requests carry the key of the role the operation names in ``x-required-role``.
Reservation operations are fuzzed against seeded stock, a location group and reservations in
each state, so that holds, refusals and conflicts are met and not only unknown ids.

schemathesis sends with ``requests`` (blocking), so Hypothesis runs in a worker thread while the
server keeps serving on the test's event loop. Generation is derandomized: a run is repeatable.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import hypothesis
import msgspec
import orjson
import pytest
import requests
import schemathesis
from aiohttp.test_utils import TestServer
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import gateway.http
from gateway.app import create_app
from gateway.atp.schemas import MAX_QUANTITY, OCCURRED_AT_FLOOR
from gateway.atp.validation import DEFAULT_MAX_SKEW_SECONDS
from gateway.http.state import RESERVATIONS_SERVICE
from gateway.settings import Settings
from tests.conftest import KEYS, auth
from tests.helpers import at, event
from tests.served import GatewayTestServer

SPEC: Final = Path(gateway.http.__file__).with_name("openapi.yaml")
_TIMESTAMP: Final = msgspec.json.Decoder(datetime)
# Keys are sent by the tests, per role: cases carry no generated (or mutated) Authorization.
CONFIG: Final = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
SCHEMA: Final = schemathesis.openapi.from_path(SPEC, config=CONFIG)
MAX_EXAMPLES: Final = 50

CONFORMANCE: Final = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CHECKS: Final = {
    GenerationMode.POSITIVE: [*CONFORMANCE, positive_data_acceptance],
    GenerationMode.NEGATIVE: [*CONFORMANCE, negative_data_rejection],
}


def _operations() -> list[APIOperation]:
    return [result.ok() for result in SCHEMA.get_all_operations()]


def _role(operation: APIOperation) -> str | None:
    role = operation.definition.raw.get("x-required-role")
    assert role is None or role in KEYS, f"{operation.label}: unknown role {role!r}"
    return role


def _has_input(operation: APIOperation) -> bool:
    return bool(list(operation.iter_parameters())) or bool(list(operation.body))


OPERATIONS: Final = _operations()
AUTHENTICATED: Final = [op for op in OPERATIONS if _role(op) is not None]
FUZZ_CASES: Final = [
    pytest.param(op, mode, id=f"{op.label}-{mode.value}")
    for op in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or _has_input(op)
]


def _headers(operation: APIOperation) -> dict[str, str]:
    role = _role(operation)
    return auth(role) if role is not None else {}


def _one_place(case: Case) -> bool:
    """The rule OpenAPI cannot state: exactly one of ``location`` and ``location_group``."""
    query = case.query or {}
    return ("location" in query) != ("location_group" in query)


RESERVATIONS: Final = "/v1/reservations"
ORDERS: Final = "/v1/orders"  # its lines are a reservation's: the same fitting and seed
_ONE: Final = RESERVATIONS + "/{reservation_id}"
_EXTEND_PATH: Final = RESERVATIONS + "/{reservation_id}/extend"
# What reservation fuzzing runs against: stock of two SKUs (one plentiful, one scarce), a group
# and one reservation per state a path operation can meet.
SEED_STOCK: Final = {
    ("SKU-1", "L1"): MAX_QUANTITY,
    ("SKU-1", "L2"): MAX_QUANTITY,
    ("SKU-2", "L1"): 3,
    ("SKU-2", "L2"): 2,
}
# The SKUs the lines of a seeded case name, by line: plentiful stock only, or plentiful and scarce.
SEED_SKUS: Final = {"plentiful": ("SKU-1",), "mixed": ("SKU-1", "SKU-2")}
SEED_LOCATIONS: Final = ("L1", "L2")
SEED_GROUP: Final = "g1"
SEED_GROUP_MEMBERS: Final = ["L1", "L2", "L3"]
HELD, RELEASED, CONFIRMED = "seed-held", "seed-released", "seed-confirmed"


def _fit_reservation(case: Case, seeded: str | None) -> Case:
    """The rules OpenAPI cannot state: a group must exist, a SKU is once per place.

    Generated group names become the seeded group; with ``seeded`` (a key of ``SEED_SKUS``),
    lines also name seeded SKUs and locations, so that stock is there to hold (or, for the
    scarce SKU, to run short), and the id gets a suffix from the body, so that one id always
    comes with one body (a retry, never an ``idempotency_conflict``, which unseeded cases meet).
    """
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("lines"), list):
        return case
    skus = SEED_SKUS[seeded] if seeded else ()
    lines: list[dict[str, Any]] = []
    places: set[tuple[Any, ...]] = set()
    for i, generated in enumerate(body["lines"]):
        line = dict(generated)
        if skus:
            line["sku"] = skus[i % len(skus)]
        if line.get("location_group") is not None:
            line["location_group"] = SEED_GROUP
        elif skus:
            line["location"] = SEED_LOCATIONS[i // len(skus) % 2]
        place = (line["sku"], line.get("location"), line.get("location_group"))
        if place not in places:
            places.add(place)
            lines.append(line)
    body = {**body, "lines": lines}
    if skus:
        key = "reservation_id" if "reservation_id" in body else "order_id"
        rest = {name: value for name, value in body.items() if name != key}
        digest = hashlib.blake2b(repr(sorted(rest.items())).encode(), digest_size=4).hexdigest()
        body[key] = f"{body[key][:100]}#{digest}"
    case.body = body
    return case


def _with_reservation_id(case: Case, reservation_id: str | None) -> Case:
    """``case`` aimed at a seeded reservation (``None``: at its generated, likely unknown, id)."""
    if reservation_id is not None:
        case.path_parameters = {**case.path_parameters, "reservation_id": reservation_id}
    return case


def _fit_events(case: Case) -> Case:
    """The rule OpenAPI cannot state: ``occurred_at`` within the floor and the clock skew.

    A generated time outside them (most are: any year 0000-9999) becomes one inside; the
    generated form of those inside (offsets, fractions) is kept.
    """
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        return case
    latest = datetime.now(UTC) + timedelta(seconds=DEFAULT_MAX_SKEW_SECONDS - 60)
    events = []
    for generated in body["events"]:
        fitted = dict(generated)
        try:
            when = _TIMESTAMP.decode(orjson.dumps(generated.get("occurred_at")))
        except msgspec.ValidationError:
            when = None
        if when is not None and when.tzinfo is not None and not OCCURRED_AT_FLOOR <= when <= latest:
            fitted["occurred_at"] = at(0)
        events.append(fitted)
    case.body = {**body, "events": events}
    return case


def _strategy(operation: APIOperation, mode: GenerationMode) -> st.SearchStrategy[Case]:
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is not GenerationMode.POSITIVE:
        return strategy
    if operation.path == "/v1/stock-events":
        strategy = st.builds(_fit_events, strategy)
    elif operation.path == "/v1/availability":
        strategy = strategy.filter(_one_place)
    elif operation.path in (RESERVATIONS, ORDERS):
        strategy = st.builds(_fit_reservation, strategy, st.sampled_from([None, *SEED_SKUS]))
    elif operation.path.startswith(RESERVATIONS + "/"):
        seeded_ids = st.sampled_from([None, HELD, RELEASED, CONFIRMED])
        strategy = st.builds(_with_reservation_id, strategy, seeded_ids)
    return strategy


def _explore(
    strategy: st.SearchStrategy[Case],
    test: Callable[[Case, requests.Session], None],
    max_examples: int = MAX_EXAMPLES,
    *,
    shrink: bool = True,
) -> None:
    """Run ``test`` on up to ``max_examples`` cases (blocking: call it in a worker thread).

    Without ``shrink`` a failure is reported as found: for tests whose examples are costly.
    """
    phases = [p for p in hypothesis.Phase if shrink or p is not hypothesis.Phase.shrink]
    with requests.Session() as session:

        @hypothesis.settings(
            max_examples=max_examples,
            phases=phases,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=strategy)
        def explore(case: Case) -> None:
            test(case, session)

        explore()


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[TestServer]:
    """The gateway on a real loopback port, served as in production, for a client outside the
    event loop."""
    server = GatewayTestServer(create_app(settings))
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize(("operation", "mode"), FUZZ_CASES)
async def test_operation_conforms(
    server: TestServer, base_url: str, operation: APIOperation, mode: GenerationMode
) -> None:
    headers = _headers(operation)
    if operation.path.startswith((RESERVATIONS, ORDERS)):
        await _seed_reservations(server, base_url)

    def check(case: Case, session: requests.Session) -> None:
        case.call_and_validate(
            base_url=base_url, session=session, headers=headers, checks=CHECKS[mode]
        )

    await asyncio.to_thread(_explore, _strategy(operation, mode), check)


@pytest.mark.parametrize("operation", AUTHENTICATED, ids=lambda op: op.label)
async def test_keys_are_enforced(base_url: str, operation: APIOperation) -> None:
    """No key or an unknown key is a 401, a key of another role a 403: documented problems."""
    role = _role(operation)
    attempts: list[tuple[dict[str, str], int]] = [
        ({}, 401),
        ({"Authorization": "Bearer not-a-key"}, 401),
        ({"Authorization": KEYS[str(role)]}, 401),  # no "Bearer " scheme
        *((auth(other), 403) for other in KEYS if other != role),
    ]

    def check(case: Case, session: requests.Session) -> None:
        for headers, expected in attempts:
            response = case.call(base_url=base_url, session=session, headers=headers)
            assert response.status_code == expected, (headers, response.status_code, response.text)
            case.validate_response(response, checks=CONFORMANCE, headers=headers)

    await asyncio.to_thread(_explore, _strategy(operation, GenerationMode.POSITIVE), check, 5)


def _operation(method: str, path: str) -> APIOperation:
    return SCHEMA[path][method]


async def _send(base_url: str, case: Case, expected: int) -> Any:
    operation = case.operation
    response = await asyncio.to_thread(
        case.call_and_validate, base_url=base_url, headers=_headers(operation), checks=CONFORMANCE
    )
    assert response.status_code == expected, (
        f"expected {expected}, got {response.status_code} {response.text}\n"
        f"request: {case.as_curl_command(base_url=base_url)}"
    )
    return response.json()


def _path_id(reservation_id: str) -> str:
    """A reservation id as a path segment (a bare "." or ".." would be resolved away)."""
    if reservation_id in (".", ".."):
        return "%2E" * len(reservation_id)
    return quote(reservation_id, safe="")


def _reservation_case(method: str, path: str, reservation_id: str, **parts: Any) -> Case:
    path_parameters = {"reservation_id": _path_id(reservation_id)}
    return _operation(method, path).Case(path_parameters=path_parameters, **parts)


def _line(**changes: Any) -> dict[str, Any]:
    return {"sku": "SKU-1", "location": "L1", "quantity": 1, **changes}


def _reservation(**changes: Any) -> dict[str, Any]:
    """A valid reservation request (one line) with ``changes``."""
    return {"reservation_id": "r1", "lines": [_line()], **changes}


async def _seed_reservations(server: TestServer, base_url: str) -> None:
    """Stock, a group, and a held, a released and a confirmed reservation."""
    events = [
        event(f"seed-{sku}-{location}", "snapshot", quantity, 0, sku=sku, location=location)
        for (sku, location), quantity in SEED_STOCK.items()
    ]
    feed = _operation("POST", "/v1/stock-events")
    await _send(base_url, feed.Case(body={"events": events}), 200)
    put_group = _operation("PUT", "/v1/location-groups/{group}")
    case = put_group.Case(
        path_parameters={"group": SEED_GROUP}, body={"locations": SEED_GROUP_MEMBERS}
    )
    await _send(base_url, case, 200)
    reserve = _operation("POST", RESERVATIONS)
    for rid in (HELD, RELEASED, CONFIRMED):
        await _send(base_url, reserve.Case(body=_reservation(reservation_id=rid)), 201)
    await _send(base_url, _reservation_case("DELETE", _ONE, RELEASED), 200)
    assert await server.app[RESERVATIONS_SERVICE].confirm(CONFIRMED) == "confirmed"


async def test_seeded_responses_conform(base_url: str) -> None:
    """Responses with data behind them (fuzzing mostly meets unknown groups) match the schemas."""
    feed = _operation("POST", "/v1/stock-events")
    events = [
        event("s1", "snapshot", 40, 0, location="L1"),
        event("s2", "snapshot", 5, 0, location="L2"),
        event("a1", "adjustment", -50, 1, location="L1"),
        event("s3", "snapshot", 7, 0, sku="SKU-2", location="L1", source=None),
    ]
    result = await _send(base_url, feed.Case(body={"events": events}), 200)
    assert result == {"applied": 4, "duplicate": 0, "stale": 0}

    put_group = _operation("PUT", "/v1/location-groups/{group}")
    case = put_group.Case(path_parameters={"group": "g1"}, body={"locations": ["L1", "L2", "L3"]})
    await _send(base_url, case, 200)
    safety = _operation("PUT", "/v1/safety-stock")
    body = {
        "items": [
            {"location": "L2", "quantity": 1},
            {"location": "L1", "sku": "SKU-2", "quantity": 2},
        ]
    }
    assert await _send(base_url, safety.Case(body=body), 200) == {"updated": 2}

    get_group = _operation("GET", "/v1/location-groups/{group}")
    group = await _send(base_url, get_group.Case(path_parameters={"group": "g1"}), 200)
    assert group == {"group": "g1", "locations": ["L1", "L2", "L3"]}

    availability = _operation("GET", "/v1/availability")
    at_l1 = await _send(
        base_url, availability.Case(query={"sku": ["SKU-1", "SKU-2"], "location": "L1"}), 200
    )
    assert [(i["on_hand"], i["available"]) for i in at_l1["items"]] == [(-10, 0), (7, 5)]
    in_g1 = await _send(
        base_url, availability.Case(query={"sku": ["SKU-1"], "location_group": "g1"}), 200
    )
    assert in_g1["items"][0]["available"] == 4


@pytest.mark.parametrize(
    "query",
    [
        {"sku": ["SKU-1"]},
        {"sku": ["SKU-1"], "location": "L1", "location_group": "g1"},
        {"sku": ["SKU-1"], "location": "L1", "warehouse": "L2"},
    ],
    ids=["no-place", "both-places", "unknown-parameter"],
)
async def test_availability_rules_beyond_the_schema(base_url: str, query: dict[str, Any]) -> None:
    availability = _operation("GET", "/v1/availability")
    problem = await _send(base_url, availability.Case(query=query), 422)
    assert problem["code"] == "validation_error"


async def test_seeded_reservations_conform(server: TestServer, base_url: str) -> None:
    """Every documented reservation outcome, each checked against its schema."""
    await _seed_reservations(server, base_url)
    reserve = _operation("POST", RESERVATIONS)
    lines = [_line(quantity=3), _line(sku="SKU-2", location=None, location_group=SEED_GROUP)]
    body = _reservation(reservation_id="r-ok", lines=lines, ttl_seconds=60, channel="web")
    held = await _send(base_url, reserve.Case(body=body), 201)
    assert held["status"] == "held"
    assert held["lines"] == [
        {"sku": "SKU-1", "location": "L1", "quantity": 3},
        {"sku": "SKU-2", "location": "L1", "quantity": 1},
    ]
    assert await _send(base_url, reserve.Case(body=body), 201) == held  # an idempotent retry
    conflict = await _send(base_url, reserve.Case(body={**body, "channel": "app"}), 409)
    assert conflict["code"] == "idempotency_conflict"

    short_lines = [
        _line(),
        _line(sku="SKU-2", location="L2", quantity=3),
        _line(sku="SKU-2", location=None, location_group=SEED_GROUP, quantity=5),
    ]
    short = await _send(
        base_url, reserve.Case(body=_reservation(reservation_id="r-short", lines=short_lines)), 409
    )
    assert (short["code"], short["reservation_id"]) == ("insufficient_stock", "r-short")
    assert short["lines"] == [
        {"sku": "SKU-2", "location": "L2", "requested": 3, "available": 2},
        {"sku": "SKU-2", "location_group": SEED_GROUP, "requested": 5, "available": 4},
    ]
    assert (await _send(base_url, _reservation_case("GET", _ONE, "r-short"), 404))[
        "reservation_id"
    ] == "r-short"

    assert await _send(base_url, _reservation_case("GET", _ONE, "r-ok"), 200) == held
    extend = _reservation_case("POST", _EXTEND_PATH, "r-ok", body={"ttl_seconds": 3600})
    extended = await _send(base_url, extend, 200)
    assert extended["status"] == "held"
    assert extended["expires_at"] > held["expires_at"]
    released = await _send(base_url, _reservation_case("DELETE", _ONE, "r-ok"), 200)
    assert released["status"] == "released"
    assert (await _send(base_url, extend, 409))["code"] == "not_held"
    confirmed = await _send(base_url, _reservation_case("DELETE", _ONE, CONFIRMED), 409)
    assert confirmed["code"] == "already_confirmed"
    for method, path in [("GET", _ONE), ("DELETE", _ONE), ("POST", _EXTEND_PATH)]:
        parts = {"body": {"ttl_seconds": 5}} if method == "POST" else {}
        missing = await _send(base_url, _reservation_case(method, path, "nope", **parts), 404)
        assert (missing["code"], missing["reservation_id"]) == ("not_found", "nope")


def _round_trip(base_url: str, session: requests.Session, reservation_id: str) -> None:
    """Reserve under ``reservation_id``, then read, extend and release it by its path."""
    headers = auth("storefront")

    def send(case: Case, expected: int) -> Any:
        response = case.call_and_validate(
            base_url=base_url, session=session, headers=headers, checks=CONFORMANCE
        )
        assert response.status_code == expected, (
            f"{reservation_id!r}: expected {expected}, got {response.status_code} "
            f"{response.text}\nrequest: {case.as_curl_command(base_url=base_url)}"
        )
        return response.json()

    body = _reservation(reservation_id=reservation_id)
    assert send(_operation("POST", RESERVATIONS).Case(body=body), 201)["status"] == "held"
    got = send(_reservation_case("GET", _ONE, reservation_id), 200)
    assert (got["reservation_id"], got["status"]) == (reservation_id, "held")
    extend = _reservation_case("POST", _EXTEND_PATH, reservation_id, body={"ttl_seconds": 60})
    assert send(extend, 200)["reservation_id"] == reservation_id
    released = send(_reservation_case("DELETE", _ONE, reservation_id), 200)
    assert (released["reservation_id"], released["status"]) == (reservation_id, "released")


async def test_any_reservation_id_round_trips(server: TestServer, base_url: str) -> None:
    """An id the schema allows in the body also works as the path of every later call."""
    await _seed_reservations(server, base_url)
    # A reservation is made once: a repeated id (Hypothesis replays and shrinks) gets its first
    # outcome again instead of a second round trip against the first one's leftovers.
    outcomes: dict[str, str | None] = {}

    def check(case: Case, session: requests.Session) -> None:
        reservation_id = case.body["reservation_id"]
        if reservation_id not in outcomes:
            try:
                _round_trip(base_url, session, reservation_id)
                outcomes[reservation_id] = None
            except AssertionError as exc:
                outcomes[reservation_id] = str(exc)
        failure = outcomes[reservation_id]
        assert failure is None, failure

    # Each example is four requests: unshrunk, a failure stays within the file's time budget
    # (TRICKY_IDS below holds minimal failing ids).
    reserve = _operation("POST", RESERVATIONS).as_strategy(generation_mode=GenerationMode.POSITIVE)
    await asyncio.to_thread(_explore, reserve, check, 30, shrink=False)


# Ids the schema allows that are awkward in a path: delimiters, dot segments, "%", "+", spaces,
# braces, non-ASCII, and characters that are neither C0/C1 controls nor printable to Python.
TRICKY_IDS: Final = {
    "slash": "a/b",
    "percent-2F": "%2F",
    "dot": ".",
    "dot-dot": "..",
    "plus": "a+b",
    "space": "a b",
    "query-fragment": "?#&=",
    "braces": "a{b}",
    "non-ascii": "Bestellung-ü-日本",
    "no-break-space": "a\u00a0b",
    "zero-width-space": "a\u200bb",
}


@pytest.mark.parametrize("reservation_id", TRICKY_IDS.values(), ids=TRICKY_IDS.keys())
async def test_tricky_reservation_ids_round_trip(
    server: TestServer, base_url: str, reservation_id: str
) -> None:
    await _seed_reservations(server, base_url)

    def round_trip() -> None:
        with requests.Session() as session:
            _round_trip(base_url, session, reservation_id)

    await asyncio.to_thread(round_trip)


def _events(**changes: Any) -> dict[str, Any]:
    """A one-event batch: a valid snapshot with ``changes``."""
    return {"events": [{**event("e1", "snapshot", 5, 0), **changes}]}


def _invalid(target: tuple[str, str, str], case_id: str, expected: int = 422, **parts: Any) -> Any:
    method, path, name = target
    return pytest.param(method, path, parts, expected, id=f"{name}-{case_id}")


_STOCK: Final = ("POST", "/v1/stock-events", "stock-events")
_AVAILABILITY: Final = ("GET", "/v1/availability", "availability")
_GROUP: Final = ("PUT", "/v1/location-groups/{group}", "location-group")
_SAFETY: Final = ("PUT", "/v1/safety-stock", "safety-stock")
_RESERVE: Final = ("POST", RESERVATIONS, "reservations")
_GET_ONE: Final = ("GET", _ONE, "reservation")
_RELEASE: Final = ("DELETE", _ONE, "release")
_EXTEND: Final = ("POST", _EXTEND_PATH, "extend")
_ONE_EVENT: Final = _events()["events"]


def _rid(reservation_id: str) -> dict[str, str]:
    return {"reservation_id": _path_id(reservation_id)}


# Inputs the schema forbids, each with the status it must get; hand-picked where random
# generation rarely lands: bounds, the rules of event types, timestamps that are not RFC 3339
# strings, codes and ids that end in a newline (which `$` lets through in Python's `re`), lines
# with both, neither or null places, and the reservation rules the schema states only in prose
# (a SKU once per place, groups that exist).
INVALID: Final = [
    _invalid(_STOCK, "events-empty", body={"events": []}),
    _invalid(_STOCK, "events-1001", body={"events": _ONE_EVENT * 1001}),
    _invalid(_STOCK, "over-1MiB", 413, body={"events": _events(source="x" * 128)["events"] * 4000}),
    _invalid(_STOCK, "snapshot-negative", body=_events(quantity=-1)),
    _invalid(_STOCK, "adjustment-zero", body=_events(type="adjustment", quantity=0)),
    _invalid(_STOCK, "quantity-over-max", body=_events(quantity=MAX_QUANTITY + 1)),
    _invalid(
        _STOCK, "adjustment-under-min", body=_events(type="adjustment", quantity=-MAX_QUANTITY - 1)
    ),
    _invalid(_STOCK, "occurred-at-2062", body=_events(occurred_at="2062-01-01T00:00:00Z")),
    _invalid(_STOCK, "occurred-at-1999", body=_events(occurred_at="1999-12-31T23:59:59Z")),
    _invalid(_STOCK, "occurred-at-no-offset", body=_events(occurred_at="2025-01-01T00:00:00")),
    _invalid(_STOCK, "occurred-at-integer", body=_events(occurred_at=1700000000)),
    _invalid(_STOCK, "occurred-at-digits", body=_events(occurred_at="1700000000")),
    _invalid(_STOCK, "sku-newline", body=_events(sku="SKU-1\n")),
    _invalid(_STOCK, "event-id-newline", body=_events(event_id="e1\n")),
    _invalid(_AVAILABILITY, "skus-101", query={"sku": ["S"] * 101, "location": "L1"}),
    _invalid(_AVAILABILITY, "location-65", query={"sku": ["S"], "location": "L" * 65}),
    _invalid(_AVAILABILITY, "sku-newline", query={"sku": ["SKU-1\n"], "location": "L1"}),
    _invalid(
        _GROUP,
        "duplicate-location",
        path_parameters={"group": "g1"},
        body={"locations": ["L1", "L1"]},
    ),
    _invalid(
        _GROUP, "group-newline", path_parameters={"group": "g1\n"}, body={"locations": ["L1"]}
    ),
    _invalid(
        _GROUP, "location-newline", path_parameters={"group": "g1"}, body={"locations": ["L1\n"]}
    ),
    _invalid(_SAFETY, "quantity-negative", body={"items": [{"location": "L1", "quantity": -1}]}),
    _invalid(
        _SAFETY,
        "quantity-over-max",
        body={"items": [{"location": "L1", "quantity": MAX_QUANTITY + 1}]},
    ),
    _invalid(_SAFETY, "location-newline", body={"items": [{"location": "L1\n", "quantity": 1}]}),
    _invalid(_RESERVE, "id-empty", body=_reservation(reservation_id="")),
    _invalid(_RESERVE, "id-129", body=_reservation(reservation_id="r" * 129)),
    _invalid(_RESERVE, "id-newline", body=_reservation(reservation_id="r1\n")),
    _invalid(_RESERVE, "id-c1-control", body=_reservation(reservation_id="r\x85")),
    _invalid(_RESERVE, "id-missing", body={"lines": [_line()]}),
    _invalid(_RESERVE, "lines-empty", body=_reservation(lines=[])),
    _invalid(
        _RESERVE,
        "lines-101",
        body=_reservation(lines=[_line(sku=f"S{i}") for i in range(101)]),
    ),
    _invalid(_RESERVE, "line-no-place", body=_reservation(lines=[{"sku": "SKU-1", "quantity": 1}])),
    _invalid(_RESERVE, "line-null-places", body=_reservation(lines=[_line(location=None)])),
    _invalid(_RESERVE, "line-both-places", body=_reservation(lines=[_line(location_group="g1")])),
    _invalid(_RESERVE, "line-twice", body=_reservation(lines=[_line(), _line(quantity=2)])),
    _invalid(
        _RESERVE,
        "group-line-twice",
        body=_reservation(lines=[_line(location=None, location_group="g1")] * 2),
    ),
    _invalid(
        _RESERVE,
        "group-unknown",
        body=_reservation(lines=[_line(location=None, location_group="x")]),
    ),
    _invalid(_RESERVE, "quantity-zero", body=_reservation(lines=[_line(quantity=0)])),
    _invalid(_RESERVE, "quantity-over-max", body=_reservation(lines=[_line(quantity=10**9 + 1)])),
    _invalid(_RESERVE, "quantity-fraction", body=_reservation(lines=[_line(quantity=1.5)])),
    _invalid(_RESERVE, "sku-newline", body=_reservation(lines=[_line(sku="SKU-1\n")])),
    _invalid(_RESERVE, "location-65", body=_reservation(lines=[_line(location="L" * 65)])),
    _invalid(_RESERVE, "line-unknown-field", body=_reservation(lines=[_line(note="x")])),
    _invalid(_RESERVE, "ttl-zero", body=_reservation(ttl_seconds=0)),
    _invalid(_RESERVE, "ttl-over-max", body=_reservation(ttl_seconds=3601)),
    _invalid(_RESERVE, "channel-65", body=_reservation(channel="c" * 65)),
    _invalid(_RESERVE, "unknown-field", body=_reservation(customer="c1")),
    _invalid(_RESERVE, "over-1MiB", 413, body=_reservation(channel="c" * (1 << 20))),
    _invalid(_GET_ONE, "id-129", path_parameters=_rid("r" * 129)),
    _invalid(_GET_ONE, "id-newline", path_parameters=_rid("r1\n")),
    _invalid(_RELEASE, "id-129", path_parameters=_rid("r" * 129)),
    _invalid(_RELEASE, "id-del", path_parameters=_rid("r\x7f")),
    _invalid(_EXTEND, "id-129", path_parameters=_rid("r" * 129), body={"ttl_seconds": 1}),
    _invalid(_EXTEND, "ttl-zero", path_parameters=_rid("r1"), body={"ttl_seconds": 0}),
    _invalid(_EXTEND, "ttl-over-max", path_parameters=_rid("r1"), body={"ttl_seconds": 3601}),
    _invalid(_EXTEND, "ttl-null", path_parameters=_rid("r1"), body={"ttl_seconds": None}),
    _invalid(_EXTEND, "ttl-missing", path_parameters=_rid("r1"), body={}),
    _invalid(_EXTEND, "unknown-field", path_parameters=_rid("r1"), body={"ttl_seconds": 1, "x": 1}),
    _invalid(
        _EXTEND,
        "over-1MiB",
        413,
        path_parameters=_rid("r1"),
        body={"ttl_seconds": 1, "pad": "x" * (1 << 20)},
    ),
]


@pytest.mark.parametrize(("method", "path", "parts", "expected"), INVALID)
async def test_invalid_input_is_rejected(
    base_url: str, method: str, path: str, parts: dict[str, Any], expected: int
) -> None:
    """Rejected with the documented status and a conforming problem (a 422 lists its errors)."""
    await _send(base_url, _operation(method, path).Case(**parts), expected)


# Every operation that takes a body, with a valid one.
BODIES: Final = [
    pytest.param(_STOCK, {}, _events(), id="stock-events"),
    pytest.param(_GROUP, {"group": "g1"}, {"locations": ["L1"]}, id="location-group"),
    pytest.param(_SAFETY, {}, {"items": [{"location": "L1", "quantity": 1}]}, id="safety-stock"),
    pytest.param(_RESERVE, {}, _reservation(), id="reservations"),
    pytest.param(_EXTEND, _rid("r1"), {"ttl_seconds": 60}, id="extend"),
]
# Wire-level refusals (not what a schema generates): the headers, the raw body, the answer.
WIRE: Final = {
    "text-plain": ({"Content-Type": "text/plain"}, None, 415, "unsupported_media_type"),
    "form": (
        {"Content-Type": "application/x-www-form-urlencoded"},
        None,
        415,
        "unsupported_media_type",
    ),
    "gzip-not-gzip": ({"Content-Encoding": "gzip"}, None, 400, "bad_encoding"),
    "deflate-not-deflate": ({"Content-Encoding": "deflate"}, None, 400, "bad_encoding"),
    "br": ({"Content-Encoding": "br"}, None, 415, "unsupported_media_type"),
    "gzip-truncated": (
        {"Content-Encoding": "gzip"},
        lambda body: gzip.compress(body)[:-9],
        400,
        "bad_encoding",
    ),
}


@pytest.mark.parametrize("wire", WIRE.values(), ids=WIRE.keys())
@pytest.mark.parametrize(("target", "path_parameters", "body"), BODIES)
async def test_wire_refusals_are_documented(
    base_url: str,
    target: tuple[str, str, str],
    path_parameters: dict[str, str],
    body: Any,
    wire: tuple[dict[str, str], Callable[[bytes], bytes] | None, int, str],
) -> None:
    """A body of another type or a bad encoding: the documented problem, nothing changed."""
    method, path, _ = target
    operation = _operation(method, path)
    case = operation.Case(path_parameters=path_parameters, body=body)
    extra, encode, expected, code = wire
    raw = orjson.dumps(body)
    headers = {"Content-Type": "application/json", **_headers(operation), **extra}
    url = base_url + path.format(**path_parameters)

    def send() -> requests.Response:
        data = encode(raw) if encode else raw
        return requests.request(method, url, data=data, headers=headers, timeout=10)

    response = await asyncio.to_thread(send)
    assert (response.status_code, response.json()["code"]) == (expected, code), response.text
    case.validate_response(response, checks=CONFORMANCE)
    if expected == 415 and "Content-Encoding" in extra:
        assert response.headers["Accept-Encoding"] == "gzip, deflate"
