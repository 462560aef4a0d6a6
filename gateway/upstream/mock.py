"""The built-in ``mock`` provider: deterministic OpenAI-shaped answers, no network.

The answer depends on the request (same request, same answer), ``usage`` is counted
with the same tokenizer the gateway uses, streams arrive chunk by chunk, tool
definitions produce a tool call and ``response_format`` produces JSON. It exists so a
newcomer can run the whole gateway without an API key, and for demos and benchmarks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from typing import Any

import orjson

from ..config.deployment import ProviderConfig
from ..tokens import TokenCounter
from .base import ChunkSink, JsonResponse
from .errors import UpstreamRejected

_WORDS = tuple(
    "the gateway answers this request with a deterministic reply so budgets routing caching "
    "and metering can be tried without any provider key every word here is counted and "
    "priced like real output tokens from a model".split(" ")
)


def _seed(body: dict[str, Any]) -> bytes:
    material = {k: body.get(k) for k in ("model", "messages", "input", "tools", "n", "seed")}
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).digest()


def _last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            c = msg.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


class MockUpstream:
    def __init__(self, name: str, cfg: ProviderConfig, tokens: TokenCounter) -> None:
        self.name = name
        self._tokens = tokens
        self._latency = cfg.mock_latency_ms / 1000

    async def aclose(self) -> None:
        return None

    # -- answers -----------------------------------------------------------------------
    def _reply_words(self, body: dict[str, Any], seed: bytes, index: int) -> list[str]:
        cap = body.get("max_completion_tokens") or body.get("max_tokens") or 64
        n = min(int(cap), 8 + (seed[index % 32] % 40))
        words = [_WORDS[(seed[(i + index) % 32] + i) % len(_WORDS)] for i in range(max(n - 1, 1))]
        topic = _last_user_text(body).split()[:3]
        return ["Mock:", *topic, *words][: max(int(cap), 1)]

    def _choice_message(self, body: dict[str, Any], seed: bytes, index: int) -> dict[str, Any]:
        tools = body.get("tools")
        if tools and body.get("tool_choice") != "none":
            fn = tools[0].get("function", {}) if isinstance(tools[0], dict) else {}
            return {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_" + seed.hex()[:24],
                        "type": "function",
                        "function": {"name": fn.get("name", "tool"), "arguments": "{}"},
                    }
                ],
                "refusal": None,
            }
        text = " ".join(self._reply_words(body, seed, index))
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
            text = orjson.dumps({"reply": text}).decode()
        return {"role": "assistant", "content": text, "refusal": None}

    def _usage(self, body: dict[str, Any], model: str, texts: list[str]) -> dict[str, int]:
        prompt = self._tokens.chat_prompt(body, model, None, 85).tokens
        completion = sum(self._tokens.count_text(t, model) for t in texts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _chat(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        seed = _seed(body)
        n = int(body.get("n") or 1)
        choices = []
        texts = []
        for i in range(n):
            msg = self._choice_message(body, seed, i)
            texts.append(msg["content"] or orjson.dumps(msg.get("tool_calls")).decode())
            choices.append(
                {
                    "index": i,
                    "message": msg,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if msg.get("tool_calls") else "stop",
                }
            )
        return {
            "id": "chatcmpl-mock" + seed.hex()[:20],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", model),
            "choices": choices,
            "usage": self._usage(body, model, texts),
            "system_fingerprint": "fp_mock",
        }

    def _embeddings(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        raw = body.get("input")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        dims = int(body.get("dimensions") or 256)
        as_b64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            vec = _vector(orjson.dumps(item), dims)
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = self._tokens.embedding_input(raw, model, None)
        return {
            "object": "list",
            "data": data,
            "model": body.get("model", model),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # -- the Upstream interface ----------------------------------------------------------
    async def post_json(self, path: str, body: bytes, model: str) -> JsonResponse:
        t0 = time.perf_counter()
        req = orjson.loads(body)
        if self._latency:
            await asyncio.sleep(self._latency)
        if path == "/chat/completions":
            out = self._chat(req, model)
        elif path == "/embeddings":
            out = self._embeddings(req, model)
        else:
            raise UpstreamRejected(self.name, model, 404, f"mock has no {path}", "", None, None)
        return JsonResponse(orjson.dumps(out), time.perf_counter() - t0)

    async def open_stream(self, path: str, body: bytes, model: str) -> MockStream:
        req = orjson.loads(body)
        if path != "/chat/completions":
            raise UpstreamRejected(self.name, model, 400, "only chat streams", "", None, None)
        full = self._chat(req, model)
        return MockStream(_sse_events(full, req), self._latency)


class MockStream:
    def __init__(self, events: list[bytes], latency: float) -> None:
        self._events = events
        self._i = 0
        self._latency = latency

    async def read(self) -> bytes:
        if self._i >= len(self._events):
            return b""
        if self._latency and self._i == 0:
            await asyncio.sleep(self._latency)
        ev = self._events[self._i]
        self._i += 1
        return ev

    async def push(self, sink: ChunkSink) -> bool:
        return False  # in-process: nothing to gain

    async def aclose(self) -> None:
        self._i = len(self._events)


def _sse_events(full: dict[str, Any], req: dict[str, Any]) -> list[bytes]:
    base = {
        "id": full["id"],
        "object": "chat.completion.chunk",
        "created": full["created"],
        "model": full["model"],
        "system_fingerprint": full["system_fingerprint"],
    }
    events: list[bytes] = []

    def emit(chunk: dict[str, Any]) -> None:
        events.append(b"data: " + orjson.dumps({**base, **chunk}) + b"\n\n")

    for choice in full["choices"]:
        i = choice["index"]
        msg = choice["message"]
        emit(
            {
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            }
        )
        if msg.get("tool_calls"):
            emit(
                {
                    "choices": [
                        {
                            "index": i,
                            "delta": {"tool_calls": [{"index": 0, **msg["tool_calls"][0]}]},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                }
            )
        else:
            words = msg["content"].split(" ")
            for j, w in enumerate(words):
                piece = w if j == 0 else " " + w
                emit(
                    {
                        "choices": [
                            {
                                "index": i,
                                "delta": {"content": piece},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    }
                )
        emit(
            {
                "choices": [
                    {
                        "index": i,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": choice["finish_reason"],
                    }
                ]
            }
        )
    opts = req.get("stream_options") or {}
    if opts.get("include_usage"):
        emit({"choices": [], "usage": full["usage"]})
    events.append(b"data: [DONE]\n\n")
    return events


def _vector(material: bytes, dims: int) -> list[float]:
    out: list[float] = []
    counter = 0
    while len(out) < dims:
        block = hashlib.sha256(material + counter.to_bytes(4, "little")).digest()
        out.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    vec = out[:dims]
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in vec]
