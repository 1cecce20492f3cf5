"""cellseg serve: the bytes reader, request decoding, and a real Triton server (pytriton) started
as a subprocess on free ports: health, results equal to `cellseg infer`, bad requests answered
with errors while the server stays up, and a clean SIGTERM shutdown."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from cellseg.cli import app
from cellseg.data.images import read_image, read_image_bytes
from cellseg.errors import DataError, InputError
from cellseg.serve import Row, decode_rows, image_limit, results_tensor
from cellseg.serve_client import ServerProcess, error_line, image_inputs, results_of

runner = CliRunner()


# ------------------------------------------------------------------------------ bytes reader
def _image_files(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    paths = {"rgb.png": rgb, "gray.png": rgb[:, :, 0], "rgba.png": np.dstack([rgb, rgb[:, :, :1]])}
    for name, array in paths.items():
        Image.fromarray(array).save(folder / name)
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    tifffile.imwrite(folder / "u16.tif", rng.integers(0, 4000, (40, 56), dtype=np.uint16))
    black_bottom = rgb.copy()
    black_bottom[-8:] = 0  # an uncompressed TIFF whose bytes end in NULs
    tifffile.imwrite(folder / "nul_tail.tif", black_bottom)
    tifffile.imwrite(folder / "float.tif", rng.random((40, 56, 3), dtype=np.float32), photometric="rgb")
    return sorted(folder.iterdir())


def test_bytes_reader_decodes_like_the_file_reader(tmp_path):
    paths = _image_files(tmp_path)
    assert (tmp_path / "nul_tail.tif").read_bytes().endswith(b"\x00")
    for path in paths:
        np.testing.assert_array_equal(read_image_bytes(path.read_bytes(), path.name), read_image(path), err_msg=path.name)


@pytest.mark.parametrize("data, problem", [(b"", "empty image"), (b"not an image", "not a recognised image format"),
                                           (b"II*\x00\x08\x00", "cannot read image")])
def test_bytes_reader_refuses_bad_bytes_in_one_line(data, problem):
    with pytest.raises(DataError, match=problem) as info:
        read_image_bytes(data, "upload")
    assert str(info.value).startswith("upload: ") and "\n" not in str(info.value)


def test_bytes_reader_refuses_images_beyond_the_limit_from_the_header(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    with pytest.raises(DataError, match="300 = 60,000 pixels, more than the 50,000 allowed"):
        read_image_bytes(buf.getvalue(), "big", max_pixels=50_000)
    assert read_image_bytes(buf.getvalue(), "big", max_pixels=60_000).shape == (200, 300, 3)


# --------------------------------------------------------------------------- request decoding
class FakeRequest(dict):
    """What pytriton hands the model: input name -> [rows, 1] array."""


def _png(side: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_rows_reads_ids_and_thresholds_per_row():
    request = FakeRequest(image=np.array([[_png()], [_png(16)]], dtype=object),
                          image_id=np.array([[7], [9]], np.int64), score_thresh=np.array([[0.5], [0.25]], np.float32))
    rows = decode_rows(request, max_pixels=10_000)
    assert [(r.image.shape, r.image_id, r.score_thresh) for r in rows] == [((32, 32, 3), 7, 0.5), ((16, 16, 3), 9, 0.25)]
    plain = decode_rows(FakeRequest(image=np.array([[_png()]], dtype=object)), max_pixels=10_000)
    assert (plain[0].image_id, plain[0].score_thresh) == (0, None)


def test_decode_rows_names_the_bad_row():
    request = FakeRequest(image=np.array([[_png()], [b"junk"]], dtype=object))
    with pytest.raises(DataError, match="request 3 row 1 image: not a recognised image format"):
        decode_rows(request, max_pixels=10_000, request_index=3)
    with pytest.raises(InputError, match="score_thresh nan"):
        decode_rows(FakeRequest(image=np.array([[_png()]], dtype=object), score_thresh=np.array([[np.nan]], np.float32)), 10_000)
    with pytest.raises(DataError, match="more than the 100 allowed"):
        decode_rows(FakeRequest(image=np.array([[_png()]], dtype=object)), max_pixels=100)


def test_results_tensor_is_json_per_row():
    out = results_tensor([[{"image_id": 1, "score": 0.5}], []])
    assert out.shape == (2, 1) and out.dtype == object
    assert [json.loads(r[0]) for r in out] == [[{"image_id": 1, "score": 0.5}], []]
    assert Row(np.zeros((1, 1, 3)), 0, None).score_thresh is None


def test_image_limit_is_one_tile_by_default(tiny_model_spec):
    from cellseg.tiling import tile_settings

    tile, _ = tile_settings(tiny_model_spec, None, None)
    assert image_limit(tiny_model_spec, None) == tile * tile
    assert image_limit(tiny_model_spec, 1000) == 1000
    with pytest.raises(InputError, match="at most one tile"):
        image_limit(tiny_model_spec, tile * tile + 1)
    with pytest.raises(InputError, match="must be >= 1"):
        image_limit(tiny_model_spec, 0)


def test_serve_refuses_bad_options_before_starting(tiny_export):
    res = runner.invoke(app, ["serve", str(tiny_export), "--http-port", "9000", "--grpc-port", "9000"])
    assert res.exit_code == 2 and "distinct ports" in res.output
    res = runner.invoke(app, ["serve", str(tiny_export), "--instances", "0", "--http-port", "9100"])
    assert res.exit_code == 2 and "--instances 0" in res.output


# ------------------------------------------------------------------------------- real server
try:
    import pytriton  # noqa: F401
    import tritonclient.http as http
except ImportError:  # the serve extra is not installed: the server tests skip
    http = None
needs_server = pytest.mark.skipif(http is None, reason="needs the serve extra (nvidia-pytriton, tritonclient)")
MAX_PX = 128 * 128


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from cellseg.data.synth import synthesize

    root = synthesize(tmp_path_factory.mktemp("serve_data") / "synth", n_train=0, n_test=3, seed=3, size=96)
    return sorted((Path(root) / "test_release").glob("*.tif"))


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    proc = ServerProcess(tiny_export, backend="onnxruntime", extra_args=["--max-image-px", str(MAX_PX)],
                         ready_timeout_s=240, log=log)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return http.InferenceServerClient(server.url, network_timeout=300.0)


def _infer_cli(model: Path, inputs: list[Path], out: Path, *extra: str) -> dict[int, list[dict]]:
    res = runner.invoke(app, ["infer", str(model), *map(str, inputs), "--out", str(out), "--backend", "onnxruntime",
                              "--quiet", *extra])
    assert res.exit_code == 0, res.output
    by_image: dict[int, list[dict]] = {}
    for entry in json.loads(out.read_text()):
        by_image.setdefault(entry["image_id"], []).append(entry)
    return by_image


@needs_server
def test_health_and_model_config(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cellseg")
    config = client.get_model_config("cellseg")
    assert config["max_batch_size"] >= 2 and "dynamic_batching" in config
    assert {i["name"]: i["data_type"] for i in config["input"]} == {"image": "TYPE_STRING", "score_thresh": "TYPE_FP32",
                                                                   "image_id": "TYPE_INT64"}


@needs_server
def test_results_equal_cellseg_infer(client, tiny_export, images, tmp_path):
    expected = _infer_cli(tiny_export, images, tmp_path / "r.json")
    assert sum(len(v) for v in expected.values()) > 0  # the comparison must compare something
    for image_id, path in enumerate(images, start=1):  # infer numbers inputs 1..N in sorted order
        got = results_of(client.infer("cellseg", image_inputs(http, path.read_bytes(), image_id=image_id)))[0]
        assert got == expected.get(image_id, []), path.name


@needs_server
def test_score_thresh_equals_infer_score_thresh(client, tiny_export, images, tmp_path):
    thresh = 0.3
    expected = _infer_cli(tiny_export, images[:1], tmp_path / "r.json", "--score-thresh", str(thresh))
    got = results_of(client.infer("cellseg", image_inputs(http, images[0].read_bytes(), 1, thresh)))[0]
    assert got == expected.get(1, [])
    assert all(e["score"] >= thresh for e in got)


@needs_server
def test_image_id_defaults_to_zero_and_rows_batch(client, images):
    first, second = (p.read_bytes() for p in images[:2])
    batch = http.InferInput("image", [2, 1], "BYTES")
    batch.set_data_from_numpy(np.array([[first], [second]], dtype=object))
    rows = results_of(client.infer("cellseg", [batch]))
    singles = [results_of(client.infer("cellseg", image_inputs(http, d)))[0] for d in (first, second)]
    assert rows == singles
    assert all(e["image_id"] == 0 for row in rows for e in row)


def _assert_still_serving(client, images) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cellseg")
    results_of(client.infer("cellseg", image_inputs(http, images[0].read_bytes(), 1)))


@needs_server
@pytest.mark.parametrize("data, message", [(b"\x89PNG\r\n\x1a\n truncated", "request 0 row 0 image: "),
                                           (b"", "empty image"),
                                           (_png(200), "more than the 16,384 allowed")])
def test_bad_image_gets_an_error_and_the_server_keeps_answering(client, images, data, message):
    with pytest.raises(Exception) as info:
        client.infer("cellseg", image_inputs(http, data))
    assert message in error_line(info.value)
    _assert_still_serving(client, images)


@needs_server
def test_wrong_dtype_and_shape_are_refused_by_triton(client, images):
    wrong = http.InferInput("image", [1, 1], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 1), np.float32))
    with pytest.raises(Exception, match="expects 'BYTES'"):
        client.infer("cellseg", [wrong])
    _assert_still_serving(client, images)


@needs_server
def test_sigterm_stops_the_server_cleanly(server):
    assert server.stop(timeout_s=90) == 0
    assert b"server stopped" in server.log.read_bytes()
