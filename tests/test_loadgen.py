"""The benchmarks' load generator reports why requests failed, not only how many: a run
that fails (a tool's timeouts under valgrind, say) says what the server answered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from loadtests.loadgen import LoadSpec, run_load

ERROR = b'{"error":{"message":"Redis at 127.0.0.1:1/0 did not answer","code":"x"}}'
OK = b'{"ok":true}'


async def _serve(answer: Callable[[int], bytes]) -> tuple[asyncio.Server, str]:
    """An HTTP/1.1 server on a free port answering every request with ``answer(n)``."""
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
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
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/chat/completions"


def _response(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body)


@pytest.fixture
async def failing_every_third() -> AsyncIterator[str]:
    server, url = await _serve(
        lambda n: (
            _response(b"503 Service Unavailable", ERROR) if n % 3 == 0 else _response(b"200 OK", OK)
        )
    )
    yield url
    server.close()


async def test_a_failed_run_says_what_the_server_answered(failing_every_third: str) -> None:
    spec = LoadSpec(url=failing_every_third, concurrency=2, body=lambda n: b"{}", requests=30)
    res = await run_load(spec)
    assert res.errors >= 10 and res.statuses["503"] == res.errors
    assert res.first_error == "503: " + ERROR.decode()
    assert res.requests == res.statuses["200"]


async def test_a_clean_run_has_no_first_error() -> None:
    server, url = await _serve(lambda n: _response(b"200 OK", OK))
    try:
        res = await run_load(LoadSpec(url=url, concurrency=3, body=lambda n: b"{}", requests=20))
    finally:
        server.close()
    assert res.errors == 0 and res.first_error is None and res.requests >= 20
