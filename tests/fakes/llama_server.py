"""A stand-in for llama-server (tests only): run as a program, it behaves like one.

It takes the flags the agent passes (``-m``, ``--host``, ``--port``), answers 503 on ``/health``
while "loading", then 200, and offers ``/slots`` and a chat endpoint. Extra flags make it
misbehave: crash at start, ignore SIGTERM, stop answering health checks.
"""

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("-m", required=True)
p.add_argument("--host", required=True)
p.add_argument("--port", type=int, required=True)
p.add_argument("--alias")
p.add_argument("--metrics", action="store_true")
p.add_argument("--parallel", "-np", type=int)  # accepted as llama-server does; --slots sets ours
p.add_argument("--cache-ram", "-cram", type=int)
p.add_argument("--kv-unified", "-kvu", action="store_true")
p.add_argument("--load-delay", type=float, default=0.0)
p.add_argument("--crash", type=int, default=None)
p.add_argument("--ignore-term", action="store_true")
p.add_argument("--unhealthy-after", type=float, default=None)
p.add_argument("--slots", type=int, default=2)
a = p.parse_args()
if a.crash is not None:
    print("error: failed to load model (simulated)", flush=True)
    sys.exit(a.crash)
if a.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
started = time.monotonic()


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        age = time.monotonic() - started
        if self.path == "/health":
            if age < a.load_delay:
                return self.reply(503, {"error": {"code": 503, "message": "Loading model"}})
            if a.unhealthy_after is not None and age > a.unhealthy_after:
                return self.reply(500, {"error": {"code": 500, "message": "wedged"}})
            return self.reply(200, {"status": "ok", "argv": sys.argv[1:], "pid": os.getpid()})
        if self.path == "/metrics" and a.metrics:
            body = b"# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total 7\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None
        if self.path == "/slots":
            return self.reply(200, [{"id": i, "is_processing": i == 0} for i in range(a.slots)])
        self.reply(404, {"error": {"message": "not found"}})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}")
        self.reply(
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": f"fake llama {os.getpid()}"},
                    }
                ],
                "headers": dict(self.headers),
            },
        )


print(f"main: server is listening on http://{a.host}:{a.port}", flush=True)
ThreadingHTTPServer((a.host, a.port), H).serve_forever()
