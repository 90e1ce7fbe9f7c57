"""A real webhook receiver on 127.0.0.1 for the alert tests (standard library only).

What it does depends on the path it is posted to:
- `/ok/...`: records the JSON body and answers 204;
- `/hang/...`: reads the request, then never answers (until the server stops);
- `/flaky/N/...`: answers 500 to the first N posts on that path, then 204.
Every post that arrived is in `server.posts` (path, headers, parsed body), in order.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: Any


class WebhookServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.posts: list[Post] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.seen: dict[str, int] = {}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def bodies(self, prefix: str) -> list[Any]:
        with self.lock:
            return [post.body for post in self.posts if post.path.startswith(prefix)]

    def stop(self) -> None:
        self.stopping.set()  # releases the hanging handlers
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("latin-1")
        server = self.server
        with server.lock:
            server.posts.append(Post(self.path, dict(self.headers), body))
            server.seen[self.path] = seen = server.seen.get(self.path, 0) + 1
        parts = self.path.strip("/").split("/")
        if parts[0] == "hang":
            server.stopping.wait(120)
            self.close_connection = True
            return
        status = 204
        if parts[0] == "flaky" and seen <= int(parts[1]):
            status = 500
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


def start_webhooks() -> WebhookServer:
    server = WebhookServer()
    threading.Thread(target=server.serve_forever, name="webhooks", daemon=True).start()
    return server
