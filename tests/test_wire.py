"""Bad wire input as a hostile or clumsy client sends it, against the gateway served as in
production (``GatewayRunner``): slow and vanishing bodies, bodies that are not what their
headers say, requests the HTTP parser refuses. Each is a problem with an ``X-Request-ID`` (or,
for a client that is gone, a count apart), never a 500 and never a change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import zlib
from collections.abc import AsyncIterator
from typing import Any, Final

import attrs
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from prometheus_client import REGISTRY

from gateway.app import create_app
from gateway.http.wire import GatewayRunner, ProblemRequestHandler, ProblemServer
from gateway.settings import Settings
from tests.conftest import KEYS, auth
from tests.gateway_proc import GatewayProcess
from tests.served import GatewayTestServer

BODY_TIMEOUT: Final = 0.5
RESERVATION: Final = orjson.dumps(
    {"reservation_id": "w1", "lines": [{"sku": "SKU-1", "location": "L1", "quantity": 1}]}
)
Response = tuple[int, dict[str, str], bytes]


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[GatewayTestServer]:
    server = GatewayTestServer(
        create_app(dataclasses.replace(settings, body_timeout_seconds=BODY_TIMEOUT))
    )
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def wire_client(served: GatewayTestServer) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(served) as client:
        yield client


def head(method: str, path: str, *lines: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: gw", *lines, "", ""]).encode()


async def read_response(reader: asyncio.StreamReader) -> Response:
    status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in filter(None, lines):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def exchange(host: str, port: int, raw: bytes, *, closes: bool = True) -> Response:
    """Send raw bytes and read the answer; with ``closes``, the gateway must then close."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        response = await asyncio.wait_for(read_response(reader), 5)
        if closes:
            assert await asyncio.wait_for(reader.read(1), 5) == b""
        return response
    finally:
        writer.close()


def assert_problem(response: Response, status: int, code: str) -> dict[str, Any]:
    got, headers, body = response
    problem = orjson.loads(body)
    assert (got, problem["code"]) == (status, code), body
    assert headers["content-type"] == "application/problem+json"
    assert headers["x-request-id"] == problem["request_id"]
    return dict(problem)


def requests_counted(route: str, method: str, status: int) -> float:
    labels = {"route": route, "method": method, "status": str(status)}
    return REGISTRY.get_sample_value("gateway_http_requests_total", labels) or 0.0


async def nothing_reserved(redis: aioredis.Redis) -> bool:
    return [k async for k in redis.scan_iter(match="atp:rsv:*")] == []


# --- slow and vanishing clients -----------------------------------------------------------


async def test_slow_body_is_408_and_the_connection_closes(
    served: GatewayTestServer, redis: aioredis.Redis
) -> None:
    """A body sent too slowly: 408 at the deadline, then the connection closes at once (not
    after aiohttp's 10 s of reading and discarding the rest), so slow clients hold nothing."""
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        raw = head(
            "POST",
            "/v1/reservations",
            f"Authorization: Bearer {KEYS['storefront']}",
            "Content-Type: application/json",
            f"Content-Length: {len(RESERVATION)}",
        )
        writer.write(raw + RESERVATION[:10])
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await asyncio.wait_for(read_response(reader), BODY_TIMEOUT + 5)
        writer.write(RESERVATION[10:11])  # still trickling in: it changes nothing
        assert await asyncio.wait_for(reader.read(1), 2) == b""
        elapsed = loop.time() - started
    finally:
        writer.close()
    problem = assert_problem(response, 408, "request_timeout")
    assert problem["status"] == 408
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + 1.5
    assert await nothing_reserved(redis)


