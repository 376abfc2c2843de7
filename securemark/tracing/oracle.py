"""Suspects reached through their outputs only: one Oracle interface, two adapters.

* :class:`HttpV2Oracle`: a model served with the Open Inference Protocol (KServe / Triton / MLServer "V2",
  JSON over HTTP). ``url`` is the model's base, ``http://host:port/v2/models/NAME``; inputs are POSTed to
  ``url/infer`` and the first output, ``[B, classes]``, is read.
* :class:`TorchScriptOracle`: a ``torch.jit.save`` file, run as a black box (its outputs, nothing else).

Both count every input they send against a query budget and refuse to go past it. Outputs are returned as
they came; :func:`as_log_scores` turns probabilities or logits into per-input log-scores.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

OUTPUT_KINDS = ("auto", "probs", "logits")
_TINY = 1e-45  # the smallest float32 subnormal: a probability reported as 0 is read as this


class OracleError(RuntimeError):
    """The suspect could not be queried, or answered something that is not a prediction."""


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

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise OracleError(f"query budget exhausted: {self.used} used, {n} more asked, limit {self.limit}")
        self.used += n


def as_log_scores(out: np.ndarray, kind: str = "auto") -> tuple[np.ndarray, str]:
    """(log-probabilities or logits, the kind read). ``auto`` reads rows that are non-negative and sum to 1
    as probabilities, anything else as logits."""
    out = np.asarray(out, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] < 2:
        raise OracleError(f"expected outputs of shape [batch, classes], got {list(out.shape)}")
    if not np.all(np.isfinite(out)):
        raise OracleError("the suspect answered NaN or inf: no verdict can be built on it")
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"outputs must be one of {OUTPUT_KINDS}, got {kind!r}")
    looks_like_probs = bool(np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))
    if kind == "auto":
        kind = "probs" if looks_like_probs else "logits"
    if kind == "probs":
        if np.any(out < 0) or np.any(out > 1 + 1e-6):
            raise OracleError("outputs read as probabilities hold values outside [0, 1]; try --outputs logits")
        return np.log(np.maximum(out, _TINY)), kind
    return out, kind


class TorchScriptOracle:
    """A TorchScript file as a black box: loaded on CPU, called in batches without gradients."""

    def __init__(self, path: str | Path, budget: int, batch: int = 512) -> None:
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, still the format asked for
                warnings.simplefilter("ignore", DeprecationWarning)
                self._model = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError, OSError) as exc:
            raise OracleError(f"{path} is not a loadable TorchScript file: {str(exc).splitlines()[0]}") from None
        self._model.eval()
        self._budget, self.batch = Budget(budget), batch

    @property
    def used(self) -> int:
        return self._budget.used

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._budget.take(len(x))
        outs = []
        for i in range(0, len(x), self.batch):
            out = self._model(torch.from_numpy(np.ascontiguousarray(x[i : i + self.batch], dtype=np.float32)))
            if not isinstance(out, torch.Tensor):
                raise OracleError(f"the TorchScript model returned {type(out).__name__}, not a tensor")
            outs.append(out.detach().double().numpy())
        return np.concatenate(outs)


class HttpV2Oracle:
    """Open Inference Protocol (V2) JSON client: batches, retries with backoff on connection errors and
    5xx / 429 answers, a timeout per request, and a query budget."""

    def __init__(
        self, url: str, budget: int, batch: int = 256, timeout: float = 30.0, retries: int = 3,
        input_name: str | None = None,
    ) -> None:  # fmt: skip
        if not url.startswith(("http://", "https://")):
            raise OracleError(f"--endpoint must be an http(s) URL like http://host:port/v2/models/NAME, got {url!r}")
        self.url = url.rstrip("/")
        self._budget, self.batch, self.timeout, self.retries = Budget(budget), batch, timeout, retries
        self.input_name = input_name or self._input_name()

    @property
    def used(self) -> int:
        return self._budget.used

    def _request(self, url: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.2 * 2**attempt, 5.0))
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:200].decode(errors="replace")
                if exc.code == 429 or exc.code >= 500:
                    last = OracleError(f"{url} answered HTTP {exc.code}: {detail}")
                    continue
                raise OracleError(f"{url} answered HTTP {exc.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = OracleError(f"{url} unreachable: {getattr(exc, 'reason', exc)}")
        else:
            raise OracleError(f"{last} (after {self.retries + 1} attempts)")
        try:
            answer = json.loads(raw)
        except ValueError:
            why = f"{url} did not answer JSON: {raw[:80]!r}; is it an Open Inference (V2) endpoint?"
            raise OracleError(why) from None
        if not isinstance(answer, dict):
            raise OracleError(f"{url} answered {type(answer).__name__}, not a V2 JSON object")
        return answer

    def _input_name(self) -> str:
        """The model's first input name from its V2 metadata (GET url); "input" when it gives none."""
        meta = self._request(self.url, None)
        inputs = meta.get("inputs")
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict) and "name" in inputs[0]:
            return str(inputs[0]["name"])
        return "input"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._budget.take(len(x))
        return np.concatenate([self._infer(x[i : i + self.batch]) for i in range(0, len(x), self.batch)])

    def _infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        body = {"inputs": [{"name": self.input_name, "shape": list(x.shape), "datatype": "FP32",
                            "data": x.reshape(-1).tolist()}]}  # fmt: skip
        answer = self._request(self.url + "/infer", body)
        outputs = answer.get("outputs")
        if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
            raise OracleError(f"{self.url}/infer answered without an 'outputs' list: not the V2 protocol")
        first = outputs[0]
        try:
            shape = [int(d) for d in first["shape"]]
            data = np.asarray(first["data"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise OracleError(f"{self.url}/infer: output 0 has no readable shape/data ({exc})") from None
        if len(shape) != 2 or shape[0] != len(x) or data.size != shape[0] * shape[1]:
            raise OracleError(
                f"{self.url}/infer: output 0 has shape {shape} and {data.size} values for a batch of {len(x)}; "
                "expected [batch, classes]"
            )
        return data.reshape(shape)
