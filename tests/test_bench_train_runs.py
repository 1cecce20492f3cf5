"""cellseg.bench.train_runs: the proxy table and per-epoch curves of training runs, from the
files `cellseg train` writes (a real tiny run and hand-made metrics)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cellseg.bench.train_runs import build_report, main, render_markdown
from cellseg.config import TrainConfig
from cellseg.data.synth import synthesize
from cellseg.errors import InputError, OutputExistsError
from cellseg.recipes import recipe_config
from cellseg.train import fit

torch.set_num_threads(1)


def fake_run(folder: Path, aps: list[float | None], fpn: int | None = None, lr: float = 4e-4) -> Path:
    """A run folder with one metrics line per AP (None: an epoch whose validation gave no AP)."""
    folder.mkdir(parents=True)
    overrides = {"norm": "gn"} | ({"fpn_channels": fpn} if fpn else {})
    (folder / "config.json").write_text(json.dumps({"data": "d", "out": str(folder), "lr": lr, "batch_size": 4,
                                                    "model_overrides": overrides}))
    lines = []
    for epoch, ap in enumerate(aps, start=1):
        per_class = {"class1": None if ap is None else ap / 2, "class2": ap}
        segm = {"AP": ap, "AP50": None if ap is None else 2 * ap, "per_class": per_class,
                "per_class_AP50": per_class}
        lines.append(json.dumps({"epoch": epoch, "losses": {"loss": 3.0 - epoch}, "iterations": 10 * epoch,
                                 "seconds": 60.0, "val": {"segm": segm, "bbox": segm}}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_best_epoch_cumulative_minutes_and_the_settings_that_differ(tmp_path):
    a = fake_run(tmp_path / "wide", [0.01, 0.05, 0.03])
    b = fake_run(tmp_path / "narrow", [0.02, None], fpn=64)
    report = build_report([a, b], note="two proxies")
    wide, narrow = report["runs"]
    assert wide["best"]["epoch"] == 2 and wide["best"]["segm_AP"] == 0.05  # best.pt's rule: val segm AP
    assert [r["minutes"] for r in wide["epochs"]] == [1.0, 2.0, 3.0]
    assert narrow["best"]["epoch"] == 1  # an epoch without AP never counts as best
    assert wide["differs"] == {"set fpn_channels": None} and narrow["differs"] == {"set fpn_channels": 64}
    text = render_markdown(report)
    assert "| AP50 vs wide |" in text
    assert "| wide | set fpn_channels=default | 3 | 30 | 3.0 | 2 | 0.050 | 0.100 | +0.000 |" in text
    assert "| narrow | set fpn_channels=64 | 2 | 20 | 2.0 | 1 | 0.020 | 0.040 | -0.060 |" in text
    assert "two proxies" in text and "### narrow" in text


def test_writes_json_md_png_and_refuses_to_overwrite(tmp_path):
    run = fake_run(tmp_path / "r", [0.1, 0.2])
    paths = main([str(run), "--out-dir", str(tmp_path / "out"), "--stem", "s"])
    assert [p.name for p in paths] == ["s.json", "s.md", "s.png"]
    assert json.loads(paths[0].read_text())["runs"][0]["best"]["epoch"] == 2
    assert paths[2].read_bytes().startswith(b"\x89PNG")
    before = paths[1].read_text()
    with pytest.raises(OutputExistsError, match="s.json: already exists"):
        main([str(run), "--out-dir", str(tmp_path / "out"), "--stem", "s"])
    assert paths[1].read_text() == before
    main([str(run), "--out-dir", str(tmp_path / "out"), "--stem", "s", "--force"])


def test_a_folder_without_metrics_is_one_line_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no metrics.jsonl"):
        build_report([tmp_path / "empty"])
    bad = fake_run(tmp_path / "bad", [0.1])
    (bad / "metrics.jsonl").write_text("{not json\n")
    proc = subprocess.run([sys.executable, "-m", "cellseg.bench.train_runs", str(bad), "--out-dir",
                           str(tmp_path / "out"), "--stem", "s"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(f"cellseg: error: {bad / 'metrics.jsonl'}: not a readable")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_reads_what_a_real_training_run_writes(tmp_path):
    data = synthesize(tmp_path / "data", n_train=4, n_test=0, seed=1, size=64)
    tiny = dict(rpn_pre_nms_top_n_train=32, rpn_post_nms_top_n_train=32, rpn_pre_nms_top_n_test=32,
                rpn_post_nms_top_n_test=32, box_batch_size_per_image=16, rpn_batch_size_per_image=16,
                box_detections_per_img=32)
    cfg: TrainConfig = recipe_config("cpu-scratch", dict(
        data=str(data), out=str(tmp_path / "run"), epochs=2, batch_size=2, crop_size=48, val_fraction=0.3,
        device="cpu", max_iters_per_epoch=1, seed=0, model_overrides=tuple(tiny.items()), progress=False))
    fit(cfg)
    run = build_report([tmp_path / "run"])["runs"][0]
    assert [r["epoch"] for r in run["epochs"]] == [1, 2]
    assert run["config"]["model_overrides"]["fpn_channels"] == 64  # the recipe's width, as the run used it
    assert all(r["segm_AP"] is not None for r in run["epochs"])
    # minutes: the epochs' cumulative wall time from metrics.jsonl (an epoch here can take under a second)
    seconds = [json.loads(line)["seconds"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cumulative = [sum(seconds[:i + 1]) / 60 for i in range(2)]
    assert [r["minutes"] for r in run["epochs"]] == pytest.approx(cumulative, abs=0.006)
