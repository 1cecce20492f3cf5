"""Fixtures shared by the test modules: one tiny random-init model, its checkpoint and its export
folder, each built once per test session (an export verifies every graph, which takes a while).

The session's files are read-only by convention: a test that changes an export folder copies it
first (`export_copy`)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cellseg.config import ModelSpec
from helpers import save_tiny_checkpoint, tiny_spec


@pytest.fixture(scope="session")
def tiny_model_spec() -> ModelSpec:
    return tiny_spec()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model_spec) -> Path:
    """A seeded random-init checkpoint of `tiny_model_spec`."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint") / "tiny.pt", tiny_model_spec)


@pytest.fixture(scope="session")
def tiny_weights_hash(tiny_checkpoint) -> str:
    from cellseg.checkpoint import load_checkpoint, weights_hash

    return weights_hash(load_checkpoint(tiny_checkpoint).state_dict)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_checkpoint) -> Path:
    """The export folder of `tiny_checkpoint`: FP32 and FP16 graphs, model.onnx, model.pt, cellseg.json."""
    from cellseg.export.exporter import export_model

    return export_model(tiny_checkpoint, tmp_path_factory.mktemp("tiny_export") / "out", fp16=True)


@pytest.fixture
def export_copy(tiny_export, tmp_path) -> Path:
    """A private copy of `tiny_export` that a test may change."""
    return Path(shutil.copytree(tiny_export, tmp_path / "export_copy"))
