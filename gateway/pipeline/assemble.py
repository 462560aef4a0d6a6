"""Converting between a chat stream and a chat completion.

The cache stores every answer assembled (one ``chat.completion`` object) so that a
stream can be served to a non-stream request and the other way round; a stream is
rebuilt from the completion as SSE chunks."""

from __future__ import annotations

from typing import Any

import orjson

_MESSAGE_TEXT = ("content", "refusal", "reasoning_content")
_TOP = ("id", "created", "model", "system_fingerprint", "service_tier")


def assemble(payloads: list[bytes], usage: dict[str, Any] | None) -> dict[str, Any]:
    """Fold stream chunk payloads into the ``chat.completion`` they describe."""
    out: dict[str, Any] = {"object": "chat.completion"}
    choices: dict[int, dict[str, Any]] = {}
    for payload in payloads:
        chunk = orjson.loads(payload)
        if not isinstance(chunk, dict):
            continue
        for k in _TOP:
            if k in chunk and k not in out:
                out[k] = chunk[k]
        for c in chunk.get("choices") or ():
            idx = c.get("index", 0)
            choice = choices.setdefault(
                idx,
                {
                    "index": idx,
                    "message": {"role": "assistant", "content": None},
                    "logprobs": None,
                    "finish_reason": None,
                },
            )
            msg = choice["message"]
            delta = c.get("delta") or {}
            if delta.get("role"):
                msg["role"] = delta["role"]
            for field in _MESSAGE_TEXT:
                piece = delta.get(field)
                if isinstance(piece, str):
                    msg[field] = (msg.get(field) or "") + piece
            for tc in delta.get("tool_calls") or ():
                calls = msg.setdefault("tool_calls", [])
                i = tc.get("index", len(calls))
                while len(calls) <= i:
                    calls.append(
                        {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                    )
                call = calls[i]
                if tc.get("id"):
                    call["id"] = tc["id"]
                if tc.get("type"):
                    call["type"] = tc["type"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    call["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    call["function"]["arguments"] += fn["arguments"]
            lp = c.get("logprobs")
            if isinstance(lp, dict):
                dst = choice["logprobs"] or {"content": None}
                for key in ("content", "refusal"):
                    if isinstance(lp.get(key), list):
                        dst[key] = (dst.get(key) or []) + lp[key]
                choice["logprobs"] = dst
            if c.get("finish_reason"):
                choice["finish_reason"] = c["finish_reason"]
    for choice in choices.values():
        choice["message"].setdefault("refusal", None)
    out["choices"] = [choices[i] for i in sorted(choices)]
    if usage is not None:
        out["usage"] = usage
    return out


def to_chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    """The stream chunks that carry ``completion`` (without the usage chunk)."""
    base = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    for k in ("system_fingerprint", "service_tier"):
        if k in completion:
            base[k] = completion[k]
    chunks: list[dict[str, Any]] = []
    for choice in completion.get("choices") or ():
        idx = choice.get("index", 0)
        msg = choice.get("message") or {}
        delta: dict[str, Any] = {"role": msg.get("role", "assistant")}
        for field in _MESSAGE_TEXT:
            if msg.get(field) is not None:
                delta[field] = msg[field]
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **tc} for i, tc in enumerate(msg["tool_calls"])]
        chunks.append(
            {
                **base,
                "choices": [
                    {
                        "index": idx,
                        "delta": delta,
                        "logprobs": choice.get("logprobs"),
                        "finish_reason": None,
                    }
                ],
            }
        )
        chunks.append(
            {
                **base,
                "choices": [
                    {
                        "index": idx,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": choice.get("finish_reason") or "stop",
                    }
                ],
            }
        )
    return chunks
