"""Suspects reached through their outputs only: one Oracle interface, two adapters.

* :class:`HttpV2Oracle`: a model served with the Open Inference Protocol (KServe / Triton / MLServer "V2",
  JSON over HTTP). ``url`` is the model's base, ``http://host:port/v2/models/NAME``; inputs are POSTed to
  ``url/infer`` and the first output, ``[B, classes]``, is read.
* :class:`TorchScriptOracle`: a ``torch.jit.save`` file, run as a black box (its outputs, nothing else), in
  a child process with a time limit when the file is a suspect's.

Both count every input they send against a query budget and refuse to go past it. Outputs are returned as
they came; tracing.gauges reads them (:func:`gauges` lists the ways they can be read as per-input log-scores,
:func:`remapped` each of them bent back to a base's logits by rank), and its names are importable here too.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import math
import multiprocessing
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NoReturn, Protocol

import numpy as np
import torch

from securemark.tracing.errors import OracleError
from securemark.tracing.gauges import Gauge, gauges, remapped

# the readings of the answers (tracing.gauges) stay importable from here, where the black-box tracer takes them
__all__ = ["Budget", "Gauge", "HttpV2Oracle", "Oracle", "OracleError", "TorchScriptOracle", "gauges", "remapped"]

MAX_RESPONSE = 256 << 20  # bytes of one HTTP answer


class Oracle(Protocol):
    @property
    def used(self) -> int:
        """Inputs sent so far."""
        ...

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Outputs (B, classes) for inputs ``x`` (B, C, H, W) float32."""
        ...


@dataclass
class Budget:
    """The query budget shared by an oracle's calls."""

    limit: int
    used: int = 0

    def check(self, n: int) -> None:
        if self.used + n > self.limit:
            raise OracleError(f"query budget exhausted: {self.used} used, {n} more asked, limit {self.limit}")

    def take(self, n: int) -> None:
        self.check(n)
        self.used += n