async def test_client_gone_mid_body_is_counted_apart(
    served: GatewayTestServer, redis: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hanging up mid-body is the client's doing: 499 in the metrics, a debug line, no 500."""
    route = ("/v1/reservations", "POST")
    gone, failed = requests_counted(*route, 499), requests_counted(*route, 500)
    for _ in range(3):
        _, writer = await asyncio.open_connection(served.host, served.port)
        writer.write(
            head(
                "POST",
                "/v1/reservations",
                f"Authorization: Bearer {KEYS['storefront']}",
                "Content-Type: application/json",
                f"Content-Length: {len(RESERVATION)}",
            )
            + RESERVATION[:10]
        )
        await writer.drain()
        await asyncio.sleep(0.1)  # the handler is reading the body
        writer.close()
    for _ in range(100):
        if requests_counted(*route, 499) == gone + 3:
            break
        await asyncio.sleep(0.02)
    assert requests_counted(*route, 499) == gone + 3
    assert requests_counted(*route, 500) == failed
    logged = capsys.readouterr().out
    assert "unhandled_error" not in logged
    assert "client_gone" in logged
    assert await nothing_reserved(redis)


async def trickle(writer: asyncio.StreamWriter, raw: bytes, every: float) -> None:
    """Send ``raw`` a byte at a time, until the gateway closes the connection."""
    for byte in raw:
        writer.write(bytes([byte]))
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every)


async def test_slow_headers_are_408_and_the_connection_closes(
    served: GatewayTestServer,
) -> None:
    """Headers a byte every 0.2 s: 408 within the deadline of their first byte, then closed
    (aiohttp has no header timeout: this connection stayed open for an hour)."""
    counted = requests_counted("unparsed", "UNKNOWN", 408)
    reader, writer = await asyncio.open_connection(served.host, served.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    sending = asyncio.create_task(trickle(writer, head("GET", "/healthz", "X-A: b"), 0.2))
    try:
        response = await asyncio.wait_for(read_response(reader), BODY_TIMEOUT + 2)
        assert await asyncio.wait_for(reader.read(1), 2) == b""
        elapsed = loop.time() - started
    finally:
        sending.cancel()
        writer.close()
    problem = assert_problem(response, 408, "request_timeout")
    assert "headers" in problem["detail"]
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + 1
    assert requests_counted("unparsed", "UNKNOWN", 408) == counted + 1


async def test_slow_headers_after_a_keep_alive_request_are_408(
    served: GatewayTestServer,
) -> None:
    """The same on a connection that already served a request: the deadline counts from the
    first byte of the late request."""
    reader, writer = await asyncio.open_connection(served.host, served.port)
    sending: asyncio.Task[None] | None = None
    try:
        writer.write(head("GET", "/healthz"))
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        await asyncio.sleep(BODY_TIMEOUT * 1.5)  # idle first: not counted
        started = asyncio.get_running_loop().time()
        sending = asyncio.create_task(trickle(writer, head("GET", "/healthz"), 0.2))
        response = await asyncio.wait_for(read_response(reader), BODY_TIMEOUT + 2)
        assert await asyncio.wait_for(reader.read(1), 2) == b""
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        if sending is not None:
            sending.cancel()
        writer.close()
    assert_problem(response, 408, "request_timeout")
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + 1


async def test_idle_keep_alive_connections_stay_open(served: GatewayTestServer) -> None:
    """The header deadline bounds a request under way, never a connection waiting for one:
    idle after opening, idle between requests, and after headers that came in pieces in time."""
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        await asyncio.sleep(BODY_TIMEOUT * 2)
        writer.write(head("GET", "/healthz"))
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        await asyncio.sleep(BODY_TIMEOUT * 2)
        raw = head("GET", "/healthz")
        writer.write(raw[:10])  # the deadline is armed...
        await asyncio.sleep(BODY_TIMEOUT / 3)
        writer.write(raw[10:])  # ...and disarmed by headers complete in time
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        await asyncio.sleep(BODY_TIMEOUT * 2)
        writer.write(head("GET", "/healthz"))
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        assert not reader.at_eof()
    finally:
        writer.close()


async def test_keep_alive_client_is_unaffected(
    served: GatewayTestServer, wire_client: TestClient[Any, Any]
) -> None:
    """A client library reusing its connection across pauses longer than the deadline."""
    timeouts = requests_counted("unparsed", "UNKNOWN", 408)
    for _ in range(3):
        resp = await wire_client.get("/healthz")
        assert resp.status == 200
        await resp.read()
        await asyncio.sleep(BODY_TIMEOUT * 1.5)
    assert served.runner is not None
    assert served.runner.server is not None
    assert len(served.runner.server.connections) == 1  # one connection, kept alive
    assert requests_counted("unparsed", "UNKNOWN", 408) == timeouts


async def test_the_runner_serves_with_the_gateway_protocol(served: GatewayTestServer) -> None:
    """What ``GatewayRunner`` relies on of aiohttp's internals (see gateway/http/wire.py): if
    an aiohttp upgrade changes it, this fails here rather than the behaviour failing quietly."""
    runner = served.runner
    assert isinstance(runner, GatewayRunner)
    server = runner.server
    assert isinstance(server, ProblemServer)
    # The arguments AppRunner collected reach every connection's protocol.
    assert server._kwargs["auto_decompress"] is False
    protocol = server()
    assert isinstance(protocol, ProblemRequestHandler)
    assert protocol._header_timeout == BODY_TIMEOUT
    assert protocol.keepalive_timeout == server._kwargs.get("keepalive_timeout", 3630)
    assert not server.handler_cancellation
    # The protocol state the header deadline reads and the error path it queues into.
    for name in ("_waiter", "_messages", "_request_count", "_close", "_force_close"):
        assert name in RequestHandler.__slots__, name
    assert [f.name for f in attrs.fields(_ErrInfo)] == ["status", "exc", "message"]


# --- content type and encoding --------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",  # what curl -d sends
        "application/octet-stream",
        "application/json; charset=latin-1",
        "application/jsonx",
        "text/json",
    ],
)
async def test_bodies_of_another_type_are_415(
    wire_client: TestClient[Any, Any], redis: aioredis.Redis, content_type: str
) -> None:
    resp = await wire_client.post(
        "/v1/reservations",
        data=RESERVATION,
        headers={**auth("storefront"), "Content-Type": content_type},
    )
    assert resp.status == 415, await resp.text()
    assert (await resp.json())["code"] == "unsupported_media_type"
    assert resp.headers["X-Request-ID"]
    assert await nothing_reserved(redis)


