"""A stand-in for NDIF's HTTP API, enough for nnsight's non-blocking jobs, offline.

``POST /request`` takes nnsight's multipart request (metadata + serialized block) and runs it
in a fresh process through ``sage_nn/_server.py`` (as FreshProcessBackend does);
``GET /response/{id}`` reports RUNNING, ERROR or COMPLETED with a download URL;
``GET /result/{id}`` returns the result bytes. Jobs run one after another in a worker
thread; ``hold`` keeps them queued until released, to test collecting later.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import subprocess
import sys
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import zstandard

from sage_nn.model.remote import _SERVER_SCRIPT, NOT_ON_SERVER


class FakeNDIF:
    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.jobs: dict[str, dict] = {}
        self.api_keys: list[str | None] = []
        self.hold = threading.Event()
        self.hold.set()  # jobs run as they come unless cleared
        self._queue: list[str] = []
        self._lock = threading.Condition()
        handler = type("Handler", (_Handler,), {"ndif": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        threading.Thread(target=self._work, daemon=True).start()

    def close(self):
        self.server.shutdown()

    def submit(self, metadata: dict, blob: bytes) -> str:
        job = uuid.uuid4().hex
        with self._lock:
            self.jobs[job] = {"status": "RECEIVED", "compress": metadata.get("compress", False)}
            self._queue.append(job)
            self._lock.notify()
        if metadata.get("compress"):
            blob = zstandard.ZstdDecompressor().decompress(blob)
        self.jobs[job]["blob"] = blob
        return job

    def _work(self):
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
                job = self._queue.pop(0)
            self.hold.wait()
            self._run(job)

    def _run(self, job: str):
        state = self.jobs[job]
        state["status"] = "RUNNING"
        with tempfile.TemporaryDirectory() as tmp:
            request, result = Path(tmp) / "request", Path(tmp) / "result"
            request.write_bytes(state["blob"])
            proc = subprocess.run([sys.executable, str(_SERVER_SCRIPT), str(self.model_dir),
                                   str(request), str(result), ",".join(NOT_ON_SERVER)],
                                  capture_output=True, text=True, cwd=tmp)
            if proc.returncode:
                state.update(status="ERROR", description=proc.stderr[-2000:])
                return
            data = result.read_bytes()
        if state["compress"]:
            data = zstandard.ZstdCompressor().compress(data)
        state.update(status="COMPLETED", result=data)


class _Handler(BaseHTTPRequestHandler):
    ndif: FakeNDIF

    def log_message(self, *args):  # quiet
        pass

    def _json(self, body: dict):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.ndif.api_keys.append(self.headers.get("ndif-api-key"))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                 for p in message.iter_parts()}
        job = self.ndif.submit(json.loads(parts["data"]), parts["blob"])
        self._json({"id": job, "status": "RECEIVED"})

    def do_GET(self):
        self.ndif.api_keys.append(self.headers.get("ndif-api-key"))
        kind, job = self.path.strip("/").split("/", 1)
        state = self.ndif.jobs.get(job)
        if state is None:
            self.send_error(404)
        elif kind == "result":
            self.send_response(200)
            self.send_header("Content-Length", str(len(state["result"])))
            self.end_headers()
            self.wfile.write(state["result"])
        else:
            body = {"id": job, "status": state["status"],
                    "description": state.get("description", "")}
            if state["status"] == "COMPLETED":
                body["data"] = f"{self.ndif.url}/result/{job}"
            self._json(body)
