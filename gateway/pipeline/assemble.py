"""Converting between a chat stream and a chat completion.

The cache stores every answer assembled (one ``chat.completion`` object) so that a
stream can be served to a non-stream request and the other way round; a stream is
rebuilt from the completion as SSE chunks."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

_MESSAGE_TEXT = ("content", "refusal", "reasoning_content")
_TOP = ("id", "created", "model", "system_fingerprint", "service_tier")

# Where a chunk's only delta field, its content, starts: the opening quote of the string.
_CONTENT_AT = re.compile(rb'"delta"\s*:\s*\{\s*"content"\s*:\s*"')
# The rest of a JSON string's body, up to and including its closing quote.
_STRING_REST = re.compile(rb'(?:[^"\\]|\\.)*"', re.DOTALL)


class _TokenChunks:
    """The bytes around the content of a stream's token chunks, to read the content of the
    next ones without parsing them.

    An upstream writes every token chunk of a stream the same way (same id, created,
    model, fingerprint, key order, spacing); only the content string differs. Taken from
    a chunk whose one choice has index 0 and a delta with content only, and nothing else
    set: ``prefix`` ends at the opening quote of the content, ``suffix`` starts at its
    closing quote, and a probe proves it (another string put between them parses as the
    same chunk with that content). A payload that starts with ``prefix``, ends with
    ``suffix`` and has a valid JSON string between them is then that same chunk with
    another content, since a string holds no unescaped quote; anything else is parsed in
    full."""

    __slots__ = ("parts", "plen", "prefix", "slen", "suffix")

    def __init__(self, prefix: bytes, suffix: bytes, parts: list[str]) -> None:
        self.prefix, self.suffix, self.parts = prefix, suffix, parts
        self.plen, self.slen = len(prefix), len(suffix)

    @staticmethod
    def plain(chunk: dict[str, Any]) -> bool:
        """Whether ``chunk`` is a plain token chunk: one choice, index 0, a delta with a
        content string only, nothing else set on the choice."""
        cs = chunk.get("choices")
        if not (isinstance(cs, list) and len(cs) == 1 and isinstance(cs[0], dict)):
            return False
        c = cs[0]
        delta = c.get("delta")
        if c.get("index", 0) != 0 or not isinstance(delta, dict) or list(delta) != ["content"]:
            return False  # (the probe in of() would refuse another delta too, at more cost)
        if not isinstance(delta["content"], str):
            return False
        # logprobs, a finish reason, or a field unknown here
        return all(v is None for k, v in c.items() if k not in ("index", "delta"))

    @classmethod
    def of(cls, payload: bytes, chunk: dict[str, Any], parts: list[str]) -> _TokenChunks | None:
        """The framing of plain token chunk ``chunk`` (see plain), if its bytes prove it."""
        c = chunk["choices"][0]
        start = _CONTENT_AT.search(payload)
        end = _STRING_REST.match(payload, start.end()) if start is not None else None
        if start is None or end is None:
            return None
        prefix, suffix = payload[: start.end()], payload[end.end() - 1 :]
        # Proof that these bytes frame this chunk's content and nothing else (the match
        # could be another object's, an extension field holding a "delta"): with another
        # string between them, the chunk parses the same but for that content.
        try:
            probe = orjson.loads(prefix + b"\\u0000" + suffix)
        except orjson.JSONDecodeError:
            return None
        if probe != {**chunk, "choices": [{**c, "delta": {"content": "\x00"}}]}:
            return None
        return cls(prefix, suffix, parts)

    def content(self, payload: bytes) -> str | None:
        """The content of ``payload`` if it is a chunk like this one, else None."""
        end = len(payload) - self.slen  # where the closing quote is, if it is one
        if end < self.plen or not payload.startswith(self.prefix):
            return None
        if not payload.endswith(self.suffix):
            return None
        try:  # the string with its quotes: prefix ends with one, suffix starts with one
            text = orjson.loads(payload[self.plen - 1 : end + 1])
        except orjson.JSONDecodeError:
            return None
        return text if isinstance(text, str) else None


def assemble(payloads: Iterable[bytes], usage: dict[str, Any] | None) -> dict[str, Any]:
    """Fold stream chunk payloads into the ``chat.completion`` they describe.

    Every streamed answer that the cache stores comes through here once, so it keeps the
    work per chunk small: text pieces are collected in lists and joined once at the end,
    the top-level fields are looked for only until each has been found, and once a plain
    token chunk has been parsed the ones like it are read without parsing (_TokenChunks).
    Measured on a 16-token stream: 48 -> 40 us, 20 of them parsing the JSON; with
    _TokenChunks 28 -> 16 us (on a slower VM, best of five interleaved)."""
    out: dict[str, Any] = {"object": "chat.completion"}
    missing = list(_TOP)
    choices: dict[int, dict[str, Any]] = {}
    texts: dict[tuple[int, str], list[str]] = {}
    tokens: _TokenChunks | None = None
    framing = True  # until the first plain token chunk has been tried
    for payload in payloads:
        if tokens is not None:
            piece = tokens.content(payload)
            if piece is not None:
                tokens.parts.append(piece)
                continue
        chunk = orjson.loads(payload)
        if not isinstance(chunk, dict):
            continue
        if missing:
            for k in [k for k in missing if k in chunk]:
                out[k] = chunk[k]
                missing.remove(k)
        for c in chunk.get("choices") or ():
            idx = c.get("index", 0)
            choice = choices.get(idx)
            if choice is None:
                choice = choices[idx] = {
                    "index": idx,
                    "message": {"role": "assistant", "content": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            delta = c.get("delta")
            if delta:
                msg = choice["message"]
                if delta.get("role"):
                    msg["role"] = delta["role"]
                for field in _MESSAGE_TEXT:
                    piece = delta.get(field)
                    if isinstance(piece, str):
                        parts = texts.get((idx, field))
                        if parts is None:
                            texts[idx, field] = [piece]
                            msg.setdefault(field, None)  # its place among the keys
                        else:
                            parts.append(piece)
                tool_calls = delta.get("tool_calls")
                if tool_calls:
                    _add_tool_calls(msg.setdefault("tool_calls", []), tool_calls)
            lp = c.get("logprobs")
            if isinstance(lp, dict):
                dst = choice["logprobs"]
                if dst is None:
                    dst = choice["logprobs"] = {"content": None}
                for key in ("content", "refusal"):
                    items = lp.get(key)
                    if isinstance(items, list):
                        have = dst.get(key)
                        if have is None:
                            dst[key] = list(items)
                        else:
                            have.extend(items)  # not +: a long stream's would be quadratic
            if c.get("finish_reason"):
                choice["finish_reason"] = c["finish_reason"]
        if framing and _TokenChunks.plain(chunk):
            # One try per stream: a stream whose bytes do not frame its first plain chunk
            # is parsed in full, not searched and probed again at every chunk.
            framing = False
            tokens = _TokenChunks.of(payload, chunk, texts[0, "content"])
    for (idx, field), parts in texts.items():
        choices[idx]["message"][field] = "".join(parts)
    for choice in choices.values():
        choice["message"].setdefault("refusal", None)
    out["choices"] = [choices[i] for i in sorted(choices)]
    if usage is not None:
        out["usage"] = usage
    return out


def choice_texts(choices: Any, key: str) -> list[str]:
    """The texts of a completion's (``key`` = "message") or a chunk's ("delta") choices, as
    counted for usage: content, refusal, reasoning, tool names and arguments."""
    texts: list[str] = []
    if not isinstance(choices, list):
        return texts
    for c in choices:
        if not isinstance(c, dict):
            continue
        part = c.get(key)
        if not isinstance(part, dict):
            continue
        for field in ("content", "refusal", "reasoning_content"):
            v = part.get(field)
            if isinstance(v, str):
                texts.append(v)
        calls = part.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    texts.extend(
                        v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str)
                    )
    return texts


def _add_tool_calls(calls: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    for tc in deltas:
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
