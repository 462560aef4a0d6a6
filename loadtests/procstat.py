"""CPU time and memory of a process, from /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far (10 ms resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start or the last reset_peak) in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a gateway with worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # a thread or process that just ended
                continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            continue
    return total


def tree_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM summed over ``pid`` and its descendants."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in tree(pid):
        try:
            mem = memory_kb(p)
        except OSError:
            continue
        for k in out:
            out[k] += mem.get(k, 0)
    return out


def tree_reset_peak(pid: int) -> bool:
    done = [reset_peak(p) for p in tree(pid)]  # every one, even after a failure
    return all(done)


class CpuWindow:
    """CPU seconds of some processes, each with its descendants, between ``start()`` and
    ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        self.used = {
            name: tree_cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()
        }
