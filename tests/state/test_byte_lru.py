"""The embedded cache's LRU: bounded by the memory its entries take, not only their values."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from gateway.state.embedded import ByteLRU

FOREVER = 2**62


def _key(i: int) -> str:
    return "cache:t1:" + hashlib.sha256(str(i).encode()).hexdigest()


# Measured in a fresh interpreter: in the test process, servers of other tests (some
# running this same cache code) allocate meanwhile and made the figure drift by 10 %.
_MEASURE = """
import hashlib, os, sys, tracemalloc
from gateway.state.embedded import ByteLRU
value_size, limit = int(sys.argv[1]), int(sys.argv[2])
tracemalloc.start()
lru = ByteLRU(limit)
before = tracemalloc.get_traced_memory()[0]
for i in range(3 * limit // value_size):  # three times what fits
    key = "cache:t1:" + hashlib.sha256(str(i).encode()).hexdigest()
    lru.put(key, os.urandom(value_size), 2**62)
print(tracemalloc.get_traced_memory()[0] - before, lru.size)
"""


def test_max_bytes_bounds_the_memory_taken() -> None:
    limit = 1_000_000
    for value_size in (50, 300, 2000):
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(value_size), str(limit)],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.split()  # fmt: skip
        used, size = int(out[0]), int(out[1])
        assert size <= limit
        # small values: most of an entry is overhead, and it is counted
        assert used <= 1.15 * limit, (value_size, used)
        assert used >= 0.75 * limit, (value_size, used)


def test_oldest_unused_entries_go_first_and_expired_ones_are_not_served() -> None:
    cost = len(_key(0)) + 100 + ByteLRU.ENTRY_OVERHEAD
    lru = ByteLRU(3 * cost)
    for i in range(3):
        lru.put(_key(i), b"x" * 100, FOREVER)
    assert lru.get(_key(0), 0) is not None  # now the most recently used
    lru.put(_key(3), b"y" * 100, FOREVER)
    assert lru.get(_key(1), 0) is None and len(lru) == 3
    assert lru.get(_key(0), 0) == b"x" * 100
    lru.put(_key(4), b"z" * 100, 10)
    assert lru.get(_key(4), 10) is None  # expired
    assert lru.size == 2 * cost  # the expired one was dropped on sight
    lru.put(_key(5), b"w" * (4 * cost), FOREVER)  # larger than the whole cache
    assert lru.get(_key(5), 0) is None
