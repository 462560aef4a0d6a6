"""The embedded ledger store's group commit, in both durability modes.

``sync: normal`` commits on the event loop (one group per loop pass) with WAL checkpoints
in a thread; ``sync: full`` commits in a writer thread. Either way ``write()`` returns
only once its group is on disk, a failed group is reported to every writer in it, and a
writer cancelled meanwhile still has its write committed."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.state.base import StateUnavailable
from gateway.state.sqlite_store import INSERT_TOP_UP, SqliteStore


def _top_up(key: str, nanos: int = 1) -> list[tuple[str, tuple[object, ...]]]:
    return [(INSERT_TOP_UP, ("acme", key, "cust-1", nanos, f"row-{key}"))]


def _keys_on_disk(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {k for (k,) in conn.execute("SELECT key FROM top_ups")}
    finally:
        conn.close()


@pytest.fixture(params=["normal", "full"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "ledger.db"), request.param)
    s.open()
    s.start(asyncio.get_running_loop())
    try:
        yield s
    finally:
        await s.close()


async def test_a_write_is_on_disk_when_it_returns(store: SqliteStore) -> None:
    for i in range(20):
        await store.write(_top_up(f"k{i}"))
        # another connection (another process would see the same) finds it committed
        assert f"k{i}" in _keys_on_disk(Path(store.path))


async def test_concurrent_writes_share_commits(store: SqliteStore) -> None:
    before = store.commits
    await asyncio.gather(*(store.write(_top_up(f"k{i}")) for i in range(300)))
    groups = store.commits - before
    assert len(_keys_on_disk(Path(store.path))) == 300
    assert store.commits_on_loop == (store.sync == "NORMAL")
    if store.commits_on_loop:
        assert groups == 1  # all 300 were queued in the same loop pass
    else:
        assert groups < 300


async def test_a_failed_group_fails_every_writer_in_it_then_recovers(
    store: SqliteStore,
) -> None:
    await store.write(_top_up("taken"))
    results = await asyncio.gather(
        store.write(_top_up("fine")),
        store.write(_top_up("taken")),  # primary key conflict: the transaction fails
        return_exceptions=True,
    )
    if store.commits_on_loop:  # one group: both writers hear of the failure
        assert all(isinstance(r, StateUnavailable) for r in results)
        assert "UNIQUE constraint failed" in str(results[1])
        assert store.broken is not None
        assert _keys_on_disk(Path(store.path)) == {"taken"}  # nothing half-applied
    else:
        assert isinstance(results[1], StateUnavailable)
    await store.write(_top_up("later"))
    assert store.broken is None
    assert "later" in _keys_on_disk(Path(store.path))


async def test_a_cancelled_writer_still_has_its_write_committed(store: SqliteStore) -> None:
    task = asyncio.ensure_future(store.write(_top_up("cancelled")))
    await asyncio.sleep(0)  # the write is queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.write(_top_up("after"))  # a later group: the first one is done by now
    assert {"cancelled", "after"} <= _keys_on_disk(Path(store.path))


async def test_write_nowait_goes_with_the_next_group(store: SqliteStore) -> None:
    store.write_nowait(_top_up("background"))
    await store.write(_top_up("foreground"))
    assert {"background", "foreground"} <= _keys_on_disk(Path(store.path))


async def test_writes_after_close_are_refused(tmp_path: Path) -> None:
    s = SqliteStore(str(tmp_path / "ledger.db"), "normal")
    s.open()
    s.start(asyncio.get_running_loop())
    await s.close()
    with pytest.raises(StateUnavailable):
        await s.write(_top_up("late"))


async def test_close_commits_what_is_pending(tmp_path: Path) -> None:
    s = SqliteStore(str(tmp_path / "ledger.db"), "normal")
    s.open()
    s.start(asyncio.get_running_loop())
    s.write_nowait(_top_up("pending"))
    await s.close()
    assert _keys_on_disk(tmp_path / "ledger.db") == {"pending"}


async def test_the_wal_is_checkpointed_into_the_database(tmp_path: Path) -> None:
    """Commits on the loop keep SQLite's automatic checkpoints (every 1,000 pages): the
    WAL does not grow without end and the database file itself receives the rows."""
    db = tmp_path / "ledger.db"
    s = SqliteStore(str(db), "normal")
    s.open()
    s.start(asyncio.get_running_loop())
    try:
        for i in range(3000):  # 3,000 groups of one: well over 1,000 pages of WAL
            await s.write(_top_up(f"k{i}"))
        assert (tmp_path / "ledger.db-wal").stat().st_size < 6 * 2**20
        alone = tmp_path / "copy.db"  # the database file without its WAL
        shutil.copyfile(db, alone)
        assert len(_keys_on_disk(alone)) > 1000
    finally:
        await s.close()
    assert len(_keys_on_disk(db)) == 3000
