"""The OpenAPI document (``gateway/http/openapi.yaml``) against a live gateway, with schemathesis.

Each operation is fuzzed twice on a real port: with schema-valid requests (which must be accepted
and answered as documented) and with schema-invalid ones (which must be rejected with a 4xx).
Every response must be documented, of the documented media type and match its schema, and none
may be a 5xx. Requests carry the key of the role the operation names in ``x-required-role``.

schemathesis sends with ``requests`` (blocking), so Hypothesis runs in a worker thread while the
server keeps serving on the test's event loop. Generation is derandomized: a run is repeatable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import hypothesis
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
from gateway.settings import Settings
from tests.conftest import KEYS, auth
from tests.helpers import event

SPEC: Final = Path(gateway.http.__file__).with_name("openapi.yaml")
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


def _strategy(operation: APIOperation, mode: GenerationMode) -> st.SearchStrategy[Case]:
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE and operation.path == "/v1/availability":
        strategy = strategy.filter(_one_place)
    return strategy


def _explore(
    strategy: st.SearchStrategy[Case],
    test: Callable[[Case, requests.Session], None],
    max_examples: int = MAX_EXAMPLES,
) -> None:
    """Run ``test`` on up to ``max_examples`` cases (blocking: call it in a worker thread)."""
    with requests.Session() as session:

        @hypothesis.settings(
            max_examples=max_examples,
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
async def base_url(settings: Settings) -> AsyncIterator[str]:
    """The gateway on a real loopback port, for a client outside the event loop."""
    server = TestServer(create_app(settings))
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.mark.parametrize(("operation", "mode"), FUZZ_CASES)
async def test_operation_conforms(
    base_url: str, operation: APIOperation, mode: GenerationMode
) -> None:
    headers = _headers(operation)

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
_ONE_EVENT: Final = _events()["events"]

# Inputs the schema forbids, each with the status it must get; hand-picked where random
# generation rarely lands: bounds, the rules of event types, timestamps that are not RFC 3339
# strings, and codes that end in a newline (which `$` lets through in Python's `re`).
INVALID: Final = [
    _invalid(_STOCK, "events-empty", body={"events": []}),
    _invalid(_STOCK, "events-1001", body={"events": _ONE_EVENT * 1001}),
    _invalid(_STOCK, "over-1MiB", 413, body={"events": _events(source="x" * 128)["events"] * 4000}),
    _invalid(_STOCK, "snapshot-negative", body=_events(quantity=-1)),
    _invalid(_STOCK, "adjustment-zero", body=_events(type="adjustment", quantity=0)),
    _invalid(_STOCK, "quantity-over-max", body=_events(quantity=10**12 + 1)),
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
    _invalid(_SAFETY, "location-newline", body={"items": [{"location": "L1\n", "quantity": 1}]}),
]


@pytest.mark.parametrize(("method", "path", "parts", "expected"), INVALID)
async def test_invalid_input_is_rejected(
    base_url: str, method: str, path: str, parts: dict[str, Any], expected: int
) -> None:
    """Rejected with the documented status and a conforming problem (a 422 lists its errors)."""
    await _send(base_url, _operation(method, path).Case(**parts), expected)
