"""What a relayed stream keeps for later (``gateway/pipeline/streamed.py``): folding the
payloads as they pile up changes nothing in what is counted or cached, and keeps a long
stream's memory near the size of its text."""

from __future__ import annotations

import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_assemble import _stream, choices

from gateway.pipeline.assemble import assemble, choice_texts
from gateway.pipeline.streamed import Streamed

USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def _texts_of(payloads: list[bytes]) -> list[str]:
    """Counting's texts, straight from every payload (what was done before folding)."""
    out: list[str] = []
    for p in payloads:
        chunk = orjson.loads(p)
        if isinstance(chunk, dict):
            out.extend(choice_texts(chunk.get("choices"), "delta"))
    return out


@settings(max_examples=200, deadline=None)
@given(choices(), st.booleans(), st.integers(0, 600))
def test_folding_changes_neither_the_answer_nor_the_counted_text(
    spec: list[dict[str, Any]], interleave: bool, fold_at: int
) -> None:
    payloads = _stream(spec, interleave)
    s = Streamed(fold_at=fold_at)
    for p in payloads:
        s.append(p)
    assert s.first == payloads[0] and bool(s)
    assert list(s.payloads()) == payloads
    assert s.texts() == _texts_of(payloads)
    assert s.answer(USAGE) == assemble(payloads, USAGE)


def test_a_payload_that_is_not_json() -> None:
    for fold_at in (0, 1 << 20):
        s = Streamed(fold_at=fold_at)
        s.append(b"not json")
        s.append(b'{"choices":[{"index":0,"delta":{"content":"b"}}]}')
        assert s.texts() == ["b"]  # counting skips it, as before
        with pytest.raises(ValueError):
            s.answer(None)  # the cache does not store a stream it cannot read
    assert not Streamed()


def test_a_long_stream_takes_memory_like_its_text_not_its_chunks() -> None:
    head = b'{"id":"chatcmpl-AbCdEf0123456789","object":"chat.completion.chunk",'
    head += b'"created":1767225600,"model":"gpt-4o-mini-2024-07-18",'
    head += b'"system_fingerprint":"fp_0123456789","choices":[{"index":0,"delta":{"content":"'
    tail = b'"},"logprobs":null,"finish_reason":null}]}'
    n = 20_000
    raw = 0
    tracemalloc.start()
    try:
        s = Streamed()
        for i in range(n):  # each payload made here and left to the stream, as the relay does
            payload = head + b"w%04d" % (i % 10_000) + tail
            raw += len(payload)
            s.append(payload)
        del payload
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # ~200 bytes of JSON per 5-character token: kept whole, 4 MB in 20,000 objects
    assert raw > 3_500_000
    assert held < 400_000, f"{held} bytes held for {n} chunks"
    text = "".join(s.texts())
    assert text == "".join(f"w{i % 10_000:04d}" for i in range(n))
    assert s.answer(None)["choices"][0]["message"]["content"] == text
