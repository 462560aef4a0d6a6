"""The benchmarks' load generator reports why requests failed, not only how many: a run
that fails (a tool's timeouts under valgrind, say) says what the server answered."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from loadtests.loadgen import LoadSpec, run_load

ERROR = b'{"error":{"message":"Redis at 127.0.0.1:1/0 did not answer","code":"x"}}'
OK = b'{"ok":true}'


@contextlib.asynccontextmanager
async def _serve(answer: Callable[[int], bytes]) -> AsyncIterator[str]:
    """An HTTP/1.1 server on a free port answering every request with ``answer(n)``; its
    URL. Its connections are closed and their handlers done when the block ends."""
    count = 0
    handlers: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                count += 1
                writer.write(answer(count))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def _response(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body)


@pytest.fixture
async def failing_every_third() -> AsyncIterator[str]:
    def answer(n: int) -> bytes:
        if n % 3 == 0:
            return _response(b"503 Service Unavailable", ERROR)
        return _response(b"200 OK", OK)

    async with _serve(answer) as url:
        yield url


async def test_a_failed_run_says_what_the_server_answered(failing_every_third: str) -> None:
    spec = LoadSpec(url=failing_every_third, concurrency=2, body=lambda n: b"{}", requests=30)
    res = await run_load(spec)
    assert res.errors >= 10 and res.statuses["503"] == res.errors
    assert res.first_error == "503: " + ERROR.decode()
    assert res.requests == res.statuses["200"]


async def test_a_clean_run_has_no_first_error() -> None:
    async with _serve(lambda n: _response(b"200 OK", OK)) as url:
        res = await run_load(LoadSpec(url=url, concurrency=3, body=lambda n: b"{}", requests=20))
    assert res.errors == 0 and res.first_error is None and res.requests >= 20
