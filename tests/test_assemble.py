"""Folding a chat stream back into the completion it carries (what the cache stores for a
streamed answer), for any way the upstream splits the text into chunks."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pipeline import assemble as assemble_module
from gateway.pipeline.assemble import assemble, to_chunks

TEXT = st.text(alphabet="ab é\n", max_size=12)


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)] or [""]


@st.composite
def choices(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for idx in range(draw(st.integers(1, 3))):
        fields = {
            f: draw(TEXT)
            for f in ("content", "refusal", "reasoning_content")
            if f == "content" or draw(st.booleans())
        }
        calls = [
            {
                "id": f"call_{idx}_{i}",
                "name": draw(st.sampled_from(["f", "get_x"])),
                "args": draw(TEXT),
            }
            for i in range(draw(st.integers(0, 2)))
        ]
        out.append(
            {
                "index": idx,
                "fields": fields,
                "calls": calls,
                "finish": draw(st.sampled_from(["stop", "length", "tool_calls"])),
                "cuts": draw(st.lists(st.integers(0, 12), max_size=4)),
            }
        )
    return out


def _stream(spec: list[dict[str, Any]], interleave: bool) -> list[bytes]:
    """The chunk payloads an upstream could send for ``spec``: role first, each text
    field and each tool call's arguments in pieces, then the finish reason."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    per_choice: list[list[dict[str, Any]]] = []
    for c in spec:
        idx = c["index"]
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        for field, text in c["fields"].items():
            deltas += [{field: piece} for piece in _split(text, c["cuts"])]
        for i, call in enumerate(c["calls"]):
            deltas.append(
                {"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                 "function": {"name": call["name"], "arguments": ""}}]}
            )  # fmt: skip
            for piece in _split(call["args"], c["cuts"]):
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        chunks = [
            {"index": idx, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas
        ]
        chunks.append({"index": idx, "delta": {}, "logprobs": None, "finish_reason": c["finish"]})
        per_choice.append(chunks)
    if interleave:  # n > 1: choices' chunks arrive mixed
        order = [c for group in zip(*per_choice, strict=False) for c in group]
        order += [c for chunks in per_choice for c in chunks[min(map(len, per_choice)) :]]
    else:
        order = [c for chunks in per_choice for c in chunks]
    return [orjson.dumps({**head, "choices": [c]}) for c in order]


@settings(max_examples=300, deadline=None)
@given(choices(), st.booleans())
def test_assemble_recovers_every_field_however_the_stream_is_split(
    spec: list[dict[str, Any]], interleave: bool
) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    got = assemble(_stream(spec, interleave), usage)
    assert got["object"] == "chat.completion"
    assert (got["id"], got["created"], got["model"]) == ("chatcmpl-1", 7, "m")
    assert got["usage"] == usage
    assert [c["index"] for c in got["choices"]] == [c["index"] for c in spec]
    for c, choice in zip(spec, got["choices"], strict=True):
        msg = choice["message"]
        assert msg["role"] == "assistant"
        assert msg["content"] == c["fields"]["content"]
        assert msg["refusal"] == c["fields"].get("refusal")
        assert msg.get("reasoning_content") == c["fields"].get("reasoning_content")
        calls = [
            {"id": k["id"], "type": "function",
             "function": {"name": k["name"], "arguments": k["args"]}}
            for k in c["calls"]
        ]  # fmt: skip
        assert msg.get("tool_calls", []) == calls
        assert choice["finish_reason"] == c["finish"]
        assert choice["logprobs"] is None


def test_assemble_keeps_the_first_top_level_fields_and_joins_logprobs() -> None:
    first = {"id": "a", "created": 1, "model": "m", "system_fingerprint": "fp", "choices": []}
    later = {"id": "b", "created": 2, "model": "n", "service_tier": "default",
             "choices": [{"index": 0, "delta": {"content": "x"},
                          "logprobs": {"content": [{"token": "x"}]}}]}  # fmt: skip
    last = {"id": "c", "choices": [{"index": 0, "delta": {"content": "y"},
                                    "logprobs": {"content": [{"token": "y"}]}}]}  # fmt: skip
    got = assemble([orjson.dumps(first), b"[1]", orjson.dumps(later), orjson.dumps(last)], None)
    assert list(got) == [
        "object", "id", "created", "model", "system_fingerprint", "service_tier", "choices"
    ]  # fmt: skip
    assert (got["id"], got["model"], got["service_tier"]) == ("a", "m", "default")
    assert got["choices"][0]["message"]["content"] == "xy"
    assert got["choices"][0]["logprobs"] == {"content": [{"token": "x"}, {"token": "y"}]}
    assert "usage" not in got


def test_to_chunks_and_back() -> None:
    completion = {
        "id": "chatcmpl-9", "object": "chat.completion", "created": 5, "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None},
             "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": None, "refusal": None,
                                     "tool_calls": [{"id": "t", "type": "function", "function":
                                                     {"name": "f", "arguments": "{}"}}]},
             "logprobs": None, "finish_reason": "tool_calls"},
        ],
    }  # fmt: skip
    payloads = [orjson.dumps(c) for c in to_chunks(completion)]
    assert assemble(payloads, None) == completion


