"""A fault-injecting HTTP proxy in front of moto's S3 server.

S3 itself is real (moto over HTTP); the proxy only misbehaves on the instance
uploads it is told to: it corrupts the stored bytes (moto, like a faulty disk,
does not verify the checksum) or acknowledges a PUT without storing it (the
pipeline's verification must catch both); or it throttles: every
``throttle_every``-th key written gets ``throttle_times`` 503 SlowDown answers
before its PUT goes through. ``fault(method, path)`` (for the fault suite)
names what to do with any request: ``"503"``, ``"500"``, ``"reset"`` (the
connection cut mid-body, nothing stored), ``"reset_after"`` (stored, the
connection cut before the answer), ``"drop"`` (acknowledged, not stored),
``"slow"`` (stored, answered after ``slow_s``), ``"hold"`` (forwarded only
when ``release`` is set: a PUT landing late), or None (forwarded).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class S3FaultProxy:
    def __init__(
        self,
        upstream: str,
        corrupt_nth: int | None = None,
        drop_nth: int | None = None,
        throttle_every: int | None = None,
        throttle_times: int = 4,
        fault: Callable[[str, str], str | None] | None = None,
        slow_s: float = 3.0,
    ) -> None:
        self.fault, self.slow_s = fault, slow_s
        self.release = threading.Event()
        self.held: list[str] = []
        self.injected: dict[str, int] = {}
        self.upstream = urlsplit(upstream)
        self.throttle_every, self.throttle_times = throttle_every, throttle_times
        self.keys_put: dict[str, int] = {}  # key -> 503s answered so far (throttled keys only)
        self.throttled = 0
        self.corrupt_nth = corrupt_nth
        self.drop_nth = drop_nth
        self.instance_puts = 0
        self.corrupted: list[str] = []
        self.dropped: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _reply(self, status: int, code: str) -> None:
                payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _cut(self) -> None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                path = self.path.split("?", 1)[0]
                action = proxy.fault(self.command, path) if proxy.fault else None
                if action:
                    with proxy._lock:
                        proxy.injected[action] = proxy.injected.get(action, 0) + 1
                if action == "reset":
                    self.rfile.read(length // 2)
                    return self._cut()
                body = self.rfile.read(length) if length else b""
                if action in ("503", "500"):
                    return self._reply(int(action), "SlowDown" if action == "503" else "InternalError")
                if action == "drop":
                    self.send_response(200)
                    self.send_header("ETag", '"00000000000000000000000000000000"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action == "hold":
                    proxy.held.append(path)
                    proxy.release.wait(timeout=300)
                if self.command == "PUT" and proxy._throttle(path):
                    payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if self.command == "PUT" and "/instances/" in path:
                    with proxy._lock:
                        proxy.instance_puts += 1
                        n = proxy.instance_puts
                    if n == proxy.drop_nth:
                        proxy.dropped.append(path)
                        self.send_response(200)
                        self.send_header("ETag", '"00000000000000000000000000000000"')
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    if n == proxy.corrupt_nth and body:
                        proxy.corrupted.append(path)
                        body = body[:-1] + bytes([body[-1] ^ 0xFF])
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body if body else None, headers=headers)
                rsp = conn.getresponse()
                data = rsp.read()
                conn.close()
                if action == "reset_after":
                    return self._cut()
                if action == "slow":
                    time.sleep(proxy.slow_s)
                self.send_response(rsp.status, rsp.reason)
                for k, v in rsp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _throttle(self, path: str) -> bool:
        if not self.throttle_every:
            return False
        with self._lock:
            if path not in self.keys_put:
                n = len(self.keys_put) + 1
                self.keys_put[path] = 0 if n % self.throttle_every == 0 else -1
            if self.keys_put[path] < 0 or self.keys_put[path] >= self.throttle_times:
                return False
            self.keys_put[path] += 1
            self.throttled += 1
            return True

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
