"""Instructions per request: the gateway under valgrind's callgrind, counting the
user-space instructions it executes for a fixed number of requests.

The VMs these benchmarks run on change speed by a third within an hour, so a change worth
a few percent of CPU per request is lost in the noise of timed runs. An instruction count
is repeatable for the same code, inputs and interpreter, whatever the machine is doing;
it leaves out the kernel (system calls, the loopback's TCP work) and memory stalls, so it
measures the gateway's own code, and two revisions compare within ~0.1 %.

    python -m loadtests.instructions                         # this checkout, both states
    python -m loadtests.instructions --gateway-src ../other  # another revision's gateway

The gateway runs with the benchmark's full policy stack (``write_gateway_config``) against
the fast upstream. For each scenario: a warm-up of requests, counters zeroed
(``callgrind_control --zero``), the measured requests, counters dumped; so start-up and
imports are not counted. Valgrind runs the gateway some 50x slower: keep the counts small.
Not a timed test: pytest never collects it."""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .bench import state_url
from .loadgen import LoadSpec, chat_body, run_load
from .services import (
    DRIVER_CORE,
    FAST_MODEL,
    GATEWAY_CORE,
    SLOW_MODEL,
    TENANT_KEY,
    Service,
    delete_redis_prefix,
    start_gateway,
    start_redis,
    start_upstream,
    write_gateway_config,
)

SCENARIOS = {  # name: (model, stream, concurrency)
    "json-c50": (FAST_MODEL, False, 50),
    "stream-c50": (FAST_MODEL, True, 50),
    "slow-stream-c50": (SLOW_MODEL, True, 50),
}


def start_under_callgrind(config: Path, out: Path, source: Path | None) -> Service:
    wrapper = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
               "--dump-instr=no", "--collect-atstart=yes")  # fmt: skip
    return start_gateway(config, GATEWAY_CORE, source, wrapper=wrapper, ready_seconds=300)


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _newest(out_dir: Path, stem: str) -> Path:
    return max(out_dir.glob(stem + "*"), key=lambda p: p.stat().st_mtime)


def _total(out_dir: Path, stem: str) -> int:
    """The instruction count of the newest dump of ``stem``."""
    dump = _newest(out_dir, stem)
    for line in reversed(dump.read_text().splitlines()):
        m = re.match(r"(?:summary|totals): (\d+)", line)
        if m:
            return int(m.group(1))
    raise RuntimeError(f"no totals in {dump}")


def measure(gw: Service, out: Path, name: str, warmup: int, requests: int) -> float:
    model, stream, concurrency = SCENARIOS[name]
    spec = LoadSpec(
        url=gw.url + "/v1/chat/completions",
        concurrency=concurrency,
        body=chat_body(model, stream=stream),
        stream=stream,
        headers={"Authorization": f"Bearer {TENANT_KEY}"},
    )
    spec.requests = warmup
    asyncio.run(run_load(spec))
    _control(gw.pid, "--zero")
    spec.requests = requests
    res = asyncio.run(run_load(spec))
    if res.errors:
        raise RuntimeError(f"{name}: {res.errors} errors ({res.statuses})")
    _control(gw.pid, "--dump")
    time.sleep(1)
    return _total(out.parent, out.name) / requests


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--state", choices=["embedded", "redis", "both"], default="both")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--requests", type=int, default=2000, help="measured per scenario")
    ap.add_argument("--warmup", type=int, default=500, help="requests before counting")
    ap.add_argument("--gateway-src", type=Path, help="run the gateway package from DIR")
    ap.add_argument("--keep", type=Path, help="copy the dumps to DIR (callgrind_annotate them)")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind (with callgrind_control) is needed")
    states = ["embedded", "redis"] if args.state == "both" else [args.state]
    names = args.scenarios.split(",")
    up = start_upstream(DRIVER_CORE)
    redis = start_redis(DRIVER_CORE) if "redis" in states else None
    rows: list[tuple[str, str, float]] = []
    try:
        for state in states:
            with tempfile.TemporaryDirectory(prefix=f"gwinstr-{state}-") as tmp:
                d = Path(tmp)
                prefix = f"gwinstr-{uuid.uuid4().hex[:8]}"
                redis_url = redis.url if redis is not None else "redis://127.0.0.1:6379/0"
                config = write_gateway_config(d, up.url, state_url(state, d, redis_url), prefix)
                out = d / "callgrind.out"
                gw = start_under_callgrind(config, out, args.gateway_src)
                try:
                    for name in names:
                        per = measure(gw, out, name, args.warmup, args.requests)
                        if args.keep is not None:
                            args.keep.mkdir(parents=True, exist_ok=True)
                            shutil.copy(_newest(d, out.name), args.keep / f"{state}-{name}.out")
                        rows.append((state, name, per))
                        print(f"{state:8s} {name:16s} {per:12,.0f} instructions/request",
                              flush=True)  # fmt: skip
                finally:
                    gw.stop()
                    if redis is not None and state == "redis":
                        delete_redis_prefix(redis.url, prefix)
    finally:
        up.stop()
        if redis is not None:
            redis.stop()
    src = args.gateway_src or Path(__file__).resolve().parent.parent
    print(f"\nGateway {src}, {sys.executable}: user-space instructions per request "
          f"(callgrind, {args.requests} after {args.warmup})")  # fmt: skip
    print("\n| state | scenario | instructions / request |\n|---|---|--:|")
    for state, name, per in rows:
        print(f"| {state} | {name} | {per:,.0f} |")


if __name__ == "__main__":
    main()
