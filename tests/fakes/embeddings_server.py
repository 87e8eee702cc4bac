"""A fake OpenAI-compatible ``/v1/embeddings`` server on 127.0.0.1 (standard library only).

Vectors are a hashed bag of words (lowercased words, and character bigrams of CJK text) in
``DIM`` dimensions: deterministic, and texts sharing words are near. ``mode`` makes it fail:
"error" (HTTP 500), "garbage" (200 with no vectors), "stall" (no answer until closed).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIM = 256
_WORDS = re.compile(r"[a-z0-9]+|[\u3040-\u30ff\u4e00-\u9fff]+")


def vector(text: str) -> list[float]:
    v = [0.0] * DIM
    for run in _WORDS.findall(text.lower()):
        grams = [run] if run.isascii() or len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)]
        for g in grams:
            h = hashlib.md5(g.encode()).digest()
            v[int.from_bytes(h[:4], "little") % DIM] += 1.0 if h[4] & 1 else -1.0
    return v


class FakeEmbeddingsServer:
    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.requests: list[dict] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if self.path != "/v1/embeddings":
                    return self._send(404, {"error": "not found"})
                if server.mode == "stall":
                    server.release.wait()
                    return
                if server.mode == "error":
                    return self._send(500, {"error": {"message": "the model is not loaded"}})
                if server.mode == "garbage":
                    return self._send(200, {"object": "list"})
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                data = [{"object": "embedding", "index": i, "embedding": vector(t)} for i, t in enumerate(inputs)]
                self._send(200, {"object": "list", "data": data[::-1], "model": body.get("model")})  # any order

            def _send(self, status, payload):
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeEmbeddingsServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
