"""A cross-check of non-stream throughput with wrk (C, one thread), whose Lua script
sends the same unique-prompt bodies as the Python load generator."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

_LUA = """
local counter = 0
local template = [==[%(template)s]==]
local headers = {%(headers)s}
request = function()
  counter = counter + 1
  return wrk.format("POST", "%(path)s", headers, string.format(template, counter))
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%%d,"duration_us":%%d,"errors":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def script(url: str, template: bytes, headers: dict[str, str]) -> str:
    """The Lua for ``template`` (a body with one ``%d`` for the request number)."""
    hdrs = {"Content-Type": "application/json", **headers}
    return _LUA % {
        "template": template.decode(),
        "headers": ", ".join(f'["{k}"] = "{v}"' for k, v in hdrs.items()),
        "path": urlsplit(url).path,
    }


def run(
    url: str,
    template: bytes,
    headers: dict[str, str],
    concurrency: int,
    seconds: float,
) -> dict[str, float]:
    """Run wrk; return requests, rps, p50_ms, p99_ms, errors."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script(url, template, headers))
        path = Path(f.name)
    try:
        u = urlsplit(url)
        cmd = [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "-s",
            str(path),
            f"{u.scheme}://{u.netloc}",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        path.unlink()
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    d = json.loads(line.removeprefix("WRK_JSON "))
    secs = d["duration_us"] / 1e6
    return {
        "requests": d["requests"],
        "rps": round(d["requests"] / secs, 1),
        "p50_ms": d["p50_us"] / 1000,
        "p99_ms": d["p99_us"] / 1000,
        "errors": d["errors"],
        "seconds": round(secs, 3),
    }