# -- token chunks read without parsing (_TokenChunks) -------------------------------------

# Content that could confuse a reader of bytes: quotes, backslashes, braces, escapes, the
# very text that marks where content starts, non-ASCII.
TRICKY = st.lists(
    st.sampled_from(
        ["a", " ", '"', "\\", "}", "{", ",", ":", "\n", "\u00e9", "\u2028", "\U0001f600",
         '"delta":{"content":"', '"},"x":{"y":"', "\\u0041"]
    ),
    max_size=6,
).map("".join)  # fmt: skip


def _serialise(chunk: dict[str, Any], how: str) -> bytes:
    if how == "orjson":
        return orjson.dumps(chunk)
    if how == "spaces":  # Python's json defaults: ", " and ": ", non-ASCII escaped
        return json.dumps(chunk).encode()
    return json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode()


@st.composite
def token_streams(draw: st.DrawFn) -> list[bytes]:
    """A stream of mostly plain token chunks, written one way, with odd chunks mixed in:
    other fields in the delta or the choice, another index, usage, and payloads made to
    share a plain chunk's bytes around a content that is not one string."""
    how = draw(st.sampled_from(["orjson", "spaces", "raw"]))
    head: dict[str, Any] = {"id": "chatcmpl-7", "object": "chat.completion.chunk",
                            "created": 9, "model": "m"}  # fmt: skip
    if draw(st.booleans()):
        head["system_fingerprint"] = "fp_1"
    if draw(st.booleans()):  # before the choices: what looks like a delta, but is not
        head["x_debug"] = {"delta": {"content": draw(TRICKY)}}
    with_usage = draw(st.booleans())

    def chunk(choice: dict[str, Any], usage: Any = None) -> bytes:
        body: dict[str, Any] = {**head, "choices": [choice]}
        if with_usage or usage is not None:
            body["usage"] = usage
        return _serialise(body, how)

    def plain(text: str) -> dict[str, Any]:
        return {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    out = [chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None})]  # fmt: skip
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(
            st.sampled_from(
                ["plain"] * 6
                + [
                    "refusal",
                    "both",
                    "logprobs",
                    "index1",
                    "extra",
                    "usage",
                    "spliced",
                    "finish",
                    "odd_finish",
                ]
            )
        )
        text = draw(TRICKY)
        if kind == "plain":
            out.append(chunk(plain(text)))
        elif kind == "refusal":
            out.append(chunk({**plain(""), "delta": {"refusal": text}}))
        elif kind == "both":
            out.append(chunk({**plain(""), "delta": {"content": text, "refusal": "r"}}))
        elif kind == "logprobs":
            out.append(chunk({**plain(text), "logprobs": {"content": [{"token": "t"}]}}))
        elif kind == "index1":
            out.append(chunk({**plain(text), "index": 1}))
        elif kind == "extra":
            out.append(chunk({**plain(text), "x_extra": 1}))
        elif kind == "usage":
            out.append(chunk(plain(text), usage={"prompt_tokens": 1}))
        elif kind == "finish":
            out.append(chunk({**plain(text), "finish_reason": "stop"}))
        elif kind == "odd_finish":  # "ok" is as long as null: only the bytes differ
            out.append(chunk({**plain(text), "finish_reason": "ok"}))
        else:  # a plain chunk's bytes around a middle that closes the string early
            marker = "QQMIDDLEQQ"
            framed = chunk(plain(marker))
            middle = _serialise({"k": text}, how)[len(_serialise({"k": ""}, how)) - 2 : -2]
            out.append(framed.replace(marker.encode(), middle + b'","x":"' + middle))
    if draw(st.booleans()):  # else the stream was cut short
        out.append(chunk({**plain(""), "delta": {}, "finish_reason": "stop"}))
    return out


def _parsed_in_full(payloads: list[bytes]) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assemble_module._TokenChunks, "of", classmethod(lambda *a: None))
        return assemble(payloads, None)


@settings(max_examples=500, deadline=None)
@given(token_streams())
def test_token_chunks_read_without_parsing_give_what_parsing_gives(payloads: list[bytes]) -> None:
    """Whatever the upstream's spacing, escaping and mix of chunks, the answer is the one
    that parsing every chunk gives."""
    assert assemble(payloads, None) == _parsed_in_full(payloads)


def test_a_plain_token_chunk_is_read_without_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    head = b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    tokens = (b"He", b"llo", rb" \\\"w\u00e9")
    payloads = [head + b'[{"index":0,"delta":{"content":"%b"},"logprobs":null,'
                b'"finish_reason":null}]}' % t for t in tokens]  # fmt: skip
    parsed: list[bytes] = []
    loads = orjson.loads

    def counting(data: bytes) -> Any:
        if data in payloads:
            parsed.append(data)
        return loads(data)

    monkeypatch.setattr(assemble_module.orjson, "loads", counting)
    got = assemble(payloads, None)
    assert got["choices"][0]["message"]["content"] == 'Hello \\"w\u00e9'
    assert parsed == payloads[:1]  # the first in full; the others by their content only
