"""A real Prometheus server (the Debian ``prometheus`` binary) on a free port, scraping
given targets every second, and a reader for the gateway's own ``/metrics`` text."""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .gateway import free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page: (name, labels) -> value."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(text: str, name: str, **labels: str) -> float:
    """The sum of ``name`` over all its series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and want <= ls)


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; raises with Prometheus' error message if it fails."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        with httpx.Client(timeout=10) as http:
            r = http.get(self.url + "/api/v1/query", params=params)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}\n{body.get('error', r.text)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of a query that returns one series, else ``None``."""
        result = self.query(expr)
        if len(result) != 1:
            return None
        return float(result[0]["value"][1])

    def get(self, path: str, **params: Any) -> Any:
        with httpx.Client(timeout=10) as http:
            r = http.get(self.url + path, params=params)
        r.raise_for_status()
        return r.json()["data"]

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; log:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running_prometheus(
    directory: Path, targets: list[str], rule_files: list[Path] | None = None
) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (host:port) every second, storage in ``directory``."""
    assert PROMETHEUS is not None
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "gateway",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": targets}],
            }
        ],
    }
    if rule_files:
        config["rule_files"] = [str(p) for p in rule_files]
    cfg_path = directory / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = directory / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={cfg_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{prom.log_tail()}")
            with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=2) as http:
                if http.get(prom.url + "/-/ready").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready within 30s:\n{prom.log_tail()}")
            time.sleep(0.1)
        yield prom
    finally:
        prom.stop()


def finite(result: list[dict[str, Any]]) -> bool:
    """At least one series of an instant query result has a finite value."""
    return any(math.isfinite(float(r["value"][1])) for r in result)
