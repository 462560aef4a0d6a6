"""Counting prompt tokens: exact with tiktoken, remembered for long texts, estimated
without an encoding."""

from __future__ import annotations

from pathlib import Path

import httpx
import tiktoken
from servers.configs import gateway_config, policy, tenant
from servers.gateway import start_process, write_config

from gateway.tokens import (
    BYTES_PER_TOKEN_ESTIMATE,
    REMEMBER_CHARS,
    SHORT_CHARS,
    SHORT_MAX,
    SizedMemo,
    TokenCounter,
    encodings_for,
    estimate_from_text,
)


def loaded() -> TokenCounter:
    counter = TokenCounter()
    counter.load_blocking()
    assert counter.exact, "the test suite needs the tiktoken files (TIKTOKEN_CACHE_DIR)"
    return counter


def test_chat_prompt_counts_like_openai() -> None:
    counter = loaded()
    enc = tiktoken.get_encoding("o200k_base")
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hello there", "name": "ann"}]}  # fmt: skip
    info = counter.chat_prompt(body, "gpt-4o", None, 85)
    words = ["system", "Be brief.", "user", "Hello there", "ann"]
    expected = 3 + 2 * 3 + 1 + sum(len(enc.encode_ordinary(w)) for w in words)
    assert info.tokens == expected
    img = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
        "tools": [{"type": "function", "function": {"name": "f"}}]}  # fmt: skip
    info = counter.chat_prompt(img, "gpt-4o", None, 85)
    assert info.images == 1 and info.has_tools and info.tokens > 85


def test_long_texts_are_remembered_and_counted_the_same() -> None:
    counter = loaded()
    system = "You are a careful assistant for a content platform. " * 20
    assert len(system) >= REMEMBER_CHARS
    first = counter.count_texts([system, "hi"], "gpt-4o", None)
    again = counter.count_texts([system, "hi"], "gpt-4o", None)
    enc = tiktoken.get_encoding("o200k_base")
    assert first == again == len(enc.encode_ordinary(system)) + len(enc.encode_ordinary("hi"))
    assert len(counter._seen) == 1  # the short text is not kept


def test_short_texts_are_remembered_per_encoding_and_bounded() -> None:
    counter = loaded()
    o200k, cl100k = tiktoken.get_encoding("o200k_base"), tiktoken.get_encoding("cl100k_base")
    words = ["system", "user", "Thanks!", "x" * SHORT_CHARS, "\u00e9t\u00e9 \U0001f600"]
    for _ in range(2):  # counted, then remembered: the same either way
        for w in words:
            assert counter.count_texts([w], "gpt-4o", None) == len(o200k.encode_ordinary(w))
            assert counter.count_texts([w], "", "cl100k_base") == len(cl100k.encode_ordinary(w))
    assert len(counter._short) == 2 and all(len(d) == len(words) for d in counter._short.values())
    for i in range(SHORT_MAX + 50):  # many distinct short texts: counted, not all kept
        text = f"msg {i}"
        assert counter.count_texts([text], "gpt-4o", None) == len(o200k.encode_ordinary(text))
    assert max(len(d) for d in counter._short.values()) == SHORT_MAX


def test_memo_is_bounded_by_size() -> None:
    memo = SizedMemo(100)
    memo.put((1, "a" * 60), 1, 60)
    memo.put((1, "b" * 60), 2, 60)  # over the bound: the oldest goes
    assert memo.get((1, "a" * 60)) is None and memo.get((1, "b" * 60)) == 2
    assert memo.put((1, "c" * 500), 3, 500) == 3 and memo.get((1, "c" * 500)) is None


def test_without_an_encoding_the_estimate_errs_high() -> None:
    counter = TokenCounter()  # never loaded: no encoding
    text = "The quick brown fox jumps over the lazy dog. " * 10
    est = counter.count_text(text, "gpt-4o")
    assert est == estimate_from_text(text) == -(-len(text) // BYTES_PER_TOKEN_ESTIMATE)
    assert est > len(tiktoken.get_encoding("o200k_base").encode_ordinary(text))


def test_the_gateway_starts_without_any_encoding(tmp_path: Path) -> None:
    """No tiktoken files and no network: the gateway still starts, warns, and estimates."""
    cfg = gateway_config(tokenizer={"load_timeout_seconds": 3})
    path = write_config(tmp_path, cfg, {"p": policy({"t1": tenant("key-1")})})
    empty = tmp_path / "no-encodings"
    empty.mkdir()
    log = tmp_path / "gw.log"
    # an unroutable proxy: tiktoken's download fails at once, wherever this runs
    env = {"TIKTOKEN_CACHE_DIR": str(empty), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}  # fmt: skip
    gw = start_process(path, env=env, log=log)
    try:
        with httpx.Client(base_url=gw.url) as http:
            assert http.get("/readyz").json()["tokenizer"] == "estimate"
            r = http.post(
                "/v1/chat/completions",
                json={"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": "Bearer key-1"},
            )
            assert r.status_code == 200
    finally:
        gw.stop()
    text = log.read_text()
    assert "tiktoken encodings could not be loaded" in text or "did not load within" in text
    assert "TIKTOKEN_CACHE_DIR" in text


def test_only_the_catalogs_encodings_are_loaded() -> None:
    names = encodings_for([("gpt-4o-mini", None), ("gpt-4", None), ("custom", "o200k_base")])
    assert names == ["o200k_base", "cl100k_base", "o200k_base"]
    counter = TokenCounter(encodings=encodings_for([("gpt-4o-mini", None)]))
    counter.load_blocking()
    assert list(counter._encodings) == ["o200k_base"]
    # a model of an encoding that was not loaded counts with one that was
    o200k = tiktoken.get_encoding("o200k_base")
    assert counter.count_text("hello world, again", "gpt-4") == len(
        o200k.encode_ordinary("hello world, again")
    )


def test_an_encoding_that_cannot_load_leaves_the_others() -> None:
    counter = TokenCounter(encodings=["no_such_encoding", "o200k_base"])
    counter.load_blocking()
    assert counter.exact and list(counter._encodings) == ["o200k_base"]
    assert counter._failed is not None and "no_such_encoding" in counter._failed
