"""The fake's HTTP surface: OpenAI's ``/v1`` endpoints and the ``/_control`` API.

Every ``/v1`` call goes through the same steps: record it, check the key, validate the
body, work out its behaviour, wait ``delay``, then misbehave or answer."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from . import answers
from .behaviours import Behaviour, DirectiveError, Scripts
from .errors import MISSING_KEY, error_body
from .recorder import Received, Recorder

HEADER = "x-fake-behaviour"
# A status line no HTTP client accepts, for ``malformed: "http"``.
GARBAGE_HTTP = b"HTTP/1.1 ZZZ Not HTTP\r\n\x00\x01garbage\r\n\r\n"
TRUNCATED_JSON = b'{"id": "chatcmpl-truncated", "object": "chat.comp'
GARBAGE_EVENT = b'data: {"id": "chatcmpl-garbage", "choices": [{\n\n'
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Settings:
    api_key: str | None = None  # when set, requests must carry "Bearer <api_key>"
    latency: float = 0.0  # default delay before every /v1 answer
    models: tuple[str, ...] | None = None  # when set, other models answer 404


class FakeApp:
    def __init__(self, settings: Settings, scripts: Scripts, recorder: Recorder) -> None:
        self._settings = settings
        self._scripts = scripts
        self._recorder = recorder
        self._default = Behaviour(delay=settings.latency or None)
        self._ids = itertools.count(1)

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/_control/script", self._control_script)
        app.router.add_post("/_control/reset", self._control_reset)
        app.router.add_get("/_control/stats", self._control_stats)
        return app

    # -- /v1 ------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        admitted = await self._admit(request, self._invalid_chat)
        if isinstance(admitted, web.StreamResponse):
            return admitted
        body, behaviour = admitted
        plan = answers.plan_chat(body, behaviour, f"chatcmpl-fake{next(self._ids):020d}")
        answer = (
            _Stream(plan, behaviour) if body.get("stream") is True else answers.completion(plan)
        )
        return await self._serve(request, behaviour, plan.model, answer)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        admitted = await self._admit(request, self._invalid_embeddings)
        if isinstance(admitted, web.StreamResponse):
            return admitted
        body, behaviour = admitted
        answer = answers.embeddings(body, behaviour)
        return await self._serve(request, behaviour, body["model"], answer)

    def _invalid_chat(self, body: dict[str, Any]) -> web.Response | None:
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return self._error(400, "[] is too short - 'messages'", param="messages")
        if body.get("stream_options") is not None and body.get("stream") is not True:
            return self._error(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        return None

    def _invalid_embeddings(self, body: dict[str, Any]) -> web.Response | None:
        if not answers.valid_embedding_input(body.get("input")):
            return self._error(400, "'input' is invalid or empty.", param="input")
        dims = body.get("dimensions")
        if dims is not None and not (isinstance(dims, int) and 0 < dims <= 3072):
            return self._error(400, f"Invalid value for 'dimensions': {dims!r}.", "dimensions")
        if body.get("encoding_format", "float") not in ("float", "base64"):
            return self._error(400, "Invalid value for 'encoding_format'.", "encoding_format")
        return None

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self._recorder.request(_received(request, None), None)
        denied = self._check_key(request)
        if denied is not None:
            return denied
        names = self._settings.models or answers.DEFAULT_MODELS
        return _json(answers.models(names), headers=self._headers())

    async def _admit(
        self, request: web.Request, invalid: Callable[[dict[str, Any]], web.Response | None]
    ) -> tuple[dict[str, Any], Behaviour] | web.Response:
        """Record the call; then its body and behaviour, or the error to answer instead.
        A call that fails validation does not use up a scripted behaviour."""
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        model = body.get("model") if isinstance(body, dict) else None
        model = model if isinstance(model, str) else None
        self._recorder.request(_received(request, body, raw), model)
        denied = self._check_key(request)
        if denied is not None:
            return denied
        if not isinstance(body, dict):
            return self._error(400, "We could not parse the JSON body of your request.")
        if model is None:
            return self._error(400, "you must provide a model parameter", param="model")
        if self._settings.models is not None and model not in self._settings.models:
            return self._error(404, model=model)
        rejected = invalid(body)
        if rejected is not None:
            return rejected
        try:
            behaviour = self._behaviour(request, body, model)
        except DirectiveError as exc:
            return self._error(400, f"fake upstream: {exc}", code="fake_directive")
        return body, behaviour

    def _behaviour(self, request: web.Request, body: dict[str, Any], model: str) -> Behaviour:
        behaviour = self._default
        header = request.headers.get(HEADER)
        if header:
            behaviour = behaviour.merge(Behaviour.parse(header))
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and metadata.get("fake") is not None:
            behaviour = behaviour.merge(Behaviour.parse(metadata["fake"]))
        return behaviour.merge(self._scripts.pop(model))

    def _check_key(self, request: web.Request) -> web.Response | None:
        key = self._settings.api_key
        if key is None:
            return None
        header = request.headers.get("Authorization", "")
        if header == f"Bearer {key}":
            return None
        if not header:
            return self._error(401, MISSING_KEY, overrides={"code": None})
        sent = header.removeprefix("Bearer ").strip()
        masked = f"{sent[:3]}{'*' * 8}{sent[-4:]}" if len(sent) > 8 else "***"
        return self._error(
            401,
            f"Incorrect API key provided: {masked}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
        )

    async def _serve(
        self,
        request: web.Request,
        behaviour: Behaviour,
        model: str,
        answer: dict[str, Any] | _Stream,
    ) -> web.StreamResponse:
        """Answer after ``delay``, or misbehave as ``behaviour`` says."""
        self._recorder.started()
        aborted = False
        try:
            if behaviour.delay:
                await asyncio.sleep(behaviour.delay)
            transport = request.transport
            if behaviour.malformed == "http" and transport is not None:
                transport.write(GARBAGE_HTTP)
                transport.close()
                return web.Response()  # never sent: the connection is closed
            if behaviour.status is not None and behaviour.status != 200:
                headers = self._headers(behaviour)
                if behaviour.retry_after is not None:
                    headers["Retry-After"] = _seconds(behaviour.retry_after)
                return self._error(
                    behaviour.status, model=model, overrides=behaviour.error, headers=headers
                )
            if isinstance(answer, _Stream):
                resp, aborted = await answer.send(request, self._headers(behaviour))
                return resp
            if behaviour.disconnect_after is not None and transport is not None:
                transport.close()
                return web.Response()
            if behaviour.malformed:
                return web.Response(
                    body=TRUNCATED_JSON,
                    content_type="application/json",
                    headers=self._headers(behaviour),
                )
            return _json(answer, headers=self._headers(behaviour))
        except asyncio.CancelledError:  # the caller went away while we waited
            aborted = True
            raise
        finally:
            self._recorder.finished(aborted)

    def _headers(self, behaviour: Behaviour | None = None) -> dict[str, str]:
        headers = {"x-request-id": f"req_fake{next(self._ids):024d}"}
        if behaviour is not None and behaviour.headers:
            headers.update(behaviour.headers)
        return headers

    def _error(
        self,
        status: int,
        message: str | None = None,
        param: str | None = None,
        *,
        model: str = "",
        code: str | None = None,
        overrides: Any = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        body = error_body(
            status, model, message=message, param=param, code=code, overrides=overrides
        )
        return _json(body, status=status, headers=headers or self._headers())

    # -- /_control --------------------------------------------------------------------
    async def _control_script(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await request.json(loads=orjson.loads)
            if not isinstance(data, dict):
                raise DirectiveError("expected {'model': ..., 'behaviours': [...]}")
            self._scripts.add(data.get("model", ""), data.get("behaviours") or [])
        except (DirectiveError, orjson.JSONDecodeError) as exc:
            return _json(error_body(400, message=str(exc)), status=400)
        return _json({"pending": self._scripts.pending()})

    async def _control_reset(self, request: web.Request) -> web.StreamResponse:
        self._scripts.clear()
        self._recorder.reset()
        return _json({"ok": True})

    async def _control_stats(self, request: web.Request) -> web.StreamResponse:
        return _json({**self._recorder.snapshot(), "pending": self._scripts.pending()})


class _Stream:
    """A chat answer sent as server-sent events, misbehaving on cue."""

    def __init__(self, plan: answers.ChatPlan, behaviour: Behaviour) -> None:
        self._plan = plan
        self._b = behaviour

    def _events(self) -> Iterator[bytes]:
        for chunk in answers.chunks(self._plan):
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        if not self._b.no_done:
            yield DONE

    async def send(
        self, request: web.Request, headers: dict[str, str]
    ) -> tuple[web.StreamResponse, bool]:
        """Stream the answer; returns the response and whether the caller abandoned it."""
        b = self._b
        malformed_at = _malformed_at(b.malformed)
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                **headers,
            }
        )
        try:
            await resp.prepare(request)
            for n, event in enumerate(self._events()):
                pause = b.ttft if n == 0 else b.chunk_delay
                if pause:
                    await asyncio.sleep(pause)
                if n == b.disconnect_after and request.transport is not None:
                    request.transport.close()
                    return resp, False
                if n == b.error_in_stream:
                    error = error_body(500, self._plan.model, overrides=b.error)
                    await resp.write(b"data: " + orjson.dumps(error) + b"\n\n")
                    return resp, False
                if n == malformed_at:
                    await resp.write(GARBAGE_EVENT)
                await resp.write(event)
        except ConnectionError:  # the caller closed the connection mid-stream
            return resp, True
        return resp, False


def _received(request: web.Request, body: Any, raw: bytes = b"") -> Received:
    return Received(
        method=request.method,
        path=request.path,
        headers=CIMultiDictProxy(CIMultiDict(request.headers)),
        body=body,
        raw=raw,
    )


def _json(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _malformed_at(value: bool | int | str | None) -> int | None:
    """Before which stream event to send garbage: ``True`` means after the first chunk."""
    if value is True:
        return 1
    return value if isinstance(value, int) and value is not False else None


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
