"""A closed-loop HTTP load generator cheap enough not to be the bottleneck.

``concurrency`` keep-alive connections each send a request, wait for the whole response,
and send the next. It is a raw asyncio protocol with httptools' response parser (on
uvloop), about 20 us of CPU per request, so one core drives tens of thousands of requests
per second. For each request it records the latency and, for streams, the time to the
first content token (the first ``"delta":{"content":"<non-empty>`` in the body). Only
requests that complete inside the measured window (after the warm-up) count.

    python -m loadtests.loadgen --url http://127.0.0.1:8080/v1/chat/completions \\
        --concurrency 50 --duration 10 --stream --key sk-...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

_CONTENT = b'"delta":{"content":"'
_DONE = b"data: [DONE]"


@dataclass(slots=True)
class LoadSpec:
    url: str
    concurrency: int
    body: Callable[[int], bytes]  # request number -> JSON body
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    warmup: float = 1.0  # seconds before the measured window
    duration: float = 10.0  # seconds of the measured window
    requests: int | None = None  # instead of a window: stop after this many responses
    # Connections send their first request spread over this many seconds instead of all at
    # once, so a closed loop of long requests does not move in lockstep waves.
    ramp: float = 0.0


@dataclass(slots=True)
class LoadResult:
    requests: int  # completed inside the window
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    statuses: dict[str, int]  # HTTP status (599: connection lost) -> count
    loadgen_cpu_ms: float  # this process's CPU over the window
    first_error: str | None = None  # the first failed response's status and body's start

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (0 when empty)."""
    if not values:
        return 0.0
    k = min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))
    return values[k]


class _Run:
    """Shared by the connections of one load run."""

    def __init__(self, spec: LoadSpec) -> None:
        u = urlsplit(spec.url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        extra = "".join(f"{k}: {v}\r\n" for k, v in spec.headers.items())
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\n{extra}Content-Length: "
        ).encode()
        self.spec = spec
        self.numbers = itertools.count(1)
        self.active = True
        self.recording = False
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.errors = 0
        self.statuses: dict[int, int] = {}
        self.first_error: str | None = None
        self.completed = 0
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.enough = asyncio.Event()

    def request(self) -> bytes:
        body = self.spec.body(next(self.numbers))
        return self.head + b"%d\r\n\r\n" % len(body) + body

    def done(
        self, latency: float, ttft: float | None, status: int, complete: bool, body: bytes
    ) -> None:
        self.completed += 1
        if self.recording:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status != 200 or not complete:
                self.errors += 1
                if self.first_error is None:
                    what = "incomplete stream" if status == 200 else str(status)
                    self.first_error = f"{what}: {body.decode('utf-8', 'replace')}"[:300]
            else:
                self.latencies.append(latency)
                if ttft is not None:
                    self.ttfts.append(ttft)
        limit = self.spec.requests
        if limit is not None and self.completed >= limit:
            self.active = False
            self.enough.set()


class _Client(asyncio.Protocol):
    def __init__(self, run: _Run, connected: asyncio.Future[None]) -> None:
        self._run = run
        self._connected = connected
        self._transport: Any = None
        self._parser = httptools.HttpResponseParser(self)
        self._t0 = 0.0
        self._ttft: float | None = None
        self._tail = b""
        self._error_body = b""  # the start of a failed response's body, for the report
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if not self._connected.done():
            self._connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._busy:
            self._busy = False
            self._finish(599, complete=False)

    def send(self) -> None:
        run = self._run
        if not run.active or self._transport is None:
            if run.in_flight == 0:
                run.idle.set()
            return
        self._busy = True
        self._ttft = None
        self._tail = b""
        self._error_body = b""
        run.in_flight += 1
        data = run.request()
        self._t0 = time.perf_counter()
        self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._transport.close()

    def on_body(self, body: bytes) -> None:
        if len(self._error_body) < 300 and self._parser.get_status_code() != 200:
            self._error_body += body[:300]
        if not self._run.spec.stream:
            return
        if self._ttft is None:
            i = body.find(_CONTENT)
            if i >= 0 and body[i + len(_CONTENT) : i + len(_CONTENT) + 1] != b'"':
                self._ttft = time.perf_counter() - self._t0
        self._tail = (self._tail + body)[-32:]

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        complete = not self._run.spec.stream or _DONE in self._tail
        self._busy = False
        self._finish(status, complete)
        if not self._parser.should_keep_alive():
            self._transport.close()
            return
        self.send()

    def _finish(self, status: int, complete: bool) -> None:
        run = self._run
        run.in_flight -= 1
        body = self._error_body or self._tail
        run.done(time.perf_counter() - self._t0, self._ttft, status, complete, body)
        if not run.active and run.in_flight == 0:
            run.idle.set()

    @property
    def open(self) -> bool:
        return self._transport is not None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def _connect(run: _Run) -> _Client:
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[None] = loop.create_future()
    _, client = await loop.create_connection(lambda: _Client(run, connected), run.host, run.port)
    await connected
    return client


async def run_load(spec: LoadSpec, on_window: Callable[[str], None] | None = None) -> LoadResult:
    """Run ``spec``; ``on_window("start")``/``("end")`` is called at the window's edges."""
    run = _Run(spec)
    clients: list[_Client] = []
    for batch in range(0, spec.concurrency, 100):  # don't overflow the listen backlog
        n = min(100, spec.concurrency - batch)
        clients.extend(await asyncio.gather(*(_connect(run) for _ in range(n))))
    loop = asyncio.get_running_loop()
    for i, c in enumerate(clients):
        if spec.ramp > 0:
            loop.call_later(spec.ramp * i / len(clients), c.send)
        else:
            c.send()

    async def reconnector() -> None:  # a server may close a keep-alive connection
        while run.active:
            await asyncio.sleep(0.05)
            for i, c in enumerate(clients):
                if not c.open and run.active:
                    with contextlib.suppress(OSError):
                        clients[i] = await _connect(run)
                        clients[i].send()

    keeper = asyncio.get_running_loop().create_task(reconnector())
    if spec.requests is not None:
        run.recording = True
        t0, cpu0 = time.perf_counter(), time.process_time()
        if on_window:
            on_window("start")
        await run.enough.wait()
        t1, cpu1 = time.perf_counter(), time.process_time()
        if on_window:
            on_window("end")
    else:
        await asyncio.sleep(spec.warmup)
        run.recording = True
        t0, cpu0 = time.perf_counter(), time.process_time()
        if on_window:
            on_window("start")
        await asyncio.sleep(spec.duration)
        run.recording = False
        t1, cpu1 = time.perf_counter(), time.process_time()
        if on_window:
            on_window("end")
        run.active = False
    keeper.cancel()
    if run.in_flight:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.idle.wait(), 60)
    for c in clients:
        c.close()
    lat = sorted(run.latencies)
    ttft = sorted(run.ttfts)
    seconds = t1 - t0
    n = len(lat)
    return LoadResult(
        requests=n,
        errors=run.errors,
        seconds=round(seconds, 3),
        rps=round(n / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=round(percentile(lat, 50) * 1000, 3),
        p90_ms=round(percentile(lat, 90) * 1000, 3),
        p99_ms=round(percentile(lat, 99) * 1000, 3),
        mean_ms=round(sum(lat) / n * 1000, 3) if n else 0.0,
        ttft_p50_ms=round(percentile(ttft, 50) * 1000, 3) if ttft else None,
        ttft_p99_ms=round(percentile(ttft, 99) * 1000, 3) if ttft else None,
        statuses={str(k): v for k, v in sorted(run.statuses.items())},
        loadgen_cpu_ms=round((cpu1 - cpu0) * 1000, 1),
        first_error=run.first_error,
    )


def chat_template(
    model: str, *, stream: bool, prompt_bytes: int = 200, max_tokens: int | None = 64
) -> bytes:
    """A chat request body with one ``%d`` (the request number) and a random run id in its
    prompt, so that a cache never hits, and ``temperature: 0``, so that a deterministic
    cache looks it up and stores the answer (a real miss, not a bypass). It names an end
    user (``user``), so the end user's budget and limits are enforced too."""
    filler = ("Summarise the trade-offs of caching LLM answers in a gateway. " * 64)[
        : max(prompt_bytes - 20, 0)
    ]
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "@@N@@ " + filler},
        ],
        "temperature": 0,
        "user": "bench-customer",  # an end user of the tenant (see services.py)
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    marker = b"run %s request %%d:" % os.urandom(6).hex().encode()
    return orjson.dumps(body).replace(b"%", b"%%").replace(b"@@N@@", marker)


def chat_body(model: str, *, stream: bool, prompt_bytes: int = 200) -> Callable[[int], bytes]:
    """Request number -> body (see chat_template)."""
    template = chat_template(model, stream=stream, prompt_bytes=prompt_bytes)
    return lambda n: template % n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/v1/chat/completions")
    p.add_argument("--model", default="bench-fast")
    p.add_argument("--key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--requests", type=int, default=None, help="stop after N responses")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--prompt-bytes", type=int, default=200)
    args = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    spec = LoadSpec(
        url=args.url,
        concurrency=args.concurrency,
        body=chat_body(args.model, stream=args.stream, prompt_bytes=args.prompt_bytes),
        stream=args.stream,
        headers=headers,
        warmup=args.warmup,
        duration=args.duration,
        requests=args.requests,
    )
    try:
        import uvloop

        result = uvloop.run(run_load(spec))
    except ImportError:  # pragma: no cover
        result = asyncio.run(run_load(spec))
    print(orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
