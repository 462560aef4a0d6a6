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
imports are not counted. In Redis state the private ``redis-server`` runs under callgrind
too, and its instructions per request are reported beside the gateway's: the work every
request leaves to the one Redis that all gateway processes share. Valgrind runs the
gateway some 50x slower: keep the counts small. Not a timed test: pytest never collects
it."""

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
from dataclasses import dataclass
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
    start_gateway,
    start_redis,
    start_upstream,
    write_gateway_config,
)

VALGRIND_WAIT = 120  # seconds: the gateway's timeouts for Redis and the upstream, see _run_state
SCENARIOS = {  # name: (model, stream, concurrency)
    "json-c50": (FAST_MODEL, False, 50),
    "stream-c50": (FAST_MODEL, True, 50),
    "slow-stream-c50": (SLOW_MODEL, True, 50),
}


def _callgrind(out: Path) -> tuple[str, ...]:
    return ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            "--dump-instr=no", "--collect-atstart=yes")  # fmt: skip


def start_under_callgrind(config: Path, out: Path, source: Path | None) -> Service:
    return start_gateway(config, GATEWAY_CORE, source, wrapper=_callgrind(out), ready_seconds=300)


def start_redis_under_callgrind(out: Path) -> Service:
    redis = start_redis(DRIVER_CORE, wrapper=_callgrind(out), ready_seconds=60)
    if redis is None:
        sys.exit("redis-server is needed for Redis state")
    return redis


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


@dataclass
class Counted:
    """A process under callgrind and the file its dumps go to."""

    service: Service
    out: Path

    def zero(self) -> None:
        _control(self.service.pid, "--zero")

    def dump(self) -> None:
        _control(self.service.pid, "--dump")

    def total(self) -> int:
        return _total(self.out.parent, self.out.name)

    def newest(self) -> Path:
        return _newest(self.out.parent, self.out.name)


def measure(
    gw: Counted, redis: Counted | None, name: str, warmup: int, requests: int
) -> tuple[float, float | None]:
    """Instructions per request of the gateway and (Redis state) of redis-server."""
    model, stream, concurrency = SCENARIOS[name]
    spec = LoadSpec(
        url=gw.service.url + "/v1/chat/completions",
        concurrency=concurrency,
        body=chat_body(model, stream=stream),
        stream=stream,
        headers={"Authorization": f"Bearer {TENANT_KEY}"},
    )
    spec.requests = warmup
    asyncio.run(run_load(spec))
    counted = [gw] if redis is None else [gw, redis]
    for c in counted:
        c.zero()
    spec.requests = requests
    res = asyncio.run(run_load(spec))
    if res.errors:
        raise RuntimeError(
            f"{name}: {res.errors} errors ({res.statuses}), the first: {res.first_error}"
        )
    for c in counted:
        c.dump()
    time.sleep(1)
    return gw.total() / requests, None if redis is None else redis.total() / requests


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
    rows: list[tuple[str, str, float, float | None]] = []
    try:
        for state in states:
            with tempfile.TemporaryDirectory(prefix=f"gwinstr-{state}-") as tmp:
                d = Path(tmp)
                rows += _run_state(args, state, names, d, up)
    finally:
        up.stop()
    src = args.gateway_src or Path(__file__).resolve().parent.parent
    print(f"\nGateway {src}, {sys.executable}: user-space instructions per request "
          f"(callgrind, {args.requests} after {args.warmup})")  # fmt: skip
    print("\n| state | scenario | gateway | redis-server |\n|---|---|--:|--:|")
    for state, name, per, per_redis in rows:
        redis_col = "" if per_redis is None else f"{per_redis:,.0f}"
        print(f"| {state} | {name} | {per:,.0f} | {redis_col} |")


def _run_state(
    args: argparse.Namespace, state: str, names: list[str], d: Path, up: Service
) -> list[tuple[str, str, float, float | None]]:
    rows: list[tuple[str, str, float, float | None]] = []
    redis: Counted | None = None
    if state == "redis":
        redis_out = d / "redis.callgrind.out"
        redis = Counted(start_redis_under_callgrind(redis_out), redis_out)
    prefix = f"gwinstr-{uuid.uuid4().hex[:8]}"
    try:
        # Valgrind runs both processes some 50x slower, and this VM's speed varies: waits
        # that suit a gateway at full speed (5 s for a connection or a Redis reply) made
        # whole runs fail with 503s here, so the run waits much longer.
        url = (redis.service.url if redis is not None else "redis://127.0.0.1:6379/0") + (
            f"?socket_timeout={VALGRIND_WAIT}&socket_connect_timeout={VALGRIND_WAIT}"
        )
        config = write_gateway_config(
            d,
            up.url,
            state_url(state, d, url),
            prefix,
            upstream_timeouts={"connect": VALGRIND_WAIT, "first_byte": VALGRIND_WAIT},
        )
        out = d / "callgrind.out"
        gw = Counted(start_under_callgrind(config, out, args.gateway_src), out)
        try:
            for name in names:
                per, per_redis = measure(gw, redis, name, args.warmup, args.requests)
                if args.keep is not None:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(gw.newest(), args.keep / f"{state}-{name}.out")
                    if redis is not None:
                        shutil.copy(redis.newest(), args.keep / f"{state}-{name}.redis.out")
                rows.append((state, name, per, per_redis))
                also = "" if per_redis is None else f", redis-server {per_redis:10,.0f}"
                print(f"{state:8s} {name:16s} {per:12,.0f} instructions/request{also}",
                      flush=True)  # fmt: skip
        finally:
            gw.service.stop()
    finally:
        if redis is not None:
            redis.service.stop()
    return rows


if __name__ == "__main__":
    main()
