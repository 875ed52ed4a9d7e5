"""A webhook receiver on 127.0.0.1 for the tests: records every request, answers what it is told to."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """``answer(request_number) -> (status, headers)`` decides each answer (default 200); ``requests`` holds
    ``{"path", "headers", "body", "json"}`` per request received."""

    def __init__(self, port: int = 0, answer: Callable[[int], tuple[int, dict[str, str]]] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answer = answer or (lambda n: (200, {}))
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer._lock:
                    n = len(outer.requests)
                    try:
                        parsed = json.loads(body)
                    except ValueError:
                        parsed = None
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                           "json": parsed})
                status, headers = outer.answer(n)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST  # noqa: N815 (a redirect target would be fetched with GET)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
