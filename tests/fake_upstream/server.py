"""``FakeUpstream``: the fake OpenAI-compatible provider, on a free port of 127.0.0.1.

Inside an event loop::

    async with FakeUpstream(api_key="sk-provider") as fake:
        ...  # point the gateway at fake.base_url

From synchronous code, with its own event loop in a daemon thread::

    with FakeUpstream.in_thread() as fake:
        ...

Scripting, counters and recorded requests work from any thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from aiohttp import web

from . import tokens
from .app import FakeApp, Settings
from .behaviours import Scripts
from .recorder import Received, Recorder

SHUTDOWN_TIMEOUT = 0.5  # seconds left to answers still in flight when the fake stops
START_TIMEOUT = 30.0


class FakeUpstream:
    """A fake OpenAI-compatible provider with scriptable misbehaviour."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        latency: float = 0.0,
        models: Iterable[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        keep_requests: int = 100,
    ) -> None:
        """``api_key``: when set, only ``Authorization: Bearer <api_key>`` is accepted.
        ``latency``: seconds to wait before every answer. ``models``: when set, the only
        models served (others answer 404) and what ``/v1/models`` lists.
        ``keep_requests``: how many received requests ``requests`` remembers."""
        self._settings = Settings(
            api_key=api_key,
            latency=latency,
            models=tuple(models) if models is not None else None,
        )
        self._host = host
        self._port = port
        self._scripts = Scripts()
        self._recorder = Recorder(keep_requests)
        self._runner: web.AppRunner | None = None

    # -- where it listens -------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._runner is None:
            raise RuntimeError("FakeUpstream is not running")
        return self._port

    @property
    def url(self) -> str:
        """The server's root, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://{self._host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What a provider's ``base_url`` should be: ``http://127.0.0.1:PORT/v1``."""
        return self.url + "/v1"

    # -- life cycle -------------------------------------------------------------------
    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("FakeUpstream is already running")
        # Load tiktoken before the first request, off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, tokens.load)
        app = FakeApp(self._settings, self._scripts, self._recorder).build()
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            handler_cancellation=True,
        )
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            self._port = sock.getsockname()[1]
            await web.SockSite(runner, sock, backlog=1024).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @classmethod
    @contextlib.contextmanager
    def in_thread(cls, **kwargs: Any) -> Iterator[FakeUpstream]:
        """A running fake served by its own event loop in a daemon thread."""
        fake = cls(**kwargs)
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(fake.start())
            except BaseException as exc:
                failure.append(exc)
            started.set()
            if not failure:
                loop.run_forever()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

        thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        thread.start()
        if not started.wait(START_TIMEOUT):
            raise RuntimeError("FakeUpstream did not start")
        if failure:
            thread.join()
            raise failure[0]
        try:
            yield fake
        finally:
            asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(START_TIMEOUT)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(START_TIMEOUT)

    # -- control (thread-safe) --------------------------------------------------------
    def script(self, model: str, behaviours: Iterable[Any]) -> None:
        """Queue behaviours for the next calls of ``model`` (``"*"``: any model without a
        queue of its own); each call takes one. An entry is a directive object, its JSON
        text, a bare status code (``500``), or ``{}`` for a normal answer."""
        self._scripts.add(model, behaviours)

    def pending(self) -> dict[str, int]:
        """Scripted behaviours not yet used, per model."""
        return self._scripts.pending()

    def reset(self) -> None:
        """Drop scripted behaviours, counters and recorded requests."""
        self._scripts.clear()
        self._recorder.reset()

    def calls(self, model: str | None = None) -> int:
        """POST calls received for ``model`` (all models when None), whatever the answer."""
        return self._recorder.calls(model)

    @property
    def requests(self) -> list[Received]:
        """The last ``keep_requests`` requests received on ``/v1``, oldest first."""
        return self._recorder.requests()

    def last_request(self) -> Received:
        received = self._recorder.requests()
        if not received:
            raise LookupError("FakeUpstream has received no request")
        return received[-1]

    def stats(self) -> dict[str, Any]:
        """What ``GET /_control/stats`` answers: calls per model, totals, requests..."""
        return {**self._recorder.snapshot(), "pending": self._scripts.pending()}
