"""The gateway under test, on a free port: in a thread of this process (fast, the
runtime is reachable for assertions) or as a ``gateway serve`` process (for workers,
signals and kill -9)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from openai import AsyncOpenAI, OpenAI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.app import create_app
from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.config import load_config
from gateway.runtime import Runtime
from servers.configs import directive


class _QuietProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with its access log off, as under ``gateway serve``.

    ``access_log=False`` leaves uvicorn's access logger without handlers, but pytest
    attaches its capture handlers to every logger that does not propagate, at each test's
    start; uvicorn would then log each request, and the gateway would leave response heads
    to uvicorn (see ``AsgiResponder._head``): not what runs in production."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.access_log = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    directory: Path, config: dict[str, Any], policies: dict[str, dict[str, Any]]
) -> Path:
    """Write gateway.yaml and policies/*.yaml; return the config path."""
    pdir = directory / "policies"
    pdir.mkdir(parents=True, exist_ok=True)
    for name, body in policies.items():
        (pdir / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    cfg = {"version": 1, "policies": str(pdir), **config}
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class Gateway:
    url: str
    config_path: Path
    runtime: Runtime | None = None
    process: subprocess.Popen[bytes] | None = None
    _server: uvicorn.Server | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _clients: list[Any] = field(default_factory=list, repr=False)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, key: str, **kw: Any) -> OpenAI:
        kw.setdefault("max_retries", 0)
        client = OpenAI(base_url=self.base_url, api_key=key, **kw)
        self._clients.append(client)
        return client

    def stream(
        self, key: str, messages: list[dict[str, str]], tokens: int, chunk_delay: float = 0.005
    ) -> list[Any]:
        """The chunks of a ``cheap`` stream of ``tokens`` tokens (the fake upstream's
        directive), usage chunk included, read with the SDK."""
        return list(
            self.client(key).chat.completions.create(
                model="cheap",
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
                extra_body=directive(tokens=tokens, chunk_delay=chunk_delay),
            )
        )

    def aclient(self, key: str, **kw: Any) -> AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        return AsyncOpenAI(base_url=self.base_url, api_key=key, **kw)  # caller closes it

    def http(self, **kw: Any) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(30)
            self._server = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def start_in_thread(
    config_path: Path, *, clock: Clock = SYSTEM_CLOCK, watch_policies: bool = True
) -> Gateway:
    loaded = load_config(config_path)
    runtime = Runtime(loaded, clock=clock, watch_policies=watch_policies)
    app = create_app(runtime)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http=_QuietProtocol,
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_keep_alive=30,
        )
    )
    thread = threading.Thread(target=server.run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the gateway thread died during start-up")
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start within 30s")
        time.sleep(0.01)
    return Gateway(f"http://127.0.0.1:{port}", config_path, runtime, None, server, thread)


def start_process(
    config_path: Path,
    *,
    workers: int | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Gateway:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(config_path),
        "--port",
        str(port),
    ]
    if workers:
        cmd += ["--workers", str(workers)]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    finally:
        if not isinstance(out, int):
            out.close()  # the child has its own descriptor
    gw = Gateway(f"http://127.0.0.1:{port}", config_path, process=proc)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(gw.url + "/readyz", timeout=2)
            if r.status_code == 200:
                return gw
        if time.monotonic() > deadline:
            gw.stop()
            raise RuntimeError("the gateway process did not become ready within 60s")
        time.sleep(0.1)


@contextlib.contextmanager
def running(config_path: Path, **kw: Any) -> Iterator[Gateway]:
    gw = start_in_thread(config_path, **kw)
    try:
        yield gw
    finally:
        gw.stop()
