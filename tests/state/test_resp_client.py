"""The pipelining Redis client against a private redis-server on a free port."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from servers.gateway import free_port

from gateway.state.resp import RespClient


class PrivateRedis:
    def __init__(self, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no"]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), *auth, "ping"], capture_output=True, check=False
            ).stdout.strip()
            != b"PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def client(self, db: int = 0, timeout: float = 5.0) -> RespClient:
        auth = f":{self.password}@" if self.password else ""
        pool = BlockingConnectionPool.from_url(f"redis://{auth}127.0.0.1:{self.port}/{db}")
        return RespClient(dict(pool.connection_kwargs), size=2, timeout=timeout)


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    s = PrivateRedis()
    s.start()
    yield s
    s.stop()


async def test_pipelined_replies_reach_their_callers(server: PrivateRedis) -> None:
    client = server.client()
    replies = await asyncio.gather(*(client.call("ECHO", f"m{i}") for i in range(500)))
    assert replies == [f"m{i}".encode() for i in range(500)]
    assert await client.call("SET", "k", b"\x00\xff") == b"OK"
    assert await client.call("GET", "k") == b"\x00\xff"
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await client.call("LPUSH", "k", "x")
    assert await client.call("PING") == b"PONG"  # an error reply does not desync
    client.close()


async def test_unknown_script_is_sent_again(server: PrivateRedis) -> None:
    client = server.client()
    script = "return ARGV[1] .. KEYS[1]"
    sha = hashlib.sha1(script.encode()).hexdigest()
    assert await client.evalsha(sha, script, ["k"], ["v"]) == b"vk"  # NOSCRIPT, then EVAL
    assert await client.call("EVALSHA", sha, 1, "k", "w") == b"wk"  # now it is known
    client.close()


async def test_a_timeout_closes_the_connection_so_replies_stay_matched(
    server: PrivateRedis,
) -> None:
    client = server.client(timeout=0.3)
    with pytest.raises(RedisTimeoutError):
        await client.call("BLPOP", "nothing-here", 1)  # blocks longer than the timeout
    # Had the connection stayed open, BLPOP's late nil would be taken as these replies.
    for i in range(4):
        assert await client.call("ECHO", f"after{i}") == f"after{i}".encode()
    client.close()


async def test_calls_behind_a_stuck_one_time_out_with_it(server: PrivateRedis) -> None:
    """One timer per connection: when the oldest call is past its deadline, the calls
    pipelined behind it fail too (their replies would come after the stuck one's), as
    timeouts, and at once rather than each at its own deadline."""
    client = RespClient(dict(server.client()._kw), size=1, timeout=0.3)
    assert await client.call("PING") == b"PONG"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stuck = asyncio.ensure_future(client.call("BLPOP", "nothing-here", 2))
    await asyncio.sleep(0.1)
    behind = asyncio.ensure_future(client.call("ECHO", "behind"))
    for call in (stuck, behind):
        with pytest.raises(RedisTimeoutError, match=r"within 0\.3s"):
            await call
    assert 0.25 < loop.time() - t0 < 0.6  # the stuck call's deadline, not behind's own
    assert await client.call("ECHO", "fresh") == b"fresh"  # on a new connection
    client.close()


async def test_the_deadline_is_each_calls_own(server: PrivateRedis) -> None:
    """Calls answered in time never time out, however long the connection is busy:
    the one timer follows the oldest call still waiting."""
    client = RespClient(dict(server.client()._kw), size=1, timeout=0.2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    n = 0
    while loop.time() - t0 < 0.7:  # several timeouts long, a call always in flight
        replies = await asyncio.gather(client.call("ECHO", "a"), asyncio.sleep(0.02))
        assert replies[0] == b"a"
        n += 1
    assert n > 10
    client.close()


async def test_reconnects_after_the_server_comes_back(server: PrivateRedis) -> None:
    client = server.client()
    assert await client.call("PING") == b"PONG"
    server.stop()
    with pytest.raises(RedisConnectionError):
        await client.call("PING")
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await client.call("PING")
    server.start()
    assert await client.call("PING") == b"PONG"
    client.close()


async def test_password_and_database() -> None:
    s = PrivateRedis(password="s3cret")
    s.start()
    try:
        client = s.client(db=3)
        assert await client.call("SET", "in-db-3", "yes") == b"OK"
        assert await client.call("CLIENT", "INFO") is not None
        info = (await client.call("CLIENT", "INFO")).decode()
        assert " db=3 " in info
        client.close()
        wrong = RespClient({"host": "127.0.0.1", "port": s.port, "password": "nope"}, size=1)
        with pytest.raises(AuthenticationError):
            await wrong.call("PING")
        wrong.close()
    finally:
        s.stop()


async def test_a_command_on_a_closed_connection_fails_at_once(server: PrivateRedis) -> None:
    """Not after the call's timeout: nothing would ever answer it."""
    client = server.client(timeout=5.0)
    assert await client.call("PING") == b"PONG"
    conn = await client._connection(0)
    conn.close()
    await asyncio.sleep(0.05)  # its connection_lost has run: no one fails the call later
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(conn.send(b"*1\r\n$4\r\nPING\r\n"), 1)
    client.close()


async def test_the_urls_client_name_and_keepalive_apply(server: PrivateRedis) -> None:
    """What redis-py does with ``client_name`` and ``socket_keepalive`` for its own
    connections, the pipelined ones do too: named in CLIENT LIST, TCP keepalive on."""
    pool = BlockingConnectionPool.from_url(
        f"redis://127.0.0.1:{server.port}/0?client_name=gw-hot-path&socket_keepalive=true"
    )
    client = RespClient(dict(pool.connection_kwargs), size=1)
    try:
        assert await client.call("PING") == b"PONG"
        listed = await client.call("CLIENT", "LIST")
        assert b"name=gw-hot-path" in listed
        conn = client._conns[0]
        assert conn is not None and conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        client.close()
    plain = server.client()  # neither asked for: neither done
    try:
        assert await plain.call("PING") == b"PONG"
        conn = plain._conns[0] or plain._conns[1]
        assert conn is not None and conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        plain.close()


class Relay:
    """A TCP relay to Redis that can go silent on the connections it already carries, as
    a firewall or load balancer that dropped an idle flow does: no data, no close."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.generation = 0
        self.silent_before = 0  # connections of an older generation forward nothing
        self.tasks: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        gen = self.generation = self.generation + 1
        r2, w2 = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if gen > self.silent_before:
                    dst.write(data)

        pumps = [asyncio.ensure_future(pipe(r1, w2)), asyncio.ensure_future(pipe(r2, w1))]
        self.tasks.extend(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (w1, w2):
                w.close()

    def drop_existing(self) -> None:
        self.silent_before = self.generation

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_a_connection_idle_past_the_limit_is_replaced_not_trusted(
    server: PrivateRedis,
) -> None:
    """A flow dropped silently while idle: the next call opens a new connection and
    answers at once, instead of waiting out the timeout on the dead one."""
    relay = Relay(server.port)
    port = await relay.start()
    client = RespClient({"host": "127.0.0.1", "port": port}, size=1, timeout=2, idle_limit=0.3)
    loop = asyncio.get_running_loop()
    try:
        assert await client.call("PING") == b"PONG"
        relay.drop_existing()
        await asyncio.sleep(0.4)
        t0 = loop.time()
        assert await client.call("PING") == b"PONG"
        assert loop.time() - t0 < 1.0
    finally:
        client.close()
        await relay.close()


async def test_a_busy_connection_is_kept(server: PrivateRedis) -> None:
    client = RespClient(dict(server.client()._kw), size=1, idle_limit=0.3)
    try:
        assert await client.call("PING") == b"PONG"
        first = client._conns[0]
        for _ in range(10):  # 1 s of calls, never 0.3 s apart
            await asyncio.sleep(0.1)
            assert await client.call("PING") == b"PONG"
        assert client._conns[0] is first and first is not None and not first.closed
    finally:
        client.close()
