"""A content-SaaS traffic mix for the gateway, for Locust (``pip install -e '.[load]'``).

Each simulated user is a customer of a content product that writes through the gateway:

- short social posts (cheap, routed ``auto``),
- ad copy variants (``n: 3``),
- long blog posts, streamed, on the premium model, read chunk by chunk (time to first
  token and full duration are reported separately),
- embeddings of article chunks for search,
- repeated deterministic prompts (``temperature: 0`` from a small pool: cache hits),
- idempotent retries (a double-submit with the same ``Idempotency-Key``: one charge, one
  replay).

Headless, 500 users against the mock (see README, "Load test")::

    gateway serve --config config/gateway.yaml
    locust -f loadtests/locustfile.py --headless -u 500 -r 50 -t 2m \\
        --host http://127.0.0.1:8080

Environment: ``GATEWAY_KEYS`` (comma-separated tenant keys, spread over the users;
default: the demo key of ``policies/example.yaml``), ``LOAD_CHEAP_MODEL``,
``LOAD_PREMIUM_MODEL``, ``LOAD_ROUTED_MODEL``, ``LOAD_EMBED_MODEL`` (default: the models of
``config/gateway.yaml``), ``LOAD_WAIT_MIN`` / ``LOAD_WAIT_MAX`` (seconds a user thinks
between actions; default 2 and 8). Answers 402 (budget) and 429 (rate limit) are the
gateway doing its job: they are counted under their own names ("... [429]"), not as
failures; anything else that is not 200 is a failure.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import uuid
from typing import Any

from locust import FastHttpUser, between, task

DEMO_KEY = "sk-gw-demo-acme-change-me"
KEYS = [k.strip() for k in os.environ.get("GATEWAY_KEYS", DEMO_KEY).split(",") if k.strip()]
CHEAP = os.environ.get("LOAD_CHEAP_MODEL", "gpt-4o-mini")
PREMIUM = os.environ.get("LOAD_PREMIUM_MODEL", "gpt-4o")
ROUTED = os.environ.get("LOAD_ROUTED_MODEL", "auto")
EMBED = os.environ.get("LOAD_EMBED_MODEL", "text-embedding-3-small")
EXPECTED_REFUSALS = (402, 429)

TOPICS = [
    "a new oat-milk latte",
    "our spring running-shoe sale",
    "a budgeting app for freelancers",
    "a dog-friendly hotel in Lisbon",
    "an online pottery course",
    "a B2B invoicing tool",
    "a vegan meal-kit subscription",
    "noise-cancelling headphones",
    "a local farmers market",
    "a password manager for families",
]
TONES = ["playful", "professional", "bold", "warm", "witty"]
CHANNELS = ["LinkedIn", "Instagram", "X", "Facebook"]
BRAND_VOICE = (
    "You are the copywriter of a small brand. Keep the brand voice: clear, friendly, no "
    "jargon, no exclamation marks in headlines, British spelling."
)
# The pool of deterministic requests many customers send the same way (templates).
REPEATED = [
    f"Write a one-line tagline for {topic} in a {tone} tone."
    for topic in TOPICS[:5]
    for tone in TONES[:4]
]
_key_cycle = itertools.cycle(KEYS)


def _paragraphs(n: int) -> str:
    words = (
        "content teams publish more when the draft arrives fast and the budget holds "
        "every article needs an outline research quotes and a clear call to action"
    ).split()
    rng = random.Random(n)
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(n))


class ContentSaasUser(FastHttpUser):
    """One customer of a content SaaS, writing through the gateway."""

    wait_time = between(
        float(os.environ.get("LOAD_WAIT_MIN", "2")), float(os.environ.get("LOAD_WAIT_MAX", "8"))
    )
    network_timeout = 600.0  # long generations are normal
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.key = next(_key_cycle)
        self.end_user = f"customer-{uuid.uuid4().hex[:8]}"

    def _headers(self, **extra: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.key}",
            "x-gateway-end-user": self.end_user,
            **extra,
        }

    def _post(self, path: str, name: str, body: dict[str, Any], **headers: str) -> Any:
        """POST and classify: 200 ok, 402/429 counted under their own name, else failure."""
        with self.client.post(
            path, json=body, headers=self._headers(**headers), name=name, catch_response=True
        ) as resp:
            if resp.status_code in EXPECTED_REFUSALS:
                resp.request_meta["name"] = f"{name} [{resp.status_code}]"
                resp.success()
            elif resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
            return resp

    @task(30)
    def social_post(self) -> None:
        body = {
            "model": ROUTED,
            "messages": [
                {"role": "system", "content": BRAND_VOICE},
                {
                    "role": "user",
                    "content": f"Write a {random.choice(TONES)} {random.choice(CHANNELS)} "
                    f"post about {random.choice(TOPICS)}. Under 280 characters, two hashtags.",
                },
            ],
            "max_tokens": 120,
            "temperature": 0.9,
        }
        self._post("/v1/chat/completions", "social post", body)

    @task(20)
    def ad_copy(self) -> None:
        body = {
            "model": CHEAP,
            "messages": [
                {"role": "system", "content": BRAND_VOICE},
                {
                    "role": "user",
                    "content": f"Three Google Ads headlines (30 characters max) and "
                    f"descriptions for {random.choice(TOPICS)}.",
                },
            ],
            "n": 3,
            "max_tokens": 200,
            "temperature": 0.8,
        }
        self._post("/v1/chat/completions", "ad copy (n=3)", body)

    @task(10)
    def blog_post(self) -> None:
        """A long streamed generation: time to first token and the full stream."""
        body = {
            "model": PREMIUM,
            "messages": [
                {"role": "system", "content": BRAND_VOICE},
                {
                    "role": "user",
                    "content": f"Write a 1,200-word blog post about {random.choice(TOPICS)}. "
                    f"Use this research:\n\n{_paragraphs(6)}",
                },
            ],
            "max_tokens": 1800,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        name = "blog post (stream)"
        t0 = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=self._headers(**{"x-gateway-task": "long-form"}),
            name=f"{name}: first token",
            stream=True,
            catch_response=True,
        ) as resp:
            if resp.status_code in EXPECTED_REFUSALS:
                resp.request_meta["name"] = f"{name} [{resp.status_code}]"
                resp.success()
                return
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            chunks, done, error, size, buf = 0, False, "", 0, b""
            for part in resp.iter_content(chunk_size=1024, decode_content=False):
                data = part if isinstance(part, bytes) else part.encode()
                size += len(data)
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        done = True
                    elif payload.startswith(b'{"error"'):
                        error = json.loads(payload)["error"].get("code") or "error"
                    else:
                        chunks += 1
        self.environment.events.request.fire(
            request_type="SSE",
            name=f"{name}: full",
            response_time=(time.perf_counter() - t0) * 1000,
            response_length=size,
            exception=None if done and not error else Exception(error or "stream cut short"),
            context={"chunks": chunks},
        )

    @task(15)
    def embeddings(self) -> None:
        text = _paragraphs(4).split("\n\n")
        body = {"model": EMBED, "input": [t[: 200 + 50 * i] for i, t in enumerate(text * 2)]}
        self._post("/v1/embeddings", "embeddings (8 chunks)", body)

    @task(15)
    def repeated_prompt(self) -> None:
        """The same deterministic request many customers send: served from the cache."""
        body = {
            "model": CHEAP,
            "messages": [{"role": "user", "content": random.choice(REPEATED)}],
            "temperature": 0,
            "max_tokens": 40,
        }
        self._post("/v1/chat/completions", "repeated prompt (cacheable)", body)

    @task(10)
    def idempotent_retry(self) -> None:
        """A double-submit: the second call replays the first (charged once)."""
        key = f"order-{uuid.uuid4()}"
        body = {
            "model": CHEAP,
            "messages": [
                {"role": "user", "content": f"Product description for {random.choice(TOPICS)}."}
            ],
            "max_tokens": 150,
        }
        first = self._post(
            "/v1/chat/completions", "idempotent: first", body, **{"Idempotency-Key": key}
        )
        if first.status_code != 200:
            return
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=self._headers(**{"Idempotency-Key": key}),
            name="idempotent: retry",
            catch_response=True,
        ) as again:
            if again.status_code == 429:
                again.request_meta["name"] = "idempotent: retry [429]"
                again.success()
            elif again.status_code != 200:
                again.failure(f"HTTP {again.status_code}")
            elif again.headers.get("idempotent-replayed") != "true":
                again.failure("the retry was not a replay")
            elif again.content != first.content:
                again.failure("the replay differs from the first answer")
