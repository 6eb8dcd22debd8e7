"""An OpenAI-compatible chat-completions server on 127.0.0.1, for the annotator tests: the HTTP plumbing they
share. Each test module's subclass decides what it answers (`answer`)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatCompletionsServer(ThreadingHTTPServer):
    """Serves POST requests on 127.0.0.1 (a free port), on a thread of its own while it is used as a context
    manager; `answer(handler, body)` replies to each one, with `handler.send(status, payload)`. ``host``: the
    name clients use in `base_url` (it must resolve to an address of this machine; the server listens there)."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1"):
        super().__init__((socket.gethostbyname(host), 0), ChatCompletionsHandler)
        self.host = host
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.server_address[1]}/v1"

    def answer(self, handler: ChatCompletionsHandler, body: dict) -> None:
        raise NotImplementedError

    def __enter__(self) -> ChatCompletionsServer:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class ChatCompletionsHandler(BaseHTTPRequestHandler):
    server: ChatCompletionsServer

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        self.server.answer(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass
