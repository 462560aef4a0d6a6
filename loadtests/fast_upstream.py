"""A minimal, very fast fake OpenAI upstream for benchmarks.

The full-featured fake in ``tests/fake_upstream/`` (aiohttp) tops out near 3k requests/s
and would be the bottleneck of a benchmark; this one is a raw asyncio protocol with the
httptools parser on uvloop, answering canned but correct OpenAI JSON:

- ``POST /v1/chat/completions``: a ``chat.completion``, or with ``stream: true`` an SSE
  stream of ``chat.completion.chunk`` events (role, one event per token, finish), where
  ``stream_options.include_usage`` works as at OpenAI: every chunk carries
  ``"usage": null`` and a last chunk with ``choices: []`` carries the usage; then
  ``data: [DONE]``.
- ``POST /v1/embeddings``: a ``list`` of (constant) embeddings with usage.
- ``GET /v1/models``.

Behaviour comes from the request's model name, ``NAME[@key=value,...]`` (as TensorZero's
dummy provider does), so a gateway can point several configured models at one upstream:
``ttft`` (ms until the first token), ``tpt`` (ms between tokens) and ``tokens`` (completion
tokens, capped by ``max_tokens``/``max_completion_tokens``); the command line sets the
defaults. ``bench-slow@ttft=200,tpt=10`` answers its first token after 200 ms and the
rest 10 ms apart. Connections are kept alive.

    python -m loadtests.fast_upstream --port 9000 --tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import httptools
import orjson

WORDS = tuple(
    "Hello the gateway answers every request quickly and meters each token it relays "
    "for budgets rate limits cache routing ledger metrics stream latency cost".split()
)
FINGERPRINT = "fp_bench0001"
_JSON_HEAD = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n"
)
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}
_DONE = b"data: [DONE]\n\n"
_ID_SLOT = b"chatcmpl-bench@@@@@@@@@@@@"  # the width of new_id()
_CREATED_SLOT = b"1000000000"  # the width of time() until 2286


@dataclass(frozen=True, slots=True)
class Behaviour:
    ttft_ms: float = 0.0
    tpt_ms: float = 0.0
    tokens: int = 16


def parse_behaviour(model: str, default: Behaviour) -> Behaviour:
    """``NAME@ttft=200,tpt=10,tokens=16`` -> Behaviour (unknown keys are ignored)."""
    _, _, opts = model.partition("@")
    if not opts:
        return default
    values: dict[str, float] = {}
    for part in opts.split(","):
        key, _, value = part.partition("=")
        with contextlib.suppress(ValueError):
            values[key.strip()] = float(value)
    return Behaviour(
        ttft_ms=values.get("ttft", default.ttft_ms),
        tpt_ms=values.get("tpt", default.tpt_ms),
        tokens=int(values.get("tokens", default.tokens)),
    )


def _chunked(event: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(event), event)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Answers:
    """Renders OpenAI responses; shared by every connection."""

    def __init__(self, default: Behaviour, dimensions: int) -> None:
        self.default = default
        self.dimensions = dimensions
        self._behaviours: dict[str, Behaviour] = {}
        self._ids = itertools.count(1)
        self._vectors: dict[int, bytes] = {}
        self._templates: dict[tuple[str, int, bool, int], list[bytes]] = {}
        self.requests = 0

    def behaviour(self, model: str) -> Behaviour:
        b = self._behaviours.get(model)
        if b is None:
            b = self._behaviours[model] = parse_behaviour(model, self.default)
        return b

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-bench{next(self._ids):012x}"

    @staticmethod
    def completion_tokens(req: dict[str, Any], b: Behaviour) -> int:
        cap = _int(req.get("max_completion_tokens")) or _int(req.get("max_tokens"))
        return b.tokens if cap is None else max(0, min(b.tokens, cap))

    @staticmethod
    def prompt_tokens(body: bytes) -> int:
        # An approximation (about 4 bytes per token) is enough for a benchmark.
        return max(1, len(body) // 4)

    @staticmethod
    def usage(prompt: int, completion: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def completion(self, req: dict[str, Any], body: bytes) -> bytes:
        n = self.completion_tokens(req, self.behaviour(str(req.get("model", ""))))
        text = "".join(_word(i) for i in range(n))
        return orjson.dumps(
            {
                "id": self.new_id("chatcmpl"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": req.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "stop" if n else "length",
                    }
                ],
                "usage": self.usage(self.prompt_tokens(body), n),
                "service_tier": "default",
                "system_fingerprint": FINGERPRINT,
            }
        )

    def stream_events(self, req: dict[str, Any], body: bytes) -> tuple[Behaviour, list[bytes]]:
        """The SSE events of a stream, each already framed as one HTTP chunk: the role and
        first token, one per further token, then finish (+ usage) + ``[DONE]`` + the end.

        Rendered once per shape and reused with the id and timestamp swapped in (both have
        a fixed width, so the chunk sizes stay right)."""
        model = str(req.get("model", ""))
        b = self.behaviour(model)
        n = self.completion_tokens(req, b)
        opts = req.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        shape = (model, n, with_usage, self.prompt_tokens(body))
        template = self._templates.get(shape)
        if template is None:
            if len(self._templates) > 4096:
                self._templates.clear()
            template = self._templates[shape] = self._render_stream(*shape)
        new_id = self.new_id("chatcmpl").encode()
        created = b"%d" % int(time.time())
        return b, [s.replace(_ID_SLOT, new_id).replace(_CREATED_SLOT, created) for s in template]

    def _render_stream(self, model: str, n: int, with_usage: bool, prompt: int) -> list[bytes]:
        head = {
            "id": _ID_SLOT.decode(),
            "object": "chat.completion.chunk",
            "created": int(_CREATED_SLOT),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        }

        def event(delta: dict[str, Any], finish: str | None) -> bytes:
            chunk: dict[str, Any] = {
                **head,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if with_usage:
                chunk["usage"] = None
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        role = event({"role": "assistant", "content": "", "refusal": None}, None)
        tokens = [event({"content": _word(i)}, None) for i in range(n)]
        tail = event({}, "stop" if n else "length")
        if with_usage:
            last = {**head, "choices": [], "usage": self.usage(prompt, n)}
            tail += b"data: " + orjson.dumps(last) + b"\n\n"
        tail += _DONE
        steps = [role + (tokens[0] if tokens else b""), *tokens[1:], tail]
        framed = [_chunked(s) for s in steps]
        framed[-1] += b"0\r\n\r\n"
        return framed

    def embeddings(self, req: dict[str, Any], body: bytes) -> bytes:
        inp = req.get("input")
        count = len(inp) if isinstance(inp, list) and inp and not isinstance(inp[0], int) else 1
        dims = _int(req.get("dimensions")) or self.dimensions
        vector = self._vectors.get(dims)
        if vector is None:
            value = round(1 / dims**0.5, 6)
            vector = self._vectors[dims] = orjson.dumps([value] * dims)
        data = b",".join(
            b'{"object":"embedding","index":%d,"embedding":%b}' % (i, vector) for i in range(count)
        )
        prompt = self.prompt_tokens(body)
        return b'{"object":"list","data":[%b],"model":%b,"usage":%b}' % (
            data,
            orjson.dumps(req.get("model", "")),
            orjson.dumps({"prompt_tokens": prompt, "total_tokens": prompt}),
        )

    @staticmethod
    def models() -> bytes:
        return orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1715367049, "owned_by": "system"}
                    for m in ("bench-fast", "bench-slow", "bench-embed")
                ],
            }
        )


def _word(i: int) -> str:
    w = WORDS[i % len(WORDS)]
    return w if i == 0 else " " + w


def _error(message: str) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    )


class Connection(asyncio.Protocol):
    """One client connection: parse requests with httptools, answer them in order."""

    def __init__(self, answers: Answers) -> None:
        self._answers = answers
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body: list[bytes] = []
        self._queue: deque[tuple[bytes, bytes, bytes, bool]] = deque()
        self._busy = False  # a delayed stream is being written
        self._steps: list[bytes] = []
        self._step = 0
        self._tpt = 0.0
        self._keep_alive = True
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._write_json(400, _error("malformed HTTP request"), keep_alive=False)

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method()
        keep = self._parser.should_keep_alive()
        self._queue.append((method, self._url, b"".join(self._body), keep))
        if not self._busy:
            self._drain()

    # -- answering -----------------------------------------------------------------------
    def _drain(self) -> None:
        while self._queue and not self._busy and self._transport is not None:
            method, url, body, keep = self._queue.popleft()
            self._answers.requests += 1
            self._handle(method, url.split(b"?", 1)[0], body, keep)

    def _handle(self, method: bytes, path: bytes, body: bytes, keep: bool) -> None:
        a = self._answers
        if path.endswith(b"/models") and method == b"GET":
            self._write_json(200, a.models(), keep)
            return
        chat = path.endswith(b"/chat/completions")
        if not chat and not path.endswith(b"/embeddings"):
            self._write_json(404, _error(f"no route {path.decode('latin-1')}"), keep)
            return
        if method != b"POST":
            self._write_json(405, _error("use POST"), keep)
            return
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._write_json(400, _error("the body is not JSON"), keep)
            return
        if not isinstance(req, dict):
            self._write_json(400, _error("the body must be a JSON object"), keep)
            return
        if not chat:
            self._write_json(200, a.embeddings(req, body), keep)
        elif req.get("stream") is True:
            self._stream(req, body, keep)
        else:
            b = a.behaviour(str(req.get("model", "")))
            answer = a.completion(req, body)
            if b.ttft_ms > 0:
                self._busy = True
                self._timer = self._loop.call_later(
                    b.ttft_ms / 1000, self._delayed_json, answer, keep
                )
            else:
                self._write_json(200, answer, keep)

    def _write_json(self, status: int, body: bytes, keep_alive: bool) -> None:
        t = self._transport
        if t is None:
            return
        head = _JSON_HEAD % (status, _REASONS.get(status, b"Error"), len(body))
        conn = b"connection: keep-alive\r\n\r\n" if keep_alive else b"connection: close\r\n\r\n"
        t.write(head + conn + body)
        if not keep_alive:
            t.close()

    def _delayed_json(self, body: bytes, keep: bool) -> None:
        self._timer = None
        self._busy = False
        self._write_json(200, body, keep)
        self._drain()

    def _stream(self, req: dict[str, Any], body: bytes, keep: bool) -> None:
        b, steps = self._answers.stream_events(req, body)
        t = self._transport
        assert t is not None
        conn = b"connection: keep-alive\r\n\r\n" if keep else b"connection: close\r\n\r\n"
        if b.ttft_ms <= 0 and b.tpt_ms <= 0:
            t.write(_SSE_HEAD + conn + b"".join(steps))
            if not keep:
                t.close()
            return
        t.write(_SSE_HEAD + conn)
        self._busy = True
        self._keep_alive = keep
        self._steps = steps
        self._step = 0
        self._tpt = b.tpt_ms / 1000
        self._timer = self._loop.call_later(b.ttft_ms / 1000, self._next_step)

    def _next_step(self) -> None:
        self._timer = None
        t = self._transport
        if t is None:
            return
        t.write(self._steps[self._step])
        self._step += 1
        if self._step < len(self._steps):
            self._timer = self._loop.call_later(self._tpt, self._next_step)
            return
        self._busy = False
        self._steps = []
        if not self._keep_alive:
            t.close()
            return
        self._drain()


async def serve(host: str, port: int, answers: Answers, ready: asyncio.Future[int] | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(answers), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"fast_upstream listening on http://{host}:{bound}", flush=True)
    if ready is not None:
        ready.set_result(bound)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with server:
        await stop


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    p.add_argument("--tokens", type=int, default=16, help="completion tokens per answer")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="default time to first token")
    p.add_argument("--token-ms", type=float, default=0.0, help="default time between tokens")
    p.add_argument("--dimensions", type=int, default=256, help="default embedding size")
    args = p.parse_args(argv)
    answers = Answers(Behaviour(args.ttft_ms, args.token_ms, args.tokens), args.dimensions)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port, answers, None))


if __name__ == "__main__":
    main()
