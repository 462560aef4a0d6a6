"""The current policy, hot-reloaded.

Policy files are re-read when any of them changes (checked every second) and on SIGHUP.
A reload is atomic: the new snapshot replaces the old one in one assignment, and a
request keeps the snapshot it started with. A bad edit keeps the old policy, logs why
(file, key, problem) and counts a reload failure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from .config import ConfigError, LoadedConfig, Policy, load_policy
from .config.loader import policy_files
from .metrics import Metrics

log = logging.getLogger("gateway.policy")


class PolicyStore:
    def __init__(self, loaded: LoadedConfig, metrics: Metrics, initial: Policy | None = None):
        self._loaded = loaded
        self._metrics = metrics
        self.current: Policy = initial if initial is not None else load_policy(loaded)
        self.last_error: str | None = None
        self._stamp = self._fingerprint()
        self._task: asyncio.Task[None] | None = None

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        try:
            files = policy_files(self._loaded.policy_dir)
        except ConfigError:
            return ()
        out = []
        for f in files:
            with contextlib.suppress(OSError):
                st = f.stat()
                out.append((str(f), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def reload(self) -> bool:
        """Load the policy files again; keep the old policy if they are not valid."""
        self._stamp = self._fingerprint()
        try:
            new = load_policy(self._loaded)
        except ConfigError as exc:
            self.last_error = str(exc)
            self._metrics.reload(False)
            log.error("policy reload refused, the previous policy stays in force:\n%s", exc)
            return False
        self.current = new
        self.last_error = None
        self._metrics.reload(True)
        log.info(
            "policy reloaded: %d tenants, %d routes, digest %s",
            len(new.tenants),
            len(new.routes),
            new.digest,
        )
        return True

    def check(self) -> bool:
        """Reload if any policy file changed since the last load."""
        if self._fingerprint() != self._stamp:
            return self.reload()
        return False

    def start(self, interval: float = 1.0, sighup: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._watch(interval), name="policy-watch")
        if sighup:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.check()
            except Exception:  # a watcher that dies silently would be worse
                log.exception("policy watcher failed; it keeps watching")

    @property
    def directory(self) -> Path:
        return self._loaded.policy_dir
