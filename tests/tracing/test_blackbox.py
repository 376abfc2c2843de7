import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from securemark import data, models, training
from securemark.attacks.distill import distill, ensemble, labels_of
from securemark.cli import main
from securemark.owner import FunctionSpec, issue_copies
from securemark.registry import Registry, RegistryError, RegistryParams
from securemark.tracing.blackbox import BlackBoxTracer, load_query_data, query_inputs
from securemark.tracing.oracle import HttpV2Oracle, OracleError, TorchScriptOracle, as_log_scores
from securemark.tracing.serve import start

SHAPE = (1, 8, 8)
RECORD = {"name": "synthetic", "seed": 0, "test_fraction": 0.3, "files": ""}


def module(sd):
    return models.load_weights(models.build("cnn", SHAPE, 10), sd).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry of 300 customers whose first 5 copies carry both marks, and the base model."""
    pool, held = data.load("synthetic", 0).split(0.3, 0)
    model = models.build("cnn", SHAPE, 10, seed=0)
    training.train(model, pool, epochs=3, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    directory = tmp_path_factory.mktemp("bb") / "registry"
    reg = Registry.init(directory, RegistryParams(code="tardos", length=512, max_colluders=3, eps=1e-3))
    spec = FunctionSpec(models.spec_of("cnn", SHAPE, 10), held.x, RECORD, budget=0.05, skip=4)
    copies = issue_copies(reg, base, [f"c{i:03d}" for i in range(5)], function=spec)
    for i in range(5, 300):
        reg.customer(f"c{i:03d}")
    reg.close()
    return directory, base, copies, pool


def test_intact_copy_through_http_names_its_customer_alone(world):
    directory, _, copies, _ = world
    server, url = start("leak", module(copies["c003"]), SHAPE)
    try:
        oracle = HttpV2Oracle(url, budget=500, batch=128)
        assert oracle.input_name == "input"
        with Registry.open(directory) as reg:
            report = BlackBoxTracer(reg).trace(oracle, queries=500)
    finally:
        server.shutdown()
    assert [s.customer for s in report.accused] == ["c003"]
    assert report.alignment["queries"] == 500 == oracle.used and report.alignment["outputs"] == "probs"
    assert report.false_accusation_bound is not None and report.false_accusation_bound <= 1e-3


def test_torchscript_oracle_logits_and_unmarked_models(world, tmp_path):
    directory, base, copies, _ = world
    path = tmp_path / "leak.pt"
    torch.jit.save(torch.jit.script(module(copies["c001"])), str(path))
    with Registry.open(directory) as reg:
        tracer = BlackBoxTracer(reg)
        report = tracer.trace(TorchScriptOracle(path, 400), 400)
        assert [s.customer for s in report.accused] == ["c001"] and report.alignment["outputs"] == "logits"
        torch.jit.save(torch.jit.script(module(base)), str(path))  # the unmarked base: nobody
        assert tracer.trace(TorchScriptOracle(path, 400), 400).accused == []
        with pytest.raises(OracleError, match="budget exhausted"):
            tracer.trace(TorchScriptOracle(path, 100), 400)


def test_cli_black_box_trace_and_its_refusals(world, tmp_path, capsys):
    directory, _, copies, _ = world
    path = tmp_path / "leak.pt"
    torch.jit.save(torch.jit.script(module(copies["c002"])), str(path))
    code = main(["trace", str(directory), "--query-model", str(path), "--queries", "600", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["accused"] == ["c002"] and out["alignment"]["queries"] == 600
    held = data.load("synthetic", 0).split(0.3, 0)[1].x.numpy()
    np.savez(tmp_path / "q.npz", x=held[:300])
    code = main(["trace", str(directory), "--query-model", str(path), "--query-data", str(tmp_path / "q.npz"),
                 "--queries", "300", "--json"])  # fmt: skip
    assert code == 0 and json.loads(capsys.readouterr().out)["accused"] == ["c002"]
    assert main(["trace", str(directory)]) == 2 and "exactly one suspect" in capsys.readouterr().err
    assert main(["trace", str(directory), "--query-model", str(tmp_path / "q.npz")]) == 2
    assert "not a loadable TorchScript" in capsys.readouterr().err


def test_a_registry_without_function_mark_is_refused(tmp_path):
    reg = Registry.init(tmp_path / "r", RegistryParams(code="tardos", length=64, max_colluders=2))
    issue_copies(reg, module_state(), ["a"])
    with pytest.raises(RegistryError, match="carries a function mark"):
        BlackBoxTracer(reg)


def module_state():
    return {k: v.detach().clone() for k, v in models.build("cnn", SHAPE, 10, seed=1).state_dict().items()}


class _Answer(BaseHTTPRequestHandler):
    """A server that is not a V2 endpoint, or a flaky one: the behaviour is picked from the path."""

    fails = 0

    def log_message(self, *args):
        pass

    def _reply(self, code, body):
        raw = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self._reply(200, "<html>hello</html>" if "html" in self.path else "{}")

    def do_POST(self):
        if "flaky" in self.path and _Answer.fails < 2:
            _Answer.fails += 1
            return self._reply(503, "busy")
        if "flaky" in self.path:
            n = int(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["inputs"][0]["shape"][0])
            return self._reply(200, json.dumps({"outputs": [{"shape": [n, 3], "data": [0.2, 0.3, 0.5] * n}]}))
        if "short" in self.path:
            return self._reply(200, json.dumps({"outputs": [{"shape": [1, 3], "data": [0.2, 0.3, 0.5]}]}))
        self._reply(200, json.dumps({"predictions": [1, 2]}))


@pytest.fixture
def odd_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_oracle_errors_and_retries(odd_server):
    x = np.zeros((4, *SHAPE), np.float32)
    with pytest.raises(OracleError, match="did not answer JSON"):
        HttpV2Oracle(odd_server + "/html", 10)
    with pytest.raises(OracleError, match="not the V2 protocol"):
        HttpV2Oracle(odd_server + "/v2/models/m", 10)(x)
    with pytest.raises(OracleError, match="expected \\[batch, classes\\]"):
        HttpV2Oracle(odd_server + "/short", 10)(x)
    flaky = HttpV2Oracle(odd_server + "/flaky", 10, retries=3)
    assert flaky(x).shape == (4, 3) and _Answer.fails == 2  # two 503s, then an answer
    with pytest.raises(OracleError, match="must be an http"):
        HttpV2Oracle("ftp://x", 10)
    with pytest.raises(OracleError, match="unreachable"):
        HttpV2Oracle("http://127.0.0.1:9/v2/models/m", 10, retries=0, timeout=2)


def test_output_reading_and_query_inputs(tmp_path):
    probs = np.array([[0.2, 0.8], [0.5, 0.5]])
    logs, kind = as_log_scores(probs)
    assert kind == "probs" and np.allclose(logs, np.log(probs))
    assert as_log_scores(np.array([[2.0, -1.0], [0.0, 3.0]]))[1] == "logits"
    with pytest.raises(OracleError, match="NaN"):
        as_log_scores(np.array([[np.nan, 1.0]]))
    with pytest.raises(OracleError, match="outside"):
        as_log_scores(np.array([[2.0, -1.0]]), "probs")
    x = np.arange(2 * 25, dtype=np.float32).reshape(2, 1, 5, 5)
    q = query_inputs(x, 5)
    assert q.shape == (5, 1, 5, 5) and np.array_equal(q[:2], x)
    assert np.array_equal(q[2:4], np.roll(x, (0, 1), axis=(2, 3)))  # then shifted by one pixel
    with pytest.raises(ValueError, match="shifted versions"):
        query_inputs(x, 51)
    np.savez(tmp_path / "two.npz", a=x, b=x)
    with pytest.raises(ValueError, match="name the query inputs 'x'"):
        load_query_data(tmp_path / "two.npz")


def test_distillation_attack_and_coalition_teacher(world):
    _, _, copies, pool = world
    a, b = module(copies["c000"]), module(copies["c001"])
    x = pool.x[:64]
    with torch.no_grad():
        mean = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        assert torch.allclose(ensemble([a, b])(x).exp(), mean, atol=1e-6)
    hard = labels_of(ensemble([a]), x, 1.0, hard=True)
    assert torch.equal(hard.argmax(1), a(x).argmax(1)) and torch.all(hard.sum(1) == 1)
    student = models.build("mlp", SHAPE, 10, seed=3)
    _, rec = distill(ensemble([a, b]), student, pool, temperature=2.0, epochs=3, rng=np.random.default_rng(0))
    assert rec["labels"] == "soft" and rec["examples"] == len(pool)
    with torch.no_grad():
        agree = (student(x).argmax(1) == mean.argmax(1)).float().mean()
    assert agree > 0.8  # the student learned its teachers' answers
    with pytest.raises(ValueError, match="temperature"):
        distill(ensemble([a]), student, pool, temperature=0.0, rng=np.random.default_rng(0))
