"""Redis over TLS (``rediss://``) with a private CA, against a private redis-server with
TLS on a free port: the URL's ``ssl_*`` parameters apply to the hot path's pipelined
connections as they do to redis-py's."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme
from servers.gateway import free_port
from test_backends import admission, settle

from gateway.state.base import LedgerQuery, StateUnavailable
from gateway.state.redis import RedisState


class TlsRedis:
    def __init__(self, directory: Path, *, client_certs: bool = False) -> None:
        self.ca = directory / "ca.pem"
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(self.ca))
        cert.private_key_pem.write_to_path(str(directory / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
        # a client certificate from the same CA, for a server that asks for one
        self.client_cert, self.client_key = directory / "client.pem", directory / "client.key"
        client = ca.issue_cert("gateway@example.com")
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        self.mtls = f"ssl_ca_certs={self.ca}&ssl_certfile={self.client_cert}" + (
            f"&ssl_keyfile={self.client_key}"
        )
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(directory / "cert.pem"),
             "--tls-key-file", str(directory / "key.pem"),
             "--tls-ca-cert-file", str(self.ca),
             "--tls-auth-clients", "yes" if client_certs else "no",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url(self.mtls), socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.skip("this redis-server cannot serve TLS")
                time.sleep(0.05)
        client.close()

    def url(self, query: str) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?{query}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path)
    yield server
    server.stop()


async def _every_kind_of_call(state: RedisState) -> None:
    await state.start()  # redis-py: ping, INFO, script loads
    assert (await state.admit(admission("r1", 10))).ok  # the pipelined client
    res, _ = await settle(state, "r1", 7)
    assert res.charged == 7
    rows = await state.ledger(LedgerQuery())  # redis-py again
    assert [r.id for r in rows.rows] == ["r1"]


async def test_a_private_ca_in_the_url_is_trusted_by_every_connection(
    tls_redis: TlsRedis,
) -> None:
    state = RedisState(tls_redis.url(f"ssl_ca_certs={tls_redis.ca}"), prefix="gwtest:tls")
    try:
        await _every_kind_of_call(state)
    finally:
        await state.close()


async def test_without_the_ca_every_connection_refuses_the_certificate(
    tls_redis: TlsRedis,
) -> None:
    state = RedisState(tls_redis.url("socket_timeout=2"), prefix="gwtest:tls")
    try:
        for call in (state.ping(), state.admit(admission("r1", 10))):
            with pytest.raises(StateUnavailable, match=r"does not trust .*ssl_ca_certs=<file>"):
                await call
    finally:
        await state.close()


async def test_a_client_certificate_in_the_url_is_presented_by_every_connection(
    tmp_path: Path,
) -> None:
    server = TlsRedis(tmp_path, client_certs=True)  # tls-auth-clients yes
    try:
        state = RedisState(server.url(server.mtls), prefix="gwtest:tls")
        try:
            await _every_kind_of_call(state)
        finally:
            await state.close()
        without = RedisState(server.url(f"ssl_ca_certs={server.ca}"), prefix="gwtest:tls")
        try:
            with pytest.raises(StateUnavailable):
                await without.admit(admission("r1", 10))
        finally:
            await without.close()
    finally:
        server.stop()