class TorchScriptOracle:
    """A TorchScript file as a black box: loaded on CPU, called in batches without gradients.

    With ``timeout`` (seconds a batch may take) the file runs in a child process of its own, so that a hostile
    or broken one cannot hold or kill the tracer: one that loops forever is stopped at the limit, one that
    crashes its interpreter is reported, and either way the tracer says so in one line. Without it (the
    owner's own models, in the benches) it runs in this process."""

    def __init__(self, path: str | Path, budget: int, batch: int = 512, timeout: float | None = None) -> None:
        if timeout is not None and not 0 < timeout < math.inf:
            raise OracleError(f"need a finite timeout > 0, got {timeout}")
        self._budget, self.batch = Budget(budget), batch
        self._child: _Child | None = None
        if timeout is None:
            self._model = _load_script(path)
        else:
            self._child = _Child(path, timeout)

    @property
    def used(self) -> int:
        return self._budget.used

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._budget.take(len(x))
        run = self._child.run if self._child is not None else functools.partial(_run_script, self._model)
        batches = (np.ascontiguousarray(x[i : i + self.batch], dtype=np.float32) for i in range(0, len(x), self.batch))
        outs = [run(b) for b in batches]
        if len({o.shape[1] for o in outs}) != 1:
            raise OracleError("the TorchScript model answered different numbers of classes for different batches")
        return np.concatenate(outs)

    def close(self) -> None:
        """Stops the child process, if any (also on leaving a ``with`` block, or when garbage-collected)."""
        if self._child is not None:
            self._child.stop()

    def __enter__(self) -> TorchScriptOracle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _load_script(path: str | Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, still the format asked for
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise OracleError(f"{path} is not a loadable TorchScript file: {str(exc).splitlines()[0]}") from None
    return model.eval()


@torch.no_grad()
def _run_script(model: torch.jit.ScriptModule, batch: np.ndarray) -> np.ndarray:
    x = torch.tensor(batch, dtype=torch.float32)  # a copy: the suspect may write to it
    try:
        out = model(x)
    except Exception as exc:  # the suspect's own code failed (torch.jit.Error is no RuntimeError)
        raise OracleError(f"the TorchScript model failed on the queries: {_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.is_complex() or out.dim() != 2 or len(out) != len(x):
        raise OracleError(f"the TorchScript model returned {_describe(out)}, not [batch, classes] reals")
    return out.detach().double().numpy()


def _serve_script(conn: Connection, path: str) -> None:
    """The child's loop: load ``path``, then answer each batch received with ("ok", outputs) or ("error",
    message), until None arrives or the parent goes away."""
    try:
        model = _load_script(path)
        conn.send(("ok", None))
        while (batch := conn.recv()) is not None:
            try:
                conn.send(("ok", _run_script(model, batch)))
            except OracleError as exc:
                conn.send(("error", str(exc)))
    except OracleError as exc:
        conn.send(("error", str(exc)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass


class _Child:
    """A spawned process running one TorchScript file, with a limit on every answer (loading: 60 s more).
    Once stopped (closed, or after an error) it refuses further batches, saying why."""

    def __init__(self, path: str | Path, timeout: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_script, args=(child, str(path)), daemon=True)
        self._proc.start()
        child.close()
        self.timeout = timeout
        self.stopped: str | None = None  # why, once stopped
        self._answer(timeout + 60.0, "load")

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.stopped is not None:
            raise OracleError(f"this TorchScript oracle is stopped ({self.stopped}): no more queries")
        try:
            self._conn.send(batch)
        except (BrokenPipeError, OSError):
            self._dead("run")
        out = self._answer(self.timeout, "answer a batch of queries")
        assert isinstance(out, np.ndarray)
        return out

    def _answer(self, limit: float, what: str) -> np.ndarray | None:
        if not self._conn.poll(limit):
            self.stop(f"no answer within {limit:g} s")
            raise OracleError(f"the TorchScript model did not {what} within {limit:g} s; stopped (--timeout)")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self._dead(what)
        if status == "error":
            self.stop("the model failed")
            raise OracleError(value)
        return value

    def _dead(self, what: str) -> NoReturn:
        self._proc.join(5)
        code = self._proc.exitcode
        self.stop(f"its process ended with exit code {code}")
        hint = ""
        if what == "load" and code == 1:  # the usual cause: the caller's script re-ran itself in the child
            hint = "; a script that makes this oracle needs an `if __name__ == '__main__':` guard (spawn)"
        raise OracleError(f"the process running the TorchScript model ended (exit code {code}) on {what}{hint}")

    def stop(self, why: str = "closed") -> None:
        if self.stopped is not None:
            return
        self.stopped = why
        if self._proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(None)
            self._proc.join(1)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
        self._proc.close()


def _shown(url: str) -> str:
    """``url`` as messages show it: without its query string (a token) or fragment."""
    return urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()


def _fetch(url: str, data: bytes | None, limit: float) -> tuple[int, bytes, str | None]:
    """(HTTP status, body, None), or (0, b"", why) when ``url`` could not be reached or did not answer in full
    within ``limit`` seconds. The exchange runs in a daemon thread that the caller stops waiting for at the
    limit (a socket time-out bounds each wait, not a slow drip of bytes); the thread reads in chunks and
    gives up at the limit too, so an abandoned one ends within one more socket wait."""
    answer: list[tuple[int, bytes]] = []
    failure: list[str] = []
    deadline = time.monotonic() + limit

    def exchange() -> None:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
            with urllib.request.urlopen(req, timeout=limit) as resp:
                chunks, size = [], 0
                while size <= MAX_RESPONSE and time.monotonic() < deadline and (chunk := resp.read1(1 << 16)):
                    chunks.append(chunk)
                    size += len(chunk)
                answer.append((int(resp.status), b"".join(chunks)))
        except urllib.error.HTTPError as exc:
            answer.append((int(exc.code), exc.read(200)))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            failure.append(repr(getattr(exc, "reason", exc)))

    worker = threading.Thread(target=exchange, daemon=True, name="securemark-http-oracle")
    worker.start()
    worker.join(limit)
    if worker.is_alive() or time.monotonic() > deadline:
        return 0, b"", f"no complete answer within {limit:g} s"
    if failure or not answer:  # not answer: the exchange died of something unforeseen
        return 0, b"", failure[0] if failure else "the request failed"
    return answer[0][0], answer[0][1], None


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return repr(lines[-1][:200]) if lines else type(exc).__name__


def _describe(out: object) -> str:
    if isinstance(out, torch.Tensor):
        return f"a {out.dtype} tensor of shape {list(out.shape)}"
    return type(out).__name__


class HttpV2Oracle:
    """Open Inference Protocol (V2) JSON client: batches, retries with backoff on connection errors, time-outs
    and 5xx / 429 answers, a wall-clock limit per request (``timeout`` seconds for all of it: connecting,
    headers, body; a server that drips its answer byte by byte cannot hold the tracer), and a query budget.
    A query string in ``url`` (a token) is sent with every request and never shown in a message."""

    def __init__(
        self, url: str, budget: int, batch: int = 256, timeout: float = 30.0, retries: int = 3,
        input_name: str | None = None,
    ) -> None:  # fmt: skip
        if not (retries >= 0 and 0 < timeout < math.inf):
            raise OracleError(f"need retries >= 0 and a finite timeout > 0, got {retries}, {timeout}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise OracleError(f"--endpoint must be an http(s) URL like http://host:port/v2/models/NAME, got "
                              f"{_shown(url)!r}")  # fmt: skip
        if "@" in parts.netloc:  # urllib would not send them, and errors would echo them
            raise OracleError("--endpoint must not carry credentials (user:password@host)")
        self._parts = parts._replace(path=parts.path.rstrip("/"), fragment="")
        self.url = _shown(self._parts.geturl())
        self._budget, self.batch, self.timeout, self.retries = Budget(budget), batch, timeout, retries
        self.input_name = input_name or self._input_name()

    @property
    def used(self) -> int:
        return self._budget.used

    def _scrub(self, text: str) -> str:
        """``text`` (an error, a server's echo) with the URL's query string (a token) masked, in any spelling."""
        q = self._parts.query
        spellings = {q, urllib.parse.quote(q, safe="=&"), urllib.parse.unquote(q)} - {""}
        for spelling in sorted(spellings, key=len, reverse=True):  # the longest first: one may hold another
            text = text.replace(spelling, "...")
        return text

    def _address(self, suffix: str = "") -> str:
        return self._parts._replace(path=self._parts.path + suffix).geturl()

    def _request(self, suffix: str, body: dict | None, inputs: int = 0) -> dict:
        """GET (``body`` None) or POST ``body`` carrying ``inputs`` query inputs to the model's URL + ``suffix``;
        every send of them, retries included, is counted against the budget (the suspect sees each one)."""
        shown = self.url + suffix
        data = None if body is None else json.dumps(body).encode()
        last: OracleError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.2 * 2**attempt, 5.0))
            self._budget.take(inputs)
            code, raw, why = _fetch(self._address(suffix), data, self.timeout)
            if why is not None:
                last = OracleError(f"{shown} unreachable or broken: {self._scrub(why)}")
                continue
            if code != 200:
                detail = self._scrub(raw[:200].decode(errors="replace"))
                last = OracleError(f"{shown} answered HTTP {code}: {detail!r}")
                if code == 429 or code >= 500:
                    continue
                raise last
            if len(raw) > MAX_RESPONSE:
                raise OracleError(f"{shown} answered more than {MAX_RESPONSE >> 20} MiB; refusing to read it")
            break
        else:
            raise OracleError(f"{last} (after {self.retries + 1} attempts)")
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            why = f"{shown} did not answer JSON: {self._scrub(repr(raw[:80]))}; is it an Open Inference (V2) endpoint?"
            raise OracleError(why) from None
        if not isinstance(answer, dict):
            raise OracleError(f"{shown} answered {type(answer).__name__}, not a V2 JSON object")
        return answer

    def _input_name(self) -> str:
        """The model's first input name from its V2 metadata (GET url); "input" when it gives none."""
        meta = self._request("", None)
        inputs = meta.get("inputs")
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict) and "name" in inputs[0]:
            return str(inputs[0]["name"])
        return "input"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._budget.check(len(x))  # the whole call first; every send (retries too) is taken as it goes
        outs = [self._infer(x[i : i + self.batch]) for i in range(0, len(x), self.batch)]
        if len({o.shape[1] for o in outs}) != 1:
            raise OracleError(f"{self.url} answered different numbers of classes for different batches")
        return np.concatenate(outs)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        body = {"inputs": [{"name": self.input_name, "shape": list(x.shape), "datatype": "FP32",
                            "data": x.reshape(-1).tolist()}]}  # fmt: skip
        answer = self._request("/infer", body, inputs=len(x))
        outputs = answer.get("outputs")
        if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
            raise OracleError(f"{self.url}/infer answered without an 'outputs' list: not the V2 protocol")
        first = outputs[0]
        try:
            shape = [int(d) for d in first["shape"]]
            raw = first["data"]
            if not isinstance(raw, list) or any(isinstance(v, bool | str) for v in raw[:1]):
                raise TypeError("data is not a flat list of numbers")
            data = np.asarray(raw, dtype=np.float64)
        except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise OracleError(f"{self.url}/infer: output 0 has no readable shape/data ({exc})") from None
        if len(shape) != 2 or shape[0] != len(x) or data.size != shape[0] * shape[1]:
            raise OracleError(
                f"{self.url}/infer: output 0 has shape {shape} and {data.size} values for a batch of {len(x)}; "
                "expected [batch, classes]"
            )
        return data.reshape(shape)
