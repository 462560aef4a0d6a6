"""A socket server that answers with exact bytes (after urllib3's dummyserver): for
upstream behaviour the aiohttp fake cannot produce, such as a body that ends only when
the connection closes, or TLS with a private certificate authority."""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# (request, n-th request on the connection) -> the answer; a list is sent part by part,
# PART_GAP seconds apart, so that each part arrives in a read of its own
Reply = Callable[[bytes, int], bytes | list[bytes] | None]
PART_GAP = 0.1


def read_request(sock: socket.socket | ssl.SSLSocket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body


@contextmanager
def raw_server(
    reply: Reply, *, tls: ssl.SSLContext | None = None, keep_open: bool = True
) -> Iterator[int]:
    """Serve on a free port: ``reply(request, n)`` gives the bytes to send (None closes the
    connection without answering); after each answer the connection stays open for the
    next request unless ``keep_open`` is False."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            if tls is not None:
                try:
                    sock = tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    return
            n = 0
            try:
                while True:
                    req = read_request(sock)
                    if req is None:
                        return
                    out = reply(req, n)
                    n += 1
                    if out is None:
                        return
                    for i, part in enumerate([out] if isinstance(out, bytes) else out):
                        if i:
                            time.sleep(PART_GAP)
                        sock.sendall(part)
                    if not keep_open:
                        return
            except OSError:
                return
            finally:
                sock.close()

    with serving(Handler) as port:
        yield port


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def serving(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    """A threaded TCP server on a free port of 127.0.0.1, one thread per connection running
    ``handler``; yields the port, shuts down at the end of the block."""
    with _Server(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join(5)
