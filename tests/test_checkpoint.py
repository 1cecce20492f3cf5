"""cellseg.checkpoint: one self-describing file, atomic save, weights_only load, clear refusals."""
from __future__ import annotations

import collections
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg.checkpoint import load_checkpoint, make_metadata, save_checkpoint, weights_hash
from cellseg.config import ModelSpec
from cellseg.errors import CheckpointError
from cellseg.model import spec_from_data

torch.set_num_threads(1)


def small_spec() -> ModelSpec:
    return spec_from_data("maskrcnn_resnet18_fpn", ("class1", "class2"), (1, 2), np.array([8.0, 16.0]), 12)


def small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.zeros(4),
            "bn.num_batches_tracked": torch.tensor(7)}


def train_state() -> dict:
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5)
    param.grad = torch.full((3,), 0.5)
    opt.step()
    sched.step()
    return {"epoch": 3, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "best_ap": 0.25,
            "records": [{"epoch": 1, "losses": {"loss": 1.0}}], "rng": {"torch": torch.get_rng_state(),
                                                                        "python": [3, [1, 2, 3], None]}}


def write_raw(path: Path, payload) -> Path:
    torch.save(payload, path)
    return path


def test_round_trip_with_train_state(tmp_path):
    spec = small_spec()
    meta = make_metadata(spec, {"epochs": 3, "best_val": {"segm": {"AP": 0.25}}, "data": "/x", "seed": 0})
    path = save_checkpoint(tmp_path / "run" / "last.pt", small_state(), meta, train_state())
    ckpt = load_checkpoint(path)
    assert ckpt.spec == spec
    assert ckpt.metadata == meta
    assert set(ckpt.metadata["versions"]) == {"torch", "torchvision", "cellseg", "python"}
    assert ckpt.metadata["model"]["box_detections_per_img"] >= 1000
    assert weights_hash(ckpt.state_dict) == weights_hash(small_state())
    ts = ckpt.train_state
    assert ts["epoch"] == 3 and ts["optimizer"]["state"][0]["exp_avg"].shape == (3,)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    opt.load_state_dict(ts["optimizer"])  # loadable as-is
    assert float(opt.state_dict()["state"][0]["step"]) == 1.0
    # The file is readable by plain torch.load(weights_only=True): no pickled classes inside.
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "metadata", "train_state"}
    assert json.loads(json.dumps(raw["metadata"])) == raw["metadata"]


