"""The disconnect watcher of a long request, against uvicorn's receive() semantics: once
the response is complete, receive() reports a disconnect at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.api import asgi
from gateway.api.asgi import AsgiResponder, DisconnectWatch


class Connection:
    """receive() waits until the response is complete or the client goes away, as
    uvicorn's does, then says http.disconnect."""

    def __init__(self) -> None:
        self.over = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.over.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.over.set()


@pytest.fixture(autouse=True)
def watch_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asgi, "WATCH_AFTER_SECONDS", 0.0)


async def _request(conn: Connection) -> tuple[DisconnectWatch, AsgiResponder, asyncio.Task[None]]:
    out = AsgiResponder(conn.send)  # type: ignore[arg-type]
    handler: asyncio.Task[None] = asyncio.create_task(asyncio.sleep(10))
    watch = DisconnectWatch(conn.receive, out, handler)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)  # the watcher is waiting on receive()
    assert watch._watcher is not None and not watch._watcher.done()
    return watch, out, handler


async def test_after_a_complete_response_the_watcher_ends_without_being_cancelled() -> None:
    conn = Connection()
    watch, out, handler = await _request(conn)
    await out.send_json(200, [], b"{}")
    watch.stop()
    watcher = watch._watcher
    assert watcher is not None
    await asyncio.wait_for(asyncio.shield(watcher), 1)
    # no CancelledError: nothing left in a reference cycle for the garbage collector
    assert not watcher.cancelled() and watcher.exception() is None
    assert not handler.cancelled() and not out.disconnected
    handler.cancel()


async def test_a_client_that_leaves_mid_response_cancels_the_request() -> None:
    conn = Connection()
    watch, out, handler = await _request(conn)
    await out.start_stream(200, [])
    out.interruptible = True  # waiting on the upstream
    conn.over.set()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert out.disconnected
    watch.stop()


async def test_a_request_ended_before_its_response_stops_the_watcher() -> None:
    conn = Connection()
    watch, _, handler = await _request(conn)
    watch.stop()  # e.g. the server shutting down
    watcher = watch._watcher
    assert watcher is not None
    await asyncio.sleep(0)
    assert watcher.cancelled()
    handler.cancel()
