"""CPU time and memory of a process, from /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def user_system_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of every thread of ``pid`` so far, in the process and in the kernel
    (10 ms resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def io_calls(pid: int) -> tuple[int, int]:
    """(read, write) system calls of every thread of ``pid`` so far, from
    ``/proc/<pid>/io``: read/readv/pread and write/writev/pwrite, which is how the event
    loop reads and writes its sockets (sendmsg, recvmsg and epoll are not counted)."""
    calls = _proc_fields(pid, "io", ("syscr", "syscw"))
    return calls.get("syscr", 0), calls.get("syscw", 0)


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start or the last reset_peak) in KiB."""
    return _proc_fields(pid, "status", ("VmRSS", "VmHWM"))


def _proc_fields(pid: int, name: str, keys: tuple[str, ...]) -> dict[str, int]:
    """The numbers of ``keys`` in ``/proc/<pid>/<name>``, a file of ``key: value [unit]``
    lines."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
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
    ``stop()``; and for each, the share of them spent in the kernel and its read and
    write system calls."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, tuple[float, float, int, int]] = {}
        self.used: dict[str, float] = {}
        self.system: dict[str, float] = {}  # of ``used``, in the kernel
        self.reads: dict[str, int] = {}
        self.writes: dict[str, int] = {}

    def start(self) -> None:
        self._start = {name: _tree_counters(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        for name, pid in self.pids.items():
            user, system, reads, writes = _tree_counters(pid)
            user0, system0, reads0, writes0 = self._start[name]
            self.used[name] = user - user0 + system - system0
            self.system[name] = system - system0
            self.reads[name] = reads - reads0
            self.writes[name] = writes - writes0


def _tree_counters(pid: int) -> tuple[float, float, int, int]:
    """utime, stime, read and write calls of ``pid`` and its descendants."""
    user = system = 0.0
    reads = writes = 0
    for p in tree(pid):
        try:
            u, s = user_system_seconds(p)
            r, w = io_calls(p)
        except OSError:  # a process that just ended
            continue
        user, system, reads, writes = user + u, system + s, reads + r, writes + w
    return user, system, reads, writes
