"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the S3 endpoint.

For a share of requests it answers 503 SlowDown or resets the connection, as a throttled
or flaky object store does. Seeded, bounded, and it only ever talks to loopback.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str, fault_rate: float, seed: int = 0) -> None:
        parsed = urlparse(upstream)
        assert parsed.hostname in ("127.0.0.1", "localhost"), "the proxy only fronts loopback"
        self.upstream = (parsed.hostname, parsed.port)
        self.fault_rate = fault_rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "slowdown": 0, "reset": 0}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _decide(self) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.rng.random() >= self.fault_rate:
                return None
            kind = self.rng.choice(["slowdown", "reset"])
            self.counts[kind] += 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes | None:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _reset(self) -> None:
                # SO_LINGER 0 makes close() send RST: "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _proxy(self) -> None:
                body = self._body()
                fault = proxy._decide()
                if fault == "reset":
                    self._reset()
                    return
                if fault == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                head = self.command == "HEAD"  # HEAD keeps the object's Content-Length
                for key, value in resp.getheaders():
                    if key.lower() not in HOP_HEADERS and (head or key.lower() != "content-length"):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _serve(self) -> None:
                try:
                    self._proxy()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up on this request

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler
