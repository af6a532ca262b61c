"""A fault-injecting HTTP proxy in front of the local S3 server: an object store that fails writes or reads on demand.

Every request goes through to the real server unchanged, except writes of objects that ``fail_writes`` matches: those
get S3's 500 InternalError, after their body was read, as a store failing mid-write does; and reads (GET) of objects
that ``fail_reads`` matches: those get S3's 503 SlowDown, a store under too much load. Clients retry (pyarrow's S3
retry strategy) and then give up. ``requests`` lists every request as (method, path), to count the tries.
"""

from __future__ import annotations

import http.client
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERRORS = {code: (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>' + code.encode() +
                  b'</Code><Message>fault injected by the test proxy</Message></Error>')
           for code in ("InternalError", "SlowDown")}


class FaultProxy:
    """``with FaultProxy(s3.endpoint_url) as proxy: proxy.fail_writes = r"state\\.pt"``; ``proxy.endpoint_url``.
    With ``proxy.spare = 1`` the first matching object is written and every later one fails."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.fail_writes: str | None = None  # a regex on the request path; None: no faults
        self.spare = 0  # the first this many objects that fail_writes matches are written all the same
        self.spared: list[str] = []
        self.failed: list[str] = []  # paths of the writes refused
        self.fail_reads: str | None = None  # a regex on the path of GET requests; None: no faults
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as S3 clients expect

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _fail(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(_ERRORS[code])))
                self.end_headers()
                self.wfile.write(_ERRORS[code])

            def _forward(self):
                body = self._body()
                path = urlsplit(self.path).path
                proxy.requests.append((self.command, path))
                matched = self.command in ("PUT", "POST") and proxy.fail_writes and re.search(proxy.fail_writes, path)
                if matched and path not in proxy.spared and len(proxy.spared) < proxy.spare:
                    proxy.spared.append(path)
                if matched and path not in proxy.spared:
                    proxy.failed.append(path)
                    self._fail(500, "InternalError")
                    return
                if self.command == "GET" and proxy.fail_reads and re.search(proxy.fail_reads, path):
                    self._fail(503, "SlowDown")
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "expect")}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status)
                for key, value in response.getheaders():  # a HEAD's Content-Length is the object's: keep it
                    if key.lower() not in ("transfer-encoding", "connection") and (
                            key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
