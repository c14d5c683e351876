"""OriginClient and HttpErpClient against real servers on 127.0.0.1, never a mock of the network.

An aiohttp application serves the ordinary cases (and checks the request it got); a raw
``asyncio.start_server`` plays the protocol's edge cases byte by byte and counts what it saw:
connections accepted, complete requests read, connections the client closed. The cases that
touch transports run under both the default event loop and uvloop, whose transports differ.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from aiohttp import web

from gateway.adapters.erp import HttpErpClient
from gateway.adapters.http_client import ConnectionLostError, HttpAnswer, OriginClient

T = TypeVar("T")

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
both_loops = pytest.mark.parametrize("loop", sorted(LOOPS))


def run(loop: str, main: Callable[[], Coroutine[Any, Any, T]], limit: float = 15.0) -> T:
    """``main()`` on a fresh loop of the named kind (never the session's loop), bounded."""

    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await main()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(bounded())


# --- a raw server for the protocol's edge cases ----------------------------------------------


@dataclass
class Seen:
    """One complete request the raw server read."""

    conn: int
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


# What a raw server runs per connection: (server, conn number from 1, reader, writer).
Handler = Callable[["RawServer", int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """``asyncio.start_server`` running ``handler(server, conn, reader, writer)`` per connection
    (``conn`` counts from 1). Counts accepted connections, complete requests and connections
    the client closed."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
    ) -> None:
        self._handler = handler
        self._host = host
        self.accepted = 0
        self.requests: list[Seen] = []
        self.ended: set[int] = set()  # connections on which the client's EOF was read
        self.cut = 0  # requests a handler dropped on purpose without answering
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def origin(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, self._host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        tasks = list(self._tasks)
        _, pending = await asyncio.wait(tasks, timeout=2) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._server.wait_closed()

    def changed(self) -> None:
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], seconds: float = 2.0) -> None:
        async with asyncio.timeout(seconds):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def read_request(self, conn: int, reader: asyncio.StreamReader) -> Seen | None:
        """The next complete request, or None when the client closed the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            self.ended.add(conn)
            self.changed()
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, version = lines[0].split(" ")
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                assert name.lower() not in headers, f"{name} sent twice"
                headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
        seen = Seen(conn, method, path, headers, body)
        self.requests.append(seen)
        self.changed()
        return seen

    async def drop_next(self, conn: int, reader: asyncio.StreamReader) -> bool:
        """Wait for the first byte of the next request, then (the caller) closes without an
        answer: a server closing a kept connection just as a request comes. False on EOF."""
        first = await reader.read(1)
        if not first:
            self.ended.add(conn)
            self.changed()
            return False
        self.cut += 1
        self.changed()
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = self.accepted
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.changed()
        try:
            await self._handler(self, conn, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


def response(status: int, body: bytes = b"", *headers: str) -> bytes:
    head = "".join(f"{header}\r\n" for header in headers)
    return (
        f"HTTP/1.1 {status} Whatever\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body
    )


def echo_answer(seen: Seen) -> bytes:
    """200 with ``KEY|BODY`` and the connection's number in ``X-Conn``."""
    key = seen.headers.get("idempotency-key", "")
    return response(200, key.encode() + b"|" + seen.body, f"X-Conn: {seen.conn}")


async def echo(
    server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while (seen := await server.read_request(conn, reader)) is not None:
        writer.write(echo_answer(seen))
        await writer.drain()


async def post(client: OriginClient, key: str, seconds: float = 5.0) -> HttpAnswer:
    return await client.post("/orders", {"Idempotency-Key": key}, f"body-{key}".encode(), seconds)


def assert_echo(answer: HttpAnswer, key: str, conn: int | None = None) -> None:
    assert answer.status == 200
    assert answer.body == f"{key}|body-{key}".encode()
    if conn is not None:
        assert answer.headers["x-conn"] == str(conn)


@asynccontextmanager
async def raw_client(
    handler: Handler,
    **client_options: Any,
) -> AsyncIterator[tuple[RawServer, OriginClient]]:
    async with RawServer(handler) as server:
        client = OriginClient(server.origin, **client_options)
        try:
            yield server, client
        finally:
            await client.close()


@asynccontextmanager
async def aiohttp_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- ordinary exchanges (aiohttp server) -----------------------------------------------------


@both_loops
def test_post_writes_the_request_and_reads_the_answer(loop: str) -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "host": request.headers.get("Host"),
                "key": request.headers.get("Idempotency-Key"),
                "type": request.headers.get("Content-Type"),
                "length": request.headers.get("Content-Length"),
                "agent": request.headers.get("User-Agent"),
                "chunked": request.headers.get("Transfer-Encoding"),
                "body": body,
            }
        )
        return web.Response(
            status=201,
            body=body,
            headers={
                "X-Answer-Of": request.headers.get("Idempotency-Key", "-"),
                "Retry-After": "7",
            },
        )

    body = b'{"order_id":"o-1","lines":[{"sku":"SKU-1","quantity":2}]}'
    big = random.randbytes(1 << 20)

    async def main() -> tuple[int, list[HttpAnswer]]:
        async with aiohttp_server(handler) as port:
            client = OriginClient(f"http://127.0.0.1:{port}", user_agent="gateway-tests/1")
            try:
                headers = {"Idempotency-Key": "o-1", "Content-Type": "application/json"}
                first = await client.post("/erp/orders?x=1", headers, body, 5)
                second = await client.post(
                    "/erp/orders", {"Idempotency-Key": "o-2", "Content-Type": "x/y"}, big, 5
                )
                empty = await client.post("/empty", {}, b"", 5)
            finally:
                await client.close()
        return port, [first, second, empty]

    port, (first, second, empty) = run(loop, main)

    assert first.status == 201
    assert first.body == body
    assert all(name == name.lower() for name in first.headers)
    assert first.headers["x-answer-of"] == "o-1"
    assert first.headers["retry-after"] == "7"
    assert first.headers["content-length"] == str(len(body))
    assert (second.status, second.body) == (201, big)
    assert (empty.status, empty.body, empty.headers["x-answer-of"]) == (201, b"", "-")

    assert seen[0] == {
        "method": "POST",
        "path": "/erp/orders?x=1",
        "host": f"127.0.0.1:{port}",
        "key": "o-1",
        "type": "application/json",
        "length": str(len(body)),
        "agent": "gateway-tests/1",
        "chunked": None,
        "body": body,
    }
    assert (seen[1]["key"], seen[1]["type"], seen[1]["length"]) == ("o-2", "x/y", str(1 << 20))
    assert seen[1]["body"] == big
    assert (seen[2]["path"], seen[2]["key"], seen[2]["length"], seen[2]["body"]) == (
        "/empty",
        None,
        "0",
        b"",
    )


@both_loops
def test_fifty_concurrent_posts_each_get_their_own_answer(loop: str) -> None:
    peers: set[int] = set()

    async def handler(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        body = await request.read()
        await asyncio.sleep(random.uniform(0, 0.02))  # answers come back out of order
        key = request.headers["Idempotency-Key"]
        return web.Response(body=key.encode() + b"|" + body, headers={"X-Key": key})

    async def main() -> list[list[HttpAnswer]]:
        async with aiohttp_server(handler) as port:
            client = OriginClient(f"http://127.0.0.1:{port}")
            try:
                rounds = []
                for round_ in range(2):
                    keys = [f"r{round_}-o{i}" for i in range(50)]
                    rounds.append(await asyncio.gather(*(post(client, key) for key in keys)))
            finally:
                await client.close()
        return rounds

    rounds = run(loop, main)
    for round_, answers in enumerate(rounds):
        for i, answer in enumerate(answers):
            key = f"r{round_}-o{i}"
            assert answer.status == 200
            assert answer.headers["x-key"] == key
            assert answer.body == f"{key}|body-{key}".encode()
    # The second round ran on the first round's connections: never more than 50 in all.
    assert len(peers) <= 50


# --- the raw server: keep-alive, framing, failures ------------------------------------------


def test_header_with_a_line_break_or_nul_is_refused_before_connecting() -> None:
    async def main() -> tuple[RawServer, HttpAnswer]:
        async with raw_client(echo) as (server, client):
            for name, value in [
                ("X-Note", "a\r\nX-Injected: 1"),
                ("X-Note", "a\nb"),
                ("X-Note", "a\rb"),
                ("X-Note", "a\0b"),
                ("X-Note\r\nX-Injected", "1"),
                ("X-\0Note", "1"),
            ]:
                with pytest.raises(ValueError, match="line break"):
                    await client.post("/orders", {name: value}, b"", 5)
            assert server.accepted == 0
            answer = await post(client, "fine")
        return server, answer

    server, answer = run("asyncio", main)
    assert_echo(answer, "fine", conn=1)
    assert [seen.headers.get("x-note") for seen in server.requests] == [None]


def test_origin_must_be_http_or_https_with_a_host() -> None:
    for origin in ["ftp://example.com", "http://", "mailto:erp@example.com", "/orders"]:
        with pytest.raises(ValueError, match="origin"):
            OriginClient(origin)


@both_loops
def test_twenty_sequential_posts_use_one_connection(loop: str) -> None:
    async def main() -> tuple[RawServer, list[HttpAnswer]]:
        async with raw_client(echo) as (server, client):
            answers = [await post(client, f"o{i}") for i in range(20)]
        return server, answers

    server, answers = run(loop, main)
    for i, answer in enumerate(answers):
        assert_echo(answer, f"o{i}", conn=1)
    assert server.accepted == 1
    assert [seen.headers["idempotency-key"] for seen in server.requests] == [
        f"o{i}" for i in range(20)
    ]


@both_loops
def test_pool_hands_out_the_most_recently_used_connection(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (seen := await server.read_request(conn, reader)) is not None:
            if seen.headers["idempotency-key"] == "slow":
                await asyncio.sleep(0.05)
            writer.write(echo_answer(seen))
            await writer.drain()

    async def main() -> tuple[RawServer, HttpAnswer, HttpAnswer, HttpAnswer]:
        async with raw_client(handler) as (server, client):
            fast, slow = await asyncio.gather(post(client, "fast"), post(client, "slow"))
            after = await post(client, "after")
        return server, fast, slow, after

    server, fast, slow, after = run(loop, main)
    assert server.accepted == 2
    assert fast.headers["x-conn"] != slow.headers["x-conn"]
    assert_echo(after, "after", conn=int(slow.headers["x-conn"]))


@both_loops
def test_chunked_answer_is_read_whole_and_the_connection_kept(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await server.read_request(conn, reader) is not None:
            # Chunk boundaries that fall inside sizes and data, over several reads.
            for part in [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Conn: %d\r\n\r\n5\r\nhel"
                % conn,
                b"lo\r\n6\r\n wor",
                b"ld\r\n1",
                b"0\r\n" + b"!" * 16 + b"\r\n0\r\n\r\n",
            ]:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.005)

    async def main() -> tuple[RawServer, list[HttpAnswer]]:
        async with raw_client(handler) as (server, client):
            answers = [await post(client, f"o{i}") for i in range(3)]
        return server, answers

    server, answers = run(loop, main)
    for answer in answers:
        assert answer == HttpAnswer(
            200,
            {"transfer-encoding": "chunked", "x-conn": "1"},
            b"hello world" + b"!" * 16,
        )
    assert server.accepted == 1
    assert len(server.requests) == 3


@both_loops
def test_answer_without_length_is_read_until_the_server_closes(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if await server.read_request(conn, reader) is None:
            return
        if conn == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"second part")
            await writer.drain()
        else:
            writer.write(b"HTTP/1.1 202 Accepted\r\nX-Conn: %d\r\n\r\n" % conn)  # no body at all
            await writer.drain()
        writer.close()

    async def main() -> tuple[RawServer, HttpAnswer, HttpAnswer]:
        async with raw_client(handler) as (server, client):
            first = await post(client, "a")
            second = await post(client, "b")
        return server, first, second

    server, first, second = run(loop, main)
    assert (first.status, first.body) == (200, b"first part, second part")
    assert (second.status, second.body, second.headers["x-conn"]) == (202, b"", "2")
    assert server.accepted == 2


@both_loops
def test_answer_204_without_length_keeps_the_connection(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await server.read_request(conn, reader) is not None:
            writer.write(b"HTTP/1.1 204 No Content\r\nX-Conn: %d\r\n\r\n" % conn)
            await writer.drain()

    async def main() -> tuple[RawServer, list[HttpAnswer]]:
        async with raw_client(handler) as (server, client):
            answers = [await post(client, f"o{i}", seconds=2) for i in range(3)]
        return server, answers

    server, answers = run(loop, main)
    assert answers == [HttpAnswer(204, {"x-conn": "1"}, b"")] * 3
    assert server.accepted == 1


@both_loops
def test_connection_close_from_the_server_is_honoured(loop: str) -> None:
    async def closing(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Says "close" but leaves the connection open: the client must not write to it again.
        while (seen := await server.read_request(conn, reader)) is not None:
            key = seen.headers["idempotency-key"]
            writer.write(
                response(
                    200, key.encode() + b"|" + seen.body, f"X-Conn: {conn}", "Connection: close"
                )
            )
            await writer.drain()

    async def main() -> tuple[RawServer, HttpAnswer, HttpAnswer]:
        async with raw_client(closing) as (server, client):
            first = await post(client, "a")
            second = await post(client, "b")
            await server.wait_until(lambda: 1 in server.ended)  # the client closed it
        return server, first, second

    server, first, second = run(loop, main)
    assert_echo(first, "a", conn=1)
    assert_echo(second, "b", conn=2)
    assert server.accepted == 2
    assert [seen.conn for seen in server.requests] == [1, 2]


@both_loops
def test_server_closing_an_idle_connection_costs_nothing(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        seen = await server.read_request(conn, reader)
        if seen is not None:
            writer.write(echo_answer(seen))
            await writer.drain()
            await asyncio.sleep(0.02)  # the server's keep-alive timer runs out

    async def main() -> tuple[RawServer, HttpAnswer, HttpAnswer]:
        async with raw_client(handler) as (server, client):
            first = await post(client, "a")
            await asyncio.sleep(0.1)
            second = await post(client, "b")
        return server, first, second

    server, first, second = run(loop, main)
    assert_echo(first, "a", conn=1)
    assert_echo(second, "b", conn=2)
    assert server.accepted == 2
    # Exactly one complete request per post.
    assert [(seen.conn, seen.headers["idempotency-key"]) for seen in server.requests] == [
        (1, "a"),
        (2, "b"),
    ]


@both_loops
def test_kept_connection_cut_before_any_answer_is_retried_on_a_fresh_one(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Answers a connection's first request; closes it as the second one starts to come.
        seen = await server.read_request(conn, reader)
        if seen is not None:
            writer.write(echo_answer(seen))
            await writer.drain()
            await server.drop_next(conn, reader)

    async def main() -> tuple[RawServer, HttpAnswer, HttpAnswer]:
        async with raw_client(handler) as (server, client):
            first = await post(client, "a")
            second = await post(client, "b")  # written into connection 1, which is closing
        return server, first, second

    server, first, second = run(loop, main)
    assert_echo(first, "a", conn=1)
    assert_echo(second, "b", conn=2)
    assert server.cut == 1
    assert server.accepted == 2
    assert [(seen.conn, seen.headers["idempotency-key"]) for seen in server.requests] == [
        (1, "a"),
        (2, "b"),
    ]


@both_loops
def test_retry_is_once_and_only_for_a_kept_connection(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Connection 1 answers its first request; every other request is dropped unanswered.
        if conn == 1:
            seen = await server.read_request(conn, reader)
            if seen is None:
                return
            writer.write(echo_answer(seen))
            await writer.drain()
        await server.drop_next(conn, reader)

    async def main() -> tuple[RawServer, list[Any]]:
        outcomes: list[Any] = []
        async with raw_client(handler) as (server, client):
            outcomes.append(await post(client, "a"))
            for key in ["b", "c"]:
                with pytest.raises(ConnectionLostError) as caught:
                    await post(client, key)
                outcomes.append((caught.value.answered, server.cut, server.accepted))
        return server, outcomes

    _, (first, second, third) = run(loop, main)
    assert_echo(first, "a", conn=1)
    # "b": kept connection 1 dropped it, then fresh connection 2 did: two tries, not three.
    assert second == (False, 2, 2)
    # "c": on a fresh connection (3) from the start: one try.
    assert third == (False, 3, 3)


@both_loops
def test_server_that_never_answers_times_out_and_loses_the_connection(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if await server.read_request(conn, reader) is not None:
            await server.read_request(conn, reader)  # silent; returns at the client's EOF

    async def main() -> tuple[RawServer, list[float]]:
        elapsed: list[float] = []
        async with raw_client(handler) as (server, client):
            for key in ["a", "b"]:
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await post(client, key, seconds=0.3)
                elapsed.append(time.monotonic() - started)
            await server.wait_until(lambda: server.ended == {1, 2})  # the client closed both
            with pytest.raises(TimeoutError):  # no time at all: not even a connection
                await post(client, "c", seconds=0)
        return server, elapsed

    server, elapsed = run(loop, main)
    for seconds in elapsed:
        assert 0.29 <= seconds < 2.0
    assert server.accepted == 2  # the timed-out connection was not reused
    assert [seen.headers["idempotency-key"] for seen in server.requests] == ["a", "b"]


@both_loops
def test_connection_cut_in_the_middle_of_an_answer_is_not_retried(loop: str) -> None:
    cuts = [
        # the head and part of a 100-byte body
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Conn: 1\r\n\r\npartial",
        # only the status line
        b"HTTP/1.1 200 OK\r\n",
        # a chunked body, one chunk of it
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n",
    ]

    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Each connection answers its first request, then cuts its second answer short.
        seen = await server.read_request(conn, reader)
        if seen is None:
            return
        writer.write(echo_answer(seen))
        await writer.drain()
        if await server.read_request(conn, reader) is not None:
            writer.write(cuts[conn - 1])
            await writer.drain()

    async def main() -> list[Any]:
        outcomes: list[Any] = []
        async with raw_client(handler) as (server, client):
            for conn in range(1, len(cuts) + 1):
                assert_echo(await post(client, f"whole-{conn}"), f"whole-{conn}", conn=conn)
                with pytest.raises(ConnectionLostError) as caught:
                    await post(client, f"cut-{conn}")
                outcomes.append((caught.value.answered, len(server.requests), server.accepted))
        return outcomes

    outcomes = run(loop, main)
    # Answered: never written again, neither on a new connection nor at all (2 per connection).
    assert outcomes == [(True, 2, 1), (True, 4, 2), (True, 6, 3)]
    assert isinstance(ConnectionLostError("x", answered=True), OSError)


@both_loops
def test_garbage_answer_is_an_error_and_the_connection_is_dropped(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (seen := await server.read_request(conn, reader)) is not None:
            if seen.headers["idempotency-key"] == "garbage":
                writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe not http at all\r\n\r\n")
            else:
                writer.write(echo_answer(seen))
            await writer.drain()

    async def main() -> tuple[RawServer, HttpAnswer, bool, HttpAnswer]:
        async with raw_client(handler) as (server, client):
            first = await post(client, "a")
            with pytest.raises(ConnectionLostError) as caught:
                await post(client, "garbage")
            await server.wait_until(lambda: 1 in server.ended)  # the client closed it
            after = await post(client, "b")
        return server, first, caught.value.answered, after

    server, first, answered, after = run(loop, main)
    assert_echo(first, "a", conn=1)
    assert answered is True
    assert_echo(after, "b", conn=2)
    assert [seen.headers["idempotency-key"] for seen in server.requests] == ["a", "garbage", "b"]


@both_loops
def test_unsolicited_bytes_on_an_idle_connection_retire_it(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        seen = await server.read_request(conn, reader)
        if seen is None:
            return
        writer.write(echo_answer(seen))
        await writer.drain()
        if conn == 1:  # a well-formed answer nobody asked for, while the connection is idle
            await asyncio.sleep(0.02)
            writer.write(response(200, b"stale", "X-Conn: stale"))
            await writer.drain()
        await echo(server, conn, reader, writer)

    async def main() -> tuple[RawServer, HttpAnswer, HttpAnswer]:
        async with raw_client(handler) as (server, client):
            first = await post(client, "a")
            await server.wait_until(lambda: 1 in server.ended)  # the client closed it
            second = await post(client, "b")
        return server, first, second

    server, first, second = run(loop, main)
    assert_echo(first, "a", conn=1)
    assert_echo(second, "b", conn=2)
    assert server.accepted == 2


@both_loops
def test_connection_idle_longer_than_idle_seconds_is_closed_not_reused(loop: str) -> None:
    async def main() -> tuple[RawServer, list[HttpAnswer], set[int]]:
        async with raw_client(echo, idle_seconds=0.1) as (server, client):
            answers = [await post(client, "a"), await post(client, "b")]
            await asyncio.sleep(0.25)
            answers.append(await post(client, "c"))
            await server.wait_until(lambda: 1 in server.ended)  # the client closed it
            ended = set(server.ended)
            answers.append(await post(client, "d"))
        return server, answers, ended

    server, (a, b, c, d), ended = run(loop, main)
    assert_echo(a, "a", conn=1)
    assert_echo(b, "b", conn=1)  # within idle_seconds: reused
    assert_echo(c, "c", conn=2)
    assert_echo(d, "d", conn=2)
    assert ended == {1}
    assert server.accepted == 2


@both_loops
def test_cancelled_post_does_not_leave_its_connection_in_the_pool(loop: str) -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (seen := await server.read_request(conn, reader)) is not None:
            if seen.headers["idempotency-key"] != "hang":
                writer.write(echo_answer(seen))
                await writer.drain()

    async def main() -> tuple[RawServer, HttpAnswer]:
        async with raw_client(handler) as (server, client):
            await post(client, "a")
            hanging = asyncio.create_task(post(client, "hang"))
            await server.wait_until(lambda: len(server.requests) == 2)
            hanging.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hanging
            await server.wait_until(lambda: 1 in server.ended)  # the client closed it
            after = await post(client, "b")
        return server, after

    server, after = run(loop, main)
    assert_echo(after, "b", conn=2)
    assert server.accepted == 2


def test_closed_client_closes_its_connections_and_posts_no_more() -> None:
    async def main() -> tuple[RawServer, bool]:
        async with RawServer(echo) as server:
            client = OriginClient(server.origin)
            await asyncio.gather(post(client, "a"), post(client, "b"))
            await client.close()
            await server.wait_until(lambda: server.ended == {1, 2})
            with pytest.raises(ConnectionLostError) as caught:
                await post(client, "c")
        return server, caught.value.answered

    server, answered = run("asyncio", main)
    assert answered is False
    assert server.accepted == 2


@both_loops
def test_refused_connection_is_an_oserror(loop: str) -> None:
    async def main() -> None:
        client = OriginClient(f"http://127.0.0.1:{free_port()}")
        try:
            with pytest.raises(ConnectionRefusedError):
                await post(client, "a")
        finally:
            await client.close()

    run(loop, main)


def test_ipv6_origin_sends_a_bracketed_host() -> None:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")

    async def main() -> tuple[RawServer, HttpAnswer]:
        async with RawServer(echo, host="::1") as server:
            client = OriginClient(server.origin)
            try:
                answer = await post(client, "a")
            finally:
                await client.close()
        return server, answer

    server, answer = run("asyncio", main)
    assert_echo(answer, "a", conn=1)
    assert server.requests[0].headers["host"] == f"[::1]:{server.port}"


# --- interim answers and stray bytes ---------------------------------------------------------


def test_interim_1xx_answer_is_skipped() -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (seen := await server.read_request(conn, reader)) is not None:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(echo_answer(seen))
            await writer.drain()

    async def main() -> list[HttpAnswer]:
        async with raw_client(handler) as (_, client):
            return [await post(client, "a"), await post(client, "b")]

    first, second = run("asyncio", main)
    assert_echo(first, "a")
    assert_echo(second, "b")


def test_bytes_after_an_answer_in_the_same_read_do_not_leak() -> None:
    async def handler(
        server: RawServer, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        seen = await server.read_request(conn, reader)
        if seen is None:
            return
        # One write: the answer, then the head of an answer nobody asked for.
        writer.write(
            echo_answer(seen) + b"HTTP/1.1 200 OK\r\nX-Stale: 1\r\nContent-Length: 10\r\n\r\n"
        )
        await writer.drain()
        await echo(server, conn, reader, writer)

    async def main() -> list[HttpAnswer]:
        async with raw_client(handler) as (_, client):
            first = await post(client, "a")
            await asyncio.sleep(0.05)
            return [first, await post(client, "b")]

    first, second = run("asyncio", main)
    assert "x-stale" not in first.headers
    assert_echo(first, "a")
    assert_echo(second, "b")


# --- HTTPS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the HTTPS test needs the openssl CLI, and CI must run it")
        pytest.skip("no openssl CLI to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-days", "1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


@both_loops
def test_https_with_a_trusted_self_signed_certificate(
    loop: str, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    seen: list[tuple[str | None, str | None, bytes, int]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        peer = request.transport.get_extra_info("peername")[1]  # type: ignore[union-attr]
        seen.append(
            (request.headers.get("Host"), request.headers.get("Idempotency-Key"), body, peer)
        )
        return web.Response(status=201, body=b"secure|" + body)

    async def main() -> tuple[int, list[HttpAnswer], BaseException]:
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ssl.load_cert_chain(cert, key)
        async with aiohttp_server(handler, ssl_context=server_ssl) as port:
            trusting = OriginClient(
                f"https://127.0.0.1:{port}", ssl_context=ssl.create_default_context(cafile=cert)
            )
            doubting = OriginClient(f"https://127.0.0.1:{port}")  # the system's trust store
            try:
                answers = [await post(trusting, "a"), await post(trusting, "b")]
                with pytest.raises(ssl.SSLCertVerificationError) as caught:
                    await post(doubting, "c")
            finally:
                await trusting.close()
                await doubting.close()
                await asyncio.sleep(0.05)  # let the TLS shutdowns finish
        return port, answers, caught.value

    port, answers, refused = run(loop, main)
    assert [(answer.status, answer.body) for answer in answers] == [
        (201, b"secure|body-a"),
        (201, b"secure|body-b"),
    ]
    assert isinstance(refused, OSError)  # so HttpErpClient answers status 0
    assert [(host, k, body) for host, k, body, _ in seen] == [
        (f"127.0.0.1:{port}", "a", b"body-a"),
        (f"127.0.0.1:{port}", "b", b"body-b"),
    ]
    assert seen[0][3] == seen[1][3]  # one TLS connection, kept


# --- HttpErpClient end to end ----------------------------------------------------------------


@both_loops
def test_erp_client_turns_every_answer_into_a_reply(loop: str) -> None:
    seen: list[tuple[str, str | None, str | None, bytes]] = []

    async def main() -> dict[str, Any]:
        slow_done = asyncio.Event()

        async def handler(request: web.Request) -> web.StreamResponse:
            key = request.headers.get("Idempotency-Key", "")
            seen.append(
                (request.path, key, request.headers.get("Content-Type"), await request.read())
            )
            accepted = {"erp_order_id": f"E-{key}", "accepted_at": "2024-05-01T10:00:00Z"}
            if key == "new":
                return web.json_response(accepted, status=201)
            if key == "dup":
                return web.json_response(accepted, status=409)
            if key == "busy":
                return web.Response(status=429, text="slow down", headers={"Retry-After": "3"})
            if key == "down":
                when = datetime.now(UTC) + timedelta(seconds=10)
                date = email.utils.format_datetime(when, usegmt=True)
                return web.Response(status=503, text="maintenance", headers={"Retry-After": date})
            if key.startswith("retry="):
                return web.Response(status=503, headers={"Retry-After": key[6:]})
            if key == "bad":
                return web.Response(status=400, text="sku SKU-9 is unknown")
            if key == "slow":
                await slow_done.wait()
                return web.json_response(accepted, status=201)
            return web.Response(status=500)

        replies: dict[str, Any] = {}
        async with aiohttp_server(handler) as port:
            erp = HttpErpClient(f"http://127.0.0.1:{port}/erp/", timeout_seconds=2.0)
            hasty = HttpErpClient(f"http://127.0.0.1:{port}/erp", timeout_seconds=0.3)
            refused = HttpErpClient(f"http://127.0.0.1:{free_port()}", timeout_seconds=2.0)
            for client in (erp, hasty, refused):
                await client.start()
            try:
                for key in ["new", "dup", "busy", "down", "bad"]:
                    replies[key] = await erp.send(key, b'{"order_id":"%s"}' % key.encode())
                past = email.utils.format_datetime(
                    datetime.now(UTC) - timedelta(hours=1), usegmt=True
                )
                for value in ["100000", "-5", "soon", past]:
                    replies[f"retry={value}"] = await erp.send(f"retry={value}", b"{}")
                replies["retry=past"] = replies.pop(f"retry={past}")
                replies["slow"] = await hasty.send("slow", b"{}")
                replies["refused"] = await refused.send("refused", b"{}")
            finally:
                slow_done.set()
                for client in (erp, hasty, refused):
                    await client.close()
        return replies

    replies = run(loop, main)
    accepted_at = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)

    new = replies["new"]
    assert (new.status, new.erp_order_id, new.accepted_at) == (201, "E-new", accepted_at)
    assert (new.retry_after, new.error) == (None, "")
    assert 0 <= new.seconds < 2
    dup = replies["dup"]
    assert (dup.status, dup.erp_order_id, dup.accepted_at, dup.error) == (
        409,
        "E-dup",
        accepted_at,
        "",
    )
    busy = replies["busy"]
    assert (busy.status, busy.erp_order_id, busy.retry_after) == (429, None, 3.0)
    assert "429" in busy.error
    assert "slow down" in busy.error
    down = replies["down"]
    assert down.status == 503
    assert down.retry_after is not None
    assert 8.0 <= down.retry_after <= 10.0
    assert "maintenance" in down.error
    bad = replies["bad"]
    assert (bad.status, bad.retry_after) == (400, None)
    assert "sku SKU-9 is unknown" in bad.error
    assert replies["retry=100000"].retry_after == 300.0  # bounded to five minutes
    assert replies["retry=-5"].retry_after == 0.0
    assert replies["retry=soon"].retry_after is None
    assert replies["retry=past"].retry_after == 0.0  # an HTTP date already gone
    slow = replies["slow"]
    assert (slow.status, slow.erp_order_id) == (0, None)
    assert "TimeoutError" in slow.error
    assert 0.29 <= slow.seconds < 2
    refused = replies["refused"]
    assert refused.status == 0
    assert "ConnectionRefusedError" in refused.error

    # What the ERP got: POST to /erp/orders, keyed, as JSON (the slash-less base URL too).
    assert seen[0] == ("/erp/orders", "new", "application/json", b'{"order_id":"new"}')
    assert {path for path, *_ in seen} == {"/erp/orders"}
    assert [key for _, key, *_ in seen][-1] == "slow"
