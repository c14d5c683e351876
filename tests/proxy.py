"""A TCP proxy in front of a real server that a test can cut or black-hole.

- ``cut()``: the server is gone: every connection is closed and new ones are refused.
- ``blackhole()``: the server is stalled (like SIGSTOP): connections are accepted and nothing
  goes through in either direction. Bytes are held, not lost: ``heal()`` delivers them, as a
  stopped server would run what was already written to its socket once it resumed.
- ``blackhole_on(pattern)``: forward until a chunk from the client contains ``pattern`` (say
  ``b"COMMIT"``), then black-hole from that chunk on, so a test can stall a server exactly
  after it was sent a given command and before it runs it.
- ``heal()``: forward again (listening again after a cut).

It runs on the test's event loop: a test that blocks the loop (``time.sleep``, a synchronous
HTTP call) stalls the proxy too.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, host: str, port: int, *, listen_port: int = 0) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._trigger: bytes | None = None
        self.port = listen_port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Close every connection and stop listening: connects are refused."""
        if self._server is not None:
            self._server.close()
        await self._drop_connections()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def blackhole(self) -> None:
        self._flowing.clear()

    def blackhole_on(self, pattern: bytes) -> None:
        self._trigger = pattern

    async def heal(self) -> None:
        self._trigger = None
        self._flowing.set()
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        self._flowing.set()
        await self.cut()

    async def _drop_connections(self) -> None:
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, from_client=True)),
            asyncio.create_task(self._pump(up_reader, writer, from_client=False)),
        ]
        self._tasks.update(pumps)
        # cut() cancels the pumps, never this task: asyncio's stream server reads its outcome.
        await asyncio.gather(*pumps, return_exceptions=True)
        self._tasks.difference_update(pumps)
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, from_client: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                if from_client and self._trigger is not None and self._trigger in data:
                    self._trigger = None
                    self._flowing.clear()
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        # An end of stream is held like data: a stalled server sees it only once it resumes.
        await self._flowing.wait()
        dst.close()
