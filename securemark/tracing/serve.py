"""A minimal Open Inference Protocol (V2) JSON server for one model: what a pirate's prediction API looks
like to the tracer, for tests and benchmarks. Not a production server.

GET  /v2/models/NAME        metadata: name, inputs [{name, datatype, shape}], outputs
POST /v2/models/NAME/infer  {"inputs": [{"name", "shape": [B, C, H, W], "datatype": "FP32", "data"}]}
                            -> {"model_name", "outputs": [{"name", "shape": [B, K], "datatype": "FP32", "data"}]}
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

Predict = Callable[[torch.Tensor], torch.Tensor]  # inputs -> logits


def make_handler(name: str, predict: Predict, in_shape: tuple[int, ...], outputs: str) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()  # one forward pass at a time: torch modules are not re-entrant under threads

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet: the tracer prints what matters
            pass

        def _send(self, code: int, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path  # a query string (a token) is no part of the path
            if path.rstrip("/") != f"/v2/models/{name}":
                return self._send(404, {"error": f"unknown model path {path}"})
            self._send(200, {"name": name, "platform": "securemark",
                             "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *in_shape]}],
                             "outputs": [{"name": outputs, "datatype": "FP32", "shape": [-1, -1]}]})  # fmt: skip

        def do_POST(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path.rstrip("/") != f"/v2/models/{name}/infer":
                return self._send(404, {"error": f"unknown model path {path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                first = body["inputs"][0]
                x = np.asarray(first["data"], dtype=np.float32).reshape([int(d) for d in first["shape"]])
                if x.shape[1:] != in_shape:
                    raise ValueError(f"input shape {list(x.shape)} does not match [-1, *{list(in_shape)}]")
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                return self._send(400, {"error": f"bad V2 request: {exc}"})
            with lock, torch.no_grad():
                out = predict(torch.from_numpy(x))
                out = torch.softmax(out, dim=1) if outputs == "probs" else out
            arr = out.double().numpy()
            self._send(200, {"model_name": name, "outputs": [{"name": outputs, "datatype": "FP32",
                             "shape": list(arr.shape), "data": arr.reshape(-1).tolist()}]})  # fmt: skip

    return Handler


def start(
    name: str, predict: Predict, in_shape: tuple[int, ...], host: str = "127.0.0.1", port: int = 0,
    outputs: str = "probs",
) -> tuple[ThreadingHTTPServer, str]:  # fmt: skip
    """Serve ``predict`` in a daemon thread; returns (server, base URL). ``server.shutdown()`` stops it."""
    if outputs not in ("probs", "logits"):
        raise ValueError(f"outputs must be 'probs' or 'logits', got {outputs!r}")
    server = ThreadingHTTPServer((host, port), make_handler(name, predict, tuple(in_shape), outputs))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/v2/models/{name}"