def test_without_train_state_and_spec_from_metadata_rebuilds_identically(tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", small_state(), make_metadata(small_spec()))
    ckpt = load_checkpoint(path)
    assert ckpt.train_state is None
    assert ModelSpec.from_dict(ckpt.metadata["model"]) == small_spec()


def test_weights_hash_is_order_independent_and_content_sensitive():
    state = small_state()
    reordered = collections.OrderedDict(reversed(list(state.items())))
    assert weights_hash(state) == weights_hash(reordered)
    changed = dict(state)
    changed["a.bias"] = torch.zeros(4).index_fill(0, torch.tensor([2]), 1e-7)
    assert weights_hash(changed) != weights_hash(state)
    assert weights_hash({"x": torch.zeros(2, dtype=torch.float32)}) != weights_hash({"x": torch.zeros(2, dtype=torch.float64)})
    assert len(weights_hash(state)) == 64


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_files_are_refused(tmp_path, damage):
    good = save_checkpoint(tmp_path / "good.pt", small_state(), make_metadata(small_spec()))
    bad = tmp_path / "bad.pt"
    data = good.read_bytes()
    bad.write_bytes({"garbage": b"\x00\x01 not a checkpoint" * 10, "truncated": data[: len(data) // 2],
                     "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="not a readable cellseg checkpoint") as err:
        load_checkpoint(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_bare_state_dict_has_no_metadata(tmp_path):
    path = write_raw(tmp_path / "bare.pth", small_state())
    with pytest.raises(CheckpointError, match="no metadata"):
        load_checkpoint(path)


def test_pickled_objects_are_refused_by_weights_only(tmp_path):
    path = write_raw(tmp_path / "evil.pt", {"state_dict": small_state(), "metadata": make_metadata(small_spec()),
                                            "train_state": {"fn": zipfile.ZipFile}})
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(path)


def test_unknown_top_level_entry(tmp_path):
    path = write_raw(tmp_path / "x.pt", {"state_dict": small_state(), "metadata": make_metadata(small_spec()),
                                         "extra": 1})
    with pytest.raises(CheckpointError, match="does not know.*extra"):
        load_checkpoint(path)


def _with_metadata(tmp_path: Path, meta) -> Path:
    return write_raw(tmp_path / "m.pt", {"state_dict": small_state(), "metadata": meta})


def test_unknown_model_field(tmp_path):
    meta = make_metadata(small_spec())
    meta["model"]["min_size"] = 800
    with pytest.raises(CheckpointError, match="fields this cellseg does not know.*min_size"):
        load_checkpoint(_with_metadata(tmp_path, meta))


def test_unknown_metadata_section(tmp_path):
    meta = make_metadata(small_spec())
    meta["secret_sauce"] = {}
    with pytest.raises(CheckpointError, match="sections this cellseg does not know"):
        load_checkpoint(_with_metadata(tmp_path, meta))


@pytest.mark.parametrize("where", ["top", "model"])
def test_wrong_schema_version(tmp_path, where):
    meta = make_metadata(small_spec())
    (meta if where == "top" else meta["model"])["schema_version"] = 99
    with pytest.raises(CheckpointError, match="schema_version 99"):
        load_checkpoint(_with_metadata(tmp_path, meta))


def test_missing_model_section_and_required_field(tmp_path):
    meta = make_metadata(small_spec())
    del meta["model"]
    with pytest.raises(CheckpointError, match="lacks the 'model' section"):
        load_checkpoint(_with_metadata(tmp_path, meta))
    meta = make_metadata(small_spec())
    del meta["model"]["class_names"]
    with pytest.raises(CheckpointError, match="lacks required fields"):
        load_checkpoint(_with_metadata(tmp_path, meta))


def test_unknown_arch_and_inconsistent_classes(tmp_path):
    meta = make_metadata(small_spec())
    meta["model"]["arch"] = "yolo"
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_checkpoint(_with_metadata(tmp_path, meta))
    meta = make_metadata(small_spec())
    meta["model"]["category_ids"] = [1]
    with pytest.raises(CheckpointError, match="differ in length"):
        load_checkpoint(_with_metadata(tmp_path, meta))


def test_save_refuses_non_json_metadata_and_leaves_nothing(tmp_path):
    meta = make_metadata(small_spec(), {"best": (1, 2)})  # a tuple does not survive JSON
    with pytest.raises(CheckpointError, match="JSON round trip"):
        save_checkpoint(tmp_path / "a.pt", small_state(), meta)
    meta = make_metadata(small_spec(), {"when": object()})
    with pytest.raises(CheckpointError, match="not plain JSON"):
        save_checkpoint(tmp_path / "a.pt", small_state(), meta)
    with pytest.raises(CheckpointError, match="state_dict"):
        save_checkpoint(tmp_path / "a.pt", {}, make_metadata(small_spec()))
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", small_state(), make_metadata(small_spec(), {"epoch": 1}))
    before = path.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, small_state(), make_metadata(small_spec(), {"epoch": 2}))
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert load_checkpoint(path).metadata["training"]["epoch"] == 1


class _RunsCode:
    def __reduce__(self):
        import os
        return (os.getcwd, ())


@pytest.mark.parametrize("payload, reason", [
    ({"state_dict": {}, "metadata": _RunsCode()}, r"holds pickled Python objects \(posix.getcwd\).*could run code"),
    (collections.OrderedDict(a=zipfile.ZipInfo("x")), r"holds pickled Python objects \(zipfile.ZipInfo\)"),
])
def test_refusals_say_what_is_wrong_not_pytorchs_advice(tmp_path, payload, reason):
    path = write_raw(tmp_path / "x.pt", payload)
    with pytest.raises(CheckpointError, match=reason) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "weights_only" not in message and "issue" not in message and "\n" not in message


@pytest.mark.parametrize("damage, reason", [
    ("truncated", "truncated or corrupt"), ("empty", "empty file"), ("pickle", "pickle of a kind"),
])
def test_damaged_files_name_the_damage(tmp_path, damage, reason):
    import pickle

    good = save_checkpoint(tmp_path / "good.pt", small_state(), make_metadata(small_spec()))
    data = {"truncated": good.read_bytes()[:300], "empty": b"", "pickle": pickle.dumps({"a": 1})}[damage]
    (tmp_path / "bad.pt").write_bytes(data)
    with pytest.raises(CheckpointError, match=f"bad.pt: not a readable cellseg checkpoint: .*{reason}"):
        load_checkpoint(tmp_path / "bad.pt")
