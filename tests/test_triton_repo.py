"""cellseg export-triton: the repository's layout and configs (parsed as Triton's ModelConfig), and
its Python BLS glue model run for real under pytriton's bundled tritonserver. That server has no
onnxruntime backend, so the three dense models are swapped for Python stand-ins running the same
ONNX files with onnxruntime (STANDIN below); loading the onnxruntime_onnx / tensorrt_plan models
themselves needs a GPU Triton container and is not tested here."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellseg.artifacts import GRAPH_NAMES
from cellseg.cli import app
from cellseg.export.triton_repo import dense_model_name, write_triton_repo
from cellseg.errors import InputError, OutputExistsError

runner = CliRunner()

STANDIN = '''
import json
from pathlib import Path
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]
        self.session = ort.InferenceSession(str(Path(__file__).with_name("model.onnx")),
                                            providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            ys = self.session.run(self.outputs, {self.input: x})
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, y) for n, y in zip(self.outputs, ys)]))
        return responses
'''


@pytest.fixture(scope="module")
def repo(tiny_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    res = runner.invoke(app, ["export-triton", str(tiny_export), str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_layout(repo):
    names = sorted(p.name for p in repo.iterdir())
    assert names == sorted(["cellseg", *(dense_model_name(g) for g in GRAPH_NAMES)])
    for g in GRAPH_NAMES:
        assert (repo / dense_model_name(g) / "1" / "model.onnx").is_file()
    assert (repo / "cellseg" / "1" / "model.py").is_file()
    described = json.loads((repo / "cellseg" / "1" / "cellseg_model.json").read_text())
    assert described["platform"] == "onnxruntime_onnx" and described["model"]["arch"]


def test_configs_parse_as_triton_model_configs(repo, tiny_export):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    configs = {p.parent.name: text_format.Parse(p.read_text(), model_config_pb2.ModelConfig())
               for p in repo.glob("*/config.pbtxt")}
    glue = configs["cellseg"]
    assert glue.backend == "python" and glue.max_batch_size == 8 and glue.HasField("dynamic_batching")
    assert [(i.name, i.optional) for i in glue.input] == [("image", False), ("score_thresh", True), ("image_id", True)]
    io = json.loads((tiny_export / "cellseg.json").read_text())["verification"]["io"]
    for g in GRAPH_NAMES:
        c = configs[dense_model_name(g)]
        assert c.platform == "onnxruntime_onnx" and c.max_batch_size == 0
        assert [i.name for i in c.input] == io[g]["inputs"] and [o.name for o in c.output] == io[g]["outputs"]
        assert all(-1 in list(t.dims) or g == "mask_head" for t in c.input)


def test_glue_model_file_imports_and_runs_the_predictor_protocol(repo):
    import importlib.util

    from cellseg.backends.base import Backend

    spec = importlib.util.spec_from_file_location("triton_glue_model", repo / "cellseg" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # outside Triton: triton_python_backend_utils is imported only when used
    backend = module.BlsBackend(json.loads((repo / "cellseg" / "1" / "cellseg_model.json").read_text())["graphs"])
    assert isinstance(backend, Backend) and hasattr(module, "TritonPythonModel")


def test_existing_repo_is_not_overwritten_and_bad_precision_refused(repo, tiny_export):
    with pytest.raises(OutputExistsError):
        write_triton_repo(tiny_export, repo)
    with pytest.raises(InputError, match="fp64"):
        write_triton_repo(tiny_export, repo.parent / "other", precision="fp64")
    assert not (repo.parent / "other").exists()


def test_fp16_repo_uses_fp16_graphs(tiny_export, tmp_path):
    from cellseg.artifacts import onnx_paths

    out = write_triton_repo(tiny_export, tmp_path / "r16", precision="fp16")
    for g, path in onnx_paths(tiny_export, "fp16").items():
        assert (out / dense_model_name(g) / "1" / "model.onnx").read_bytes() == path.read_bytes()
    assert json.loads((out / "cellseg" / "1" / "cellseg_model.json").read_text())["precision"] == "fp16"


# ---------------------------------------------------------------- the BLS glue under Triton
def _standin_repo(repo: Path, dest: Path) -> Path:
    """The repository with each dense model served by a Python stand-in on the same ONNX file."""
    shutil.copytree(repo, dest)
    for g in GRAPH_NAMES:
        model = dest / dense_model_name(g)
        config = model / "config.pbtxt"
        text = config.read_text().replace('platform: "onnxruntime_onnx"', 'backend: "python"')
        config.write_text(text.replace("KIND_GPU", "KIND_CPU"))
        (model / "1" / "model.py").write_text(STANDIN)
    return dest


@pytest.fixture(scope="module")
def bundled_server(repo, tmp_path_factory):
    pytest.importorskip("pytriton")
    http = pytest.importorskip("tritonclient.http")
    from cellseg.serve import start_bundled_tritonserver
    from cellseg.serve_client import free_ports

    work = tmp_path_factory.mktemp("bundled")
    ports = tuple(free_ports(3))
    proc = start_bundled_tritonserver(_standin_repo(repo, work / "repo"), work, ports, work / "server.log")
    client = http.InferenceServerClient(f"127.0.0.1:{ports[0]}", network_timeout=300.0)
    try:
        deadline = time.monotonic() + 240
        while not _ready(client):
            assert proc.poll() is None and time.monotonic() < deadline, (work / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait()


def _ready(client) -> bool:
    try:
        return client.is_model_ready("cellseg")
    except Exception:  # noqa: BLE001 - not listening yet
        return False


@pytest.mark.slow  # starting and stopping a second Triton takes over a minute on 2 cores
def test_bls_glue_model_matches_cellseg_infer(bundled_server, tiny_export, tmp_path):
    import tritonclient.http as http

    from cellseg.data.synth import synthesize
    from cellseg.serve_client import image_inputs, results_of

    root = synthesize(tmp_path / "d", n_train=0, n_test=2, seed=5, size=96)
    images = sorted((Path(root) / "test_release").glob("*.tif"))
    res = runner.invoke(app, ["infer", str(tiny_export), *map(str, images), "--out", str(tmp_path / "r.json"),
                              "--backend", "onnxruntime", "--quiet"])
    assert res.exit_code == 0, res.output
    expected = json.loads((tmp_path / "r.json").read_text())
    got = [e for i, p in enumerate(images, start=1)
           for e in results_of(bundled_server.infer("cellseg", image_inputs(http, p.read_bytes(), i)))[0]]
    assert len(expected) > 0 and len(got) == len(expected)
    for a, b in zip(got, expected):  # the stand-ins' onnxruntime sessions may round differently
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)
    with pytest.raises(Exception) as info:  # a bad request fails alone
        bundled_server.infer("cellseg", image_inputs(http, b"junk"))
    assert re.search("not a recognised image format", str(info.value))
    assert bundled_server.is_model_ready("cellseg")


def test_export_triton_option_refuses_existing_repo_before_exporting(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    res = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "exp"), "--triton", str(repo)])
    assert res.exit_code == 4, res.output
    assert "already exists" in res.output and not (tmp_path / "exp").exists()
