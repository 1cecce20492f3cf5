"""Small builders shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path).
conftest.py turns them into session fixtures (tiny_checkpoint, tiny_export, ...); call them directly
only for a model that differs from those."""
from __future__ import annotations

from pathlib import Path

import torch

from cellseg.config import ModelSpec


def tiny_spec(**overrides) -> ModelSpec:
    """A light two-class model with narrow heads and few proposals: fast on one CPU thread."""
    base = dict(arch="maskrcnn_resnet18_fpn", class_names=("class1", "class2"), category_ids=(1, 2),
                anchor_sizes=(8, 16, 32, 64, 128), mask_head_channels=(16, 16), box_head_dim=64,
                rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_detections_per_img=50)
    return ModelSpec(**{**base, **overrides})


def save_tiny_checkpoint(path: Path, spec: ModelSpec, seed: int = 0) -> Path:
    """A random-init checkpoint of `spec` (seeded, so two calls give the same weights)."""
    from cellseg.checkpoint import make_metadata, save_checkpoint
    from cellseg.model import build_model

    torch.manual_seed(seed)
    model = build_model(spec).eval()
    save_checkpoint(path, model.state_dict(), make_metadata(spec))
    return path


def invoke(*args):
    """The cellseg CLI in-process (typer's CliRunner), every argument as a string."""
    from typer.testing import CliRunner

    from cellseg.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one `cellseg: error:` line a failed command printed (asserts there is exactly one)."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith("cellseg: error:")]
    assert len(lines) == 1, result.output
    return lines[0]
