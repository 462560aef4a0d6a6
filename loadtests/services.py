"""The processes a benchmark runs: the fast upstream and ``gateway serve``, each pinned to
a core when the machine has two or more, and the gateway's generated config."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TENANT_KEY = "sk-bench-tenant-0123456789"
# A tenant allowed one request a minute: the leak check's refused requests (429).
LIMITED_KEY = "sk-bench-limited-0123456789"
PROVIDER_KEY = "sk-bench-provider"
GATEWAY_CORE, DRIVER_CORE = 0, 1
# Gateway model -> upstream model (its behaviour; see fast_upstream).
FAST_MODEL, SLOW_MODEL, EMBED_MODEL = "bench-fast", "bench-slow", "bench-embed"
# A model on a provider nothing listens for: the leak check's failed requests (503s once
# its circuit breaker is open).
DOWN_MODEL = "bench-down"
# Long answers, for the memory a stream keeps: 20,000 tokens each.
LONG_MODEL, LONG_TOKENS = "bench-long", 20_000
SLOW_TTFT_MS, SLOW_TOKEN_MS, SLOW_TOKENS = 200, 10, 16
SLOW_UPSTREAM = f"bench-slow@ttft={SLOW_TTFT_MS},tpt={SLOW_TOKEN_MS},tokens={SLOW_TOKENS}"
# how long one slow stream takes upstream (0.36 s)
SLOW_RESPONSE_SECONDS = (SLOW_TTFT_MS + SLOW_TOKENS * SLOW_TOKEN_MS) / 1000


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cmd: list[str], core: int | None) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if core is not None and can_pin() else cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_upstream(core: int | None = DRIVER_CORE) -> Service:
    cmd = [sys.executable, "-m", "loadtests.fast_upstream", "--port", "0"]
    proc = subprocess.Popen(pinned(cmd, core), cwd=REPO, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"fast_upstream did not start: {line!r}")
    return Service("upstream", proc, line.rsplit(" ", 1)[-1].strip())


def start_redis(
    core: int | None = DRIVER_CORE, wrapper: tuple[str, ...] = (), ready_seconds: float = 10
) -> Service | None:
    """A private ``redis-server`` on a free port, pinned beside the upstream and the load
    generator and keeping nothing on disk; None without the binary. A machine's shared
    Redis runs where the scheduler puts it, often on the gateway's core, and its work
    (~18 % of a core at 500 slow streams) would be counted against the gateway. Run by
    ``wrapper`` (such as valgrind) when given."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    port = free_port()
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
           "no", "--daemonize", "no", "--loglevel", "warning"]  # fmt: skip
    proc = subprocess.Popen(pinned([*wrapper, *cmd], core), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + ready_seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("the private redis-server did not start")
        time.sleep(0.05)
    return Service("redis", proc, f"redis://127.0.0.1:{port}/0")


def _key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def tiktoken_dir() -> str | None:
    env = os.environ.get("TIKTOKEN_CACHE_DIR")
    if env:
        return env
    shared = REPO.parent / "shared" / "tiktoken"
    return str(shared) if shared.is_dir() else None


def write_gateway_config(
    directory: Path,
    upstream_url: str,
    state: str,
    prefix: str,
    *,
    upstream_timeouts: dict[str, float] | None = None,
) -> Path:
    """A deployment config and one policy with the full stack on: auth, rate limits and
    budgets set high enough never to reject, a deterministic cache (bounded small, so it
    is full early and a leak check sees a steady state), metrics, access log, ledger.
    ``upstream_timeouts`` replaces the provider's defaults (a gateway under valgrind
    needs longer ones)."""
    price = {"input": 0.15, "cached_input": 0.075, "output": 0.60}
    config: dict[str, Any] = {
        "version": 1,
        "listen": {"host": "127.0.0.1", "port": 0},
        "state": state,
        "redis_key_prefix": prefix,
        "policies": str(directory / "policies"),
        "cache": {"max_bytes": 4 * 1024 * 1024},
        "tokenizer": {"cache_dir": tiktoken_dir()},
        "logging": {"level": "warning", "format": "json", "access_log": True},
        "metrics": {"enabled": True},
        "providers": {
            "bench": {
                "type": "openai",
                "base_url": upstream_url + "/v1",
                "api_key": PROVIDER_KEY,
                "max_connections": 1024,
                **({"timeouts": upstream_timeouts} if upstream_timeouts else {}),
            },
            "down": {
                "type": "openai",
                # a free port, released: nothing listens, a connection is refused at once
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "api_key": PROVIDER_KEY,
            },
        },
        "models": {
            FAST_MODEL: {
                "provider": "bench",
                "upstream_model": FAST_MODEL,
                "price": price,
                "max_output_tokens": 1024,
                "encoding": "o200k_base",
            },
            SLOW_MODEL: {
                "provider": "bench",
                "upstream_model": SLOW_UPSTREAM,
                "price": price,
                "max_output_tokens": 1024,
                "encoding": "o200k_base",
            },
            DOWN_MODEL: {"provider": "down", "price": price, "encoding": "o200k_base"},
            LONG_MODEL: {
                "provider": "bench",
                "upstream_model": f"{LONG_MODEL}@tokens={LONG_TOKENS}",
                "price": price,
                "max_output_tokens": LONG_TOKENS,
                "encoding": "o200k_base",
            },
            EMBED_MODEL: {
                "provider": "bench",
                "upstream_model": EMBED_MODEL,
                "kind": "embedding",
                "price": {"input": 0.02},
                "encoding": "o200k_base",
            },
        },
    }
    policy = {
        "version": 1,
        "tenants": {
            "bench": {
                "keys": [_key_hash(TENANT_KEY)],
                "budgets": {"daily_usd": 1_000_000, "monthly_usd": 2_000_000},
                "limits": {"rpm": 100_000_000, "tpm": 10_000_000_000, "concurrent": 100_000},
                "cache": {"mode": "deterministic", "ttl_seconds": 3600},
                # every request names an end user (loadgen's bodies): its own budget and
                # limits are checked and its spend kept, as a SaaS's customer's would be
                "end_users": {
                    "budgets": {"daily_usd": 1_000_000},
                    "limits": {"rpm": 100_000_000, "concurrent": 100_000},
                },
            },
            "bench-limited": {
                "keys": [_key_hash(LIMITED_KEY)],
                "limits": {"rpm": 1},
            },
        },
    }
    (directory / "policies").mkdir(parents=True, exist_ok=True)
    (directory / "policies" / "bench.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _ready(url: str) -> bool:
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=2)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start_gateway(
    config: Path,
    core: int | None = GATEWAY_CORE,
    source: Path | None = None,
    workers: int | None = None,
    wrapper: tuple[str, ...] = (),
    ready_seconds: float = 60,
) -> Service:
    """``gateway serve`` as a process (from ``source`` instead of the installed package
    when given, to measure a modified copy); with ``workers``, that many worker processes,
    not pinned; run by ``wrapper`` (such as valgrind) when given."""
    port = free_port()
    log = config.parent / "gateway.log"
    env = dict(os.environ)
    if source is not None:
        # ``python -m`` puts the working directory first on sys.path, before PYTHONPATH.
        env["PYTHONPATH"] = str(source)
    cmd = [*wrapper, sys.executable, "-m", "gateway", "serve", "--config", str(config),
           "--port", str(port)]  # fmt: skip
    if workers:
        cmd += ["--workers", str(workers)]
        core = None
    out: IO[bytes]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            pinned(cmd, core),
            stdout=out,
            stderr=out,
            env=env,
            cwd=source or config.parent,
            start_new_session=True,
        )
    svc = Service("gateway", proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + ready_seconds
    while not _ready(svc.url):
        if proc.poll() is not None or time.monotonic() > deadline:
            svc.stop()
            raise RuntimeError(f"the gateway did not become ready:\n{svc.log_tail()}")
        time.sleep(0.1)
    return svc


def delete_redis_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix:`` (the bench's own); never anything else."""
    import redis

    client = redis.Redis.from_url(url)
    deleted = 0
    with contextlib.closing(client):
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
    return deleted
