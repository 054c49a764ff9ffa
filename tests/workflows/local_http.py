"""A threaded HTTP server on 127.0.0.1 (a free port) for the fake Argo and Kubernetes API servers of these
tests: `with Fake() as f:` serves `f.url` until the block ends."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHTTPServer:
    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        """Bind `handler` to a free port of 127.0.0.1 (called by the fake's __init__); served from __enter__."""
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
