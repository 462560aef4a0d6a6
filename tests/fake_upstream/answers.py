"""What the fake answers, shaped exactly like OpenAI's responses.

The reply text is a deterministic function of the request's messages (same messages, same
words, whatever the model), made of words that are each one o200k token, so a reply of N
content chunks is N completion tokens whether counted by chunk or by tiktoken."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from . import tokens
from .behaviours import Behaviour

SYSTEM_FINGERPRINT = "fp_f4ke5eed01"
DEFAULT_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "o3-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
MODELS_CREATED = 1_715_367_049
MIN_WORDS, MORE_WORDS = 5, 6  # default replies have 5..10 words
# Each word is a single o200k token both alone and after a space (tests check this).
_WORD_TEXT = (
    "the a this fake model answers your request with some words that are chosen from "
    "small list so every reply is stable and easy to count each word one token here we "
    "go again today data test cost gateway budget stream cache route price fast slow "
    "good simple clear short long next first last call answer result value"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(slots=True)
class ChoicePlan:
    index: int
    pieces: list[str]  # content pieces, or a tool call's argument pieces; one token each
    tool_call: tuple[str, str] | None  # (call id, function name)
    finish_reason: str


@dataclass(slots=True)
class ChatPlan:
    """Everything one chat answer consists of, ready to render whole or as chunks."""

    id: str
    created: int
    model: str
    choices: list[ChoicePlan]
    usage: dict[str, Any] | None  # None: report no usage
    top_logprobs: int | None  # None: no logprobs
    include_usage: bool  # stream: every chunk has "usage", a usage chunk ends it
    extra: Mapping[str, Any] | None
    seed: bytes


def plan_chat(body: dict[str, Any], behaviour: Behaviour, answer_id: str) -> ChatPlan:
    seed = hashlib.blake2b(orjson.dumps(body.get("messages")), digest_size=32).digest()
    u = behaviour.usage or {}
    reasoning = u.get("reasoning_tokens", behaviour.reasoning_tokens or 0)
    cap = _int(body.get("max_completion_tokens"), _int(body.get("max_tokens"), None))
    room = None if cap is None else max(cap - reasoning, 0)
    n = max(_int(body.get("n"), 1) or 1, 1)
    call = _tool_call(body)
    choices = []
    for index in range(n):
        if call is not None:
            name, arguments = call
            wanted = tokens.split(arguments)
            tool_call: tuple[str, str] | None = (f"call_{seed.hex()[:20]}{index:04d}", name)
        else:
            count = behaviour.tokens
            if count is None:
                count = MIN_WORDS + seed[index % 32] % MORE_WORDS
            wanted = _words(seed, index, count)
            tool_call = None
        pieces = wanted if room is None else wanted[:room]
        finish = "tool_calls" if tool_call else "stop"
        if len(pieces) < len(wanted):
            finish = "length"
        choices.append(ChoicePlan(index, pieces, tool_call, finish))

    usage = None
    if not behaviour.no_usage:
        prompt = u.get("prompt_tokens", tokens.chat_prompt(body))
        completion = u.get("completion_tokens", sum(len(c.pieces) for c in choices) + reasoning)
        usage = _chat_usage(
            prompt,
            completion,
            u.get("total_tokens", prompt + completion),
            u.get("cached_tokens", behaviour.cached_tokens or 0),
            reasoning,
        )
    so = body.get("stream_options")
    return ChatPlan(
        id=answer_id,
        created=int(time.time()),
        model=str(body.get("model", "")),
        choices=choices,
        usage=usage,
        top_logprobs=(_int(body.get("top_logprobs"), 0) or 0) if body.get("logprobs") else None,
        include_usage=bool(isinstance(so, dict) and so.get("include_usage")),
        extra=behaviour.extra,
        seed=seed,
    )


def completion(plan: ChatPlan) -> dict[str, Any]:
    """The non-stream ``chat.completion`` object."""
    choices = []
    for c in plan.choices:
        text = "".join(c.pieces)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if c.tool_call else text,
            "refusal": None,
            "annotations": [],
        }
        logprobs = None
        if c.tool_call:
            call_id, name = c.tool_call
            message["tool_calls"] = [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}
            ]
        elif plan.top_logprobs is not None:
            logprobs = {"content": _logprobs(plan, c, 0, len(c.pieces)), "refusal": None}
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
        )
    out: dict[str, Any] = {
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": choices,
    }
    if plan.usage is not None:
        out["usage"] = plan.usage
    out["service_tier"] = "default"
    out["system_fingerprint"] = SYSTEM_FINGERPRINT
    if plan.extra:
        out.update(plan.extra)
    return out


def chunks(plan: ChatPlan) -> Iterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a stream, in order (without ``[DONE]``)."""
    head: dict[str, Any] = {
        "id": plan.id,
        "object": "chat.completion.chunk",
        "created": plan.created,
        "model": plan.model,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }

    def chunk(index: int, delta: dict[str, Any], logprobs: Any, finish: str | None) -> Any:
        out = {
            **head,
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            ],
        }
        if plan.include_usage:
            out["usage"] = None
        if plan.extra:
            out.update(plan.extra)
        return out

    for c in plan.choices:
        first: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
        if c.tool_call:
            call_id, name = c.tool_call
            first["content"] = None
            first["tool_calls"] = [
                {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            ]
        yield chunk(c.index, first, None, None)
    for i in range(max((len(c.pieces) for c in plan.choices), default=0)):
        for c in plan.choices:
            if i >= len(c.pieces):
                continue
            piece = c.pieces[i]
            if c.tool_call:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                yield chunk(c.index, delta, None, None)
            elif plan.top_logprobs is None:
                yield chunk(c.index, {"content": piece}, None, None)
            else:
                lp = {"content": _logprobs(plan, c, i, i + 1), "refusal": None}
                yield chunk(c.index, {"content": piece}, lp, None)
    for c in plan.choices:
        yield chunk(c.index, {}, None, c.finish_reason)
    if plan.include_usage and plan.usage is not None:
        last = {**head, "choices": [], "usage": plan.usage}
        if plan.extra:
            last.update(plan.extra)
        yield last


def embeddings(body: dict[str, Any], behaviour: Behaviour) -> dict[str, Any]:
    """The ``list`` of embeddings for a validated embeddings request."""
    model = str(body.get("model", ""))
    raw = body["input"]
    items = [raw] if isinstance(raw, str) or _is_token_list(raw) else raw
    dims = _int(body.get("dimensions"), None) or (3072 if "large" in model else 1536)
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(items):
        key = item.encode() if isinstance(item, str) else orjson.dumps(item)
        packed = _vector(key, dims)
        value: Any = base64.b64encode(packed).decode() if as_base64 else _floats(packed, dims)
        data.append({"object": "embedding", "index": index, "embedding": value})
    u = behaviour.usage or {}
    prompt = u.get("prompt_tokens", tokens.embedding_input(raw))
    out: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if not behaviour.no_usage:
        out["usage"] = {"prompt_tokens": prompt, "total_tokens": u.get("total_tokens", prompt)}
    if behaviour.extra:
        out.update(behaviour.extra)
    return out


def models(names: tuple[str, ...]) -> dict[str, Any]:
    data = [
        {"id": name, "object": "model", "created": MODELS_CREATED, "owned_by": "system"}
        for name in names
    ]
    return {"object": "list", "data": data}


def valid_embedding_input(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    if _is_token_list(value):
        return True
    return all(isinstance(v, str) or (_is_token_list(v) and v) for v in value)


# -- helpers ---------------------------------------------------------------------------
def _chat_usage(
    prompt: int, completion: int, total: int, cached: int, reasoning: int
) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _words(seed: bytes, index: int, count: int) -> list[str]:
    n = len(_WORDS)
    words = [_WORDS[(seed[(i + index) % 32] + 7 * i + 13 * index) % n] for i in range(count)]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _logprobs(plan: ChatPlan, c: ChoicePlan, start: int, stop: int) -> list[dict[str, Any]]:
    out = []
    k = plan.top_logprobs or 0
    for i in range(start, stop):
        token = c.pieces[i]
        lp = -round(plan.seed[(i + c.index) % 32] / 255 * 0.5, 6)
        alternatives = [(token, lp)] + [
            (" " + _WORDS[(plan.seed[i % 32] + j) % len(_WORDS)], lp - 1.5 * j) for j in range(1, k)
        ]
        out.append(
            {
                "token": token,
                "logprob": lp,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in alternatives
                ],
            }
        )
    return out


def _tool_call(body: dict[str, Any]) -> tuple[str, str] | None:
    """(function name, JSON arguments) when the request makes the model call a tool."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    functions = [t["function"] for t in tools if isinstance(t, dict) and "function" in t]
    if not functions:
        return None
    fn = functions[0]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        fn = next((f for f in functions if f.get("name") == wanted), fn)
    params = fn.get("parameters") or {}
    args = {k: _example(s) for k, s in (params.get("properties") or {}).items()}
    return str(fn.get("name", "tool")), orjson.dumps(args).decode()


_EXAMPLES: dict[str, Any] = {
    "string": "fake",
    "integer": 1,
    "number": 1.5,
    "boolean": True,
    "array": [],
    "object": {},
}


def _example(schema: Any) -> Any:
    """A value that fits a (simple) JSON schema."""
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0] if kind else None
    return _EXAMPLES.get(kind) if isinstance(kind, str) else None


@lru_cache(maxsize=4096)
def _vector(key: bytes, dims: int) -> bytes:
    """A deterministic unit vector for ``key``, packed as little-endian float32 (OpenAI's
    base64 format); the float format decodes the same bytes, so both formats agree."""
    ints = struct.unpack(f"<{dims}h", hashlib.shake_256(key).digest(dims * 2))
    norm = math.sqrt(sum(i * i for i in ints)) or 1.0
    return struct.pack(f"<{dims}f", *(i / norm for i in ints))


def _floats(packed: bytes, dims: int) -> list[float]:
    return list(struct.unpack(f"<{dims}f", packed))


def _is_token_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _int(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