@pytest.mark.parametrize(
    "content_type",
    [
        None,  # no claim: read as the only type the API takes
        "application/json",
        "application/json; charset=UTF-8",
        'Application/JSON; charset="utf-8"',
        "application/merge-patch+json",
    ],
)
async def test_json_bodies_are_taken(
    wire_client: TestClient[Any, Any], content_type: str | None
) -> None:
    resp = await wire_client.put(
        "/v1/location-groups/g",
        data=b'{"locations": ["L1"]}',
        headers=auth("ops") | ({"Content-Type": content_type} if content_type else {}),
        skip_auto_headers=["Content-Type"],
    )
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("identity", lambda body: body),
        ("GZip ", gzip.compress),
    ],
)
async def test_encoded_bodies_are_decoded(
    wire_client: TestClient[Any, Any], encoding: str, encode: Any
) -> None:
    resp = await wire_client.put(
        "/v1/location-groups/g",
        data=encode(b'{"locations": ["L1", "L2"]}'),
        headers={**auth("ops"), "Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["locations"] == ["L1", "L2"]


@pytest.mark.parametrize(
    ("encoding", "body", "status", "code"),
    [
        ("gzip", RESERVATION, 400, "bad_encoding"),  # was a 500
        ("deflate", RESERVATION, 400, "bad_encoding"),  # was a text/plain 400
        ("gzip", gzip.compress(RESERVATION)[:-8], 400, "bad_encoding"),  # truncated
        ("gzip", gzip.compress(RESERVATION) + b"junk", 400, "bad_encoding"),
        ("deflate", zlib.compress(RESERVATION, wbits=-15), 400, "bad_encoding"),  # raw deflate
        ("br", RESERVATION, 415, "unsupported_media_type"),  # was a text/plain 400
        ("compress", RESERVATION, 415, "unsupported_media_type"),
        ("gzip, gzip", gzip.compress(gzip.compress(RESERVATION)), 415, "unsupported_media_type"),
        # 1 KiB that inflates past 1 MiB: refused without inflating the rest.
        ("gzip", gzip.compress(b" " * (2 << 20) + RESERVATION), 413, "payload_too_large"),
    ],
    ids=[
        "gzip-plain",
        "deflate-plain",
        "truncated",
        "trailing",
        "raw-deflate",
        "br",
        "compress",
        "stacked",
        "bomb",
    ],
)
async def test_bad_encodings_are_problems(
    wire_client: TestClient[Any, Any],
    redis: aioredis.Redis,
    encoding: str,
    body: bytes,
    status: int,
    code: str,
) -> None:
    resp = await wire_client.post(
        "/v1/reservations",
        data=body,
        headers={
            **auth("storefront"),
            "Content-Type": "application/json",
            "Content-Encoding": encoding,
            "X-Request-ID": "enc-1",
        },
    )
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert (problem["code"], problem["request_id"]) == (code, "enc-1")
    assert resp.headers["X-Request-ID"] == "enc-1"
    if status == 415:
        assert resp.headers["Accept-Encoding"] == "gzip, deflate"
    assert await nothing_reserved(redis)


# --- requests the HTTP parser refuses --------------------------------------------------------

PARSER_ERRORS: Final = {
    "header-too-long": head("GET", "/healthz", "X-Request-ID: mine", "X-Big: " + "a" * 9000),
    "bad-chunk": head(
        "POST",
        "/v1/reservations",
        f"Authorization: Bearer {KEYS['storefront']}",
        "Transfer-Encoding: chunked",
    )
    + b"zz\r\n{}\r\n0\r\n\r\n",
    "content-length-and-chunked": head(
        "POST", "/v1/reservations", "Content-Length: 2", "Transfer-Encoding: chunked"
    )
    + b"2\r\n{}\r\n0\r\n\r\n",
    "not-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
}


@pytest.mark.parametrize("raw", PARSER_ERRORS.values(), ids=PARSER_ERRORS.keys())
async def test_parser_errors_are_problems(served: GatewayTestServer, raw: bytes) -> None:
    counted = requests_counted("unparsed", "UNKNOWN", 400)
    problem = assert_problem(await exchange(served.host, served.port, raw), 400, "bad_request")
    assert problem["detail"]
    assert requests_counted("unparsed", "UNKNOWN", 400) == counted + 1


# --- the real thing ---------------------------------------------------------------------------


async def test_gateway_serve_answers_bad_wire_input(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: Any
) -> None:
    """``gateway serve`` (a real process) runs with all of the above."""
    gateway = GatewayProcess(
        redis_url, postgres_dsn, GATEWAY_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT)
    )
    try:
        host, port = "127.0.0.1", gateway.port
        response = await exchange(host, port, PARSER_ERRORS["content-length-and-chunked"])
        assert_problem(response, 400, "bad_request")
        slow = head(
            "POST",
            "/v1/reservations",
            f"Authorization: Bearer {KEYS['storefront']}",
            "Content-Type: application/json",
            f"Content-Length: {len(RESERVATION)}",
        )
        assert_problem(await exchange(host, port, slow + RESERVATION[:10]), 408, "request_timeout")
        # Headers that never end: the same deadline.
        assert_problem(await exchange(host, port, slow[:30]), 408, "request_timeout")
        response = await exchange(
            host,
            port,
            head(
                "POST",
                "/v1/reservations",
                f"Authorization: Bearer {KEYS['storefront']}",
                "Content-Type: application/json",
                "Content-Encoding: gzip",
                f"Content-Length: {len(RESERVATION)}",
            )
            + RESERVATION,
            closes=False,
        )
        assert_problem(response, 400, "bad_encoding")
        # Gone mid-body: counted as 499, never as a 500.
        _, writer = await asyncio.open_connection(host, port)
        writer.write(slow + RESERVATION[:10])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.sleep(0.3)
        text = (await exchange(host, port, head("GET", "/metrics"), closes=False))[2].decode()
        assert 'route="/v1/reservations",status="499"' in text
        assert 'status="500"' not in text
        assert await nothing_reserved(redis)
    finally:
        gateway.stop()
