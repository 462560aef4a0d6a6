"""Running the gateway: uvicorn with uvloop and httptools, one or several workers."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import uvicorn
from litestar.types import ASGIApp

from .app import create_app
from .config import LoadedConfig, load_config, load_policy
from .listen import ListenError, listen_sockets
from .logs import setup_logging
from .runtime import Runtime

CONFIG_ENV = "GATEWAY_CONFIG"
BACKLOG = 4096  # connections waiting to be accepted, per listening socket


def _uvicorn_options() -> dict[str, object]:
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover - Windows
        loop = "asyncio"
    return {
        "loop": loop,
        "http": "httptools",
        "lifespan": "on",
        # The gateway uses no client address, so X-Forwarded-* parsing is wasted work.
        "proxy_headers": False,
        "access_log": False,
        "log_config": None,
        "backlog": BACKLOG,
        # SDK clients keep connections open between calls.
        "timeout_keep_alive": 75,
        "timeout_graceful_shutdown": 30,
    }


def worker_app() -> ASGIApp:
    """App factory for worker processes (``--workers > 1``): config from the environment."""
    loaded = load_config(os.environ[CONFIG_ENV])
    setup_logging(loaded.gateway.logging)
    return create_app(Runtime(loaded), tune_gc=True)


def prepare_multiprocess_metrics(loaded: LoadedConfig) -> str:
    """A fresh, empty directory for prometheus-client's multiprocess mode."""
    configured = loaded.gateway.metrics.multiproc_dir
    path = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return str(path)


def serve(config_path: str, host: str | None, port: int | None, workers: int | None) -> None:
    loaded = load_config(config_path)
    policy = load_policy(loaded)  # refuse to start on a bad policy
    cfg = loaded.gateway
    setup_logging(cfg.logging)
    n = workers or cfg.workers
    host = host or cfg.listen.host
    port = cfg.listen.port if port is None else port
    if n > 1:
        if not cfg.state.startswith(("redis://", "rediss://")):
            raise SystemExit(
                f"{config_path}: workers: {n} worker processes need shared state; "
                "set state to a redis:// URL"
            )
        prepare_multiprocess_metrics(loaded)
        os.environ[CONFIG_ENV] = str(loaded.path)
        uvicorn.run(
            "gateway.server:worker_app",
            factory=True,
            host=host,
            port=port,
            workers=n,
            **_uvicorn_options(),  # type: ignore[arg-type]
        )
        return
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    options = _uvicorn_options()
    try:
        sockets = listen_sockets(host, port, backlog=BACKLOG)
    except ListenError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    app = create_app(Runtime(loaded, policy=policy), tune_gc=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))  # type: ignore[arg-type]
    shown = sockets[0].getsockname()
    logging.getLogger("gateway").info(
        "listening on %s:%s (%d sockets)", shown[0], shown[1], len(sockets)
    )
    server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(3)  # uvicorn's STARTUP_FAILURE: the app's startup failed
