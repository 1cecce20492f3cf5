"""Self-describing checkpoints: one file {"state_dict", "metadata", optional "train_state"}.

metadata (plain JSON):
  {"schema_version": 1, "model": ModelSpec.to_dict(), "training": {...summary...},
   "versions": {"torch", "torchvision", "cellseg", "python"}}
  training.recipe (optional, checked when present): {"name": "cpu-scratch", "settings": {...}}
train_state (only in RUN_DIR/last.pt): optimizer / scheduler / scaler state dicts, epoch, best
metric, RNG states — tensors and plain data only, so `torch.load(weights_only=True)` reads it.
Saved atomically (temporary file + rename); loading refuses anything the metadata does not describe.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import platform
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor

import cellseg
from cellseg.config import SCHEMA_VERSION, ModelSpec
from cellseg.errors import CheckpointError, OutputError, foreign_errors
from cellseg.fileio import atomic_write

TOP_LEVEL_KEYS = {"state_dict", "metadata", "train_state"}
METADATA_KEYS = {"schema_version", "model", "training", "versions"}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state_dict: dict[str, Tensor]
    metadata: dict[str, Any]
    spec: ModelSpec
    train_state: dict[str, Any] | None


def library_versions() -> dict[str, str]:
    # str(): torch.__version__ is a TorchVersion, a class weights_only loading refuses.
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "cellseg": cellseg.__version__, "python": platform.python_version()}


def make_metadata(spec: ModelSpec, training: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "model": spec.to_dict(),
            "training": dict(training or {}), "versions": library_versions()}


def validate_metadata(metadata: Any, source: str) -> ModelSpec:
    """Check the metadata is plain JSON with exactly the known sections; return its ModelSpec."""
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{source}: metadata is not a JSON object")
    try:
        same = json.loads(json.dumps(metadata)) == metadata
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: metadata is not plain JSON ({err})") from None
    if not same:
        raise CheckpointError(f"{source}: metadata does not survive a JSON round trip (tuples, NaN or non-string keys)")
    if metadata.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{source}: checkpoint schema_version {metadata.get('schema_version')!r} "
                              f"is not supported (this cellseg reads {SCHEMA_VERSION})")
    unknown = sorted(set(metadata) - METADATA_KEYS)
    if unknown:
        raise CheckpointError(f"{source}: metadata has sections this cellseg does not know: {unknown}")
    if "model" not in metadata:
        raise CheckpointError(f"{source}: metadata lacks the 'model' section")
    for section in ("training", "versions"):
        if not isinstance(metadata.get(section, {}), dict):
            raise CheckpointError(f"{source}: metadata '{section}' is not a JSON object")
    _check_recipe(metadata.get("training", {}).get("recipe"), source)
    try:
        return ModelSpec.from_dict(metadata["model"])
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: model metadata is invalid ({err})") from None


def _check_recipe(recipe: Any, source: str) -> None:
    """training.recipe (optional; checkpoints from before recipes lack it): {"name": str,
    "settings": {...}} — the named recipe and every setting it chose, as the run used them."""
    if recipe is None:
        return
    if not (isinstance(recipe, dict) and isinstance(recipe.get("name"), str)
            and isinstance(recipe.get("settings"), dict)):
        raise CheckpointError(f"{source}: metadata training.recipe must be {{\"name\": str, \"settings\": object}}")


def recipe_of(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The training recipe recorded in checkpoint metadata, or None (older checkpoints)."""
    return metadata.get("training", {}).get("recipe")


def _check_state_dict(state: Any, source: str) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{source}: state_dict is missing or empty")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source}: state_dict entries are not named tensors: {bad[:3]}")
    return state


def save_checkpoint(path: str | Path, model_state: dict[str, Tensor], metadata: dict[str, Any],
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint atomically (overwrites `path`: callers decide about existing files)."""
    path = Path(path)
    validate_metadata(metadata, str(path))
    state = {k: v.detach().cpu() for k, v in _check_state_dict(model_state, str(path)).items()}
    # Stored as parsed JSON: only builtin types (a str subclass would not load with weights_only).
    payload: dict[str, Any] = {"state_dict": state, "metadata": json.loads(json.dumps(metadata))}
    if train_state is not None:
        payload["train_state"] = train_state
    return atomic_write(path, lambda tmp: _torch_save(payload, tmp, path), force=True)


def _torch_save(payload: dict[str, Any], tmp: Path, path: Path) -> None:
    """torch.save reports a full disk as a RuntimeError of its zip writer, not as an OSError."""
    try:
        torch.save(payload, tmp)
    except RuntimeError as err:
        raise OutputError(f"{path}: cannot write checkpoint ({str(err).splitlines()[0][:160]})") from err


def _explain_load_error(err: BaseException) -> str:
    """What is wrong with a file torch.load(weights_only=True) refused, in cellseg's words
    (PyTorch's own text advises loading with weights_only=False, which would run the pickle)."""
    return f"not a readable cellseg checkpoint: {_load_error_reason(err)}"


def _load_error_reason(err: BaseException) -> str:
    text = str(err)
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if unsafe:
        return (f"it holds pickled Python objects ({unsafe.group(1)}) that a cellseg checkpoint never "
                f"contains; refused unloaded, since unpickling them could run code")
    if isinstance(err, EOFError) or "unexpected end" in text.lower():
        return "truncated (the file ends early)"
    if "central directory" in text or "zip archive" in text:
        return "truncated or corrupt (not a complete PyTorch zip archive)"
    if isinstance(err, pickle.UnpicklingError) or "Unpickler" in text:
        return "a pickle of a kind that cannot be read safely (not written by cellseg)"
    if "inline_container" in text or "archive" in text:
        return "a zip file that is not a PyTorch checkpoint"
    return f"unrecognised content ({type(err).__name__})"


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: not a readable cellseg checkpoint: empty file (0 bytes)")
    # torch warns about odd pickle protocols with advice to file an issue with PyTorch; the
    # file is either refused below in one line or loads, so the warning is noise to the user.
    with foreign_errors(path, "checkpoint", CheckpointError, _explain_load_error), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a cellseg checkpoint (top level is {type(payload).__name__})")
    if "metadata" not in payload:
        raise CheckpointError(f"{path}: checkpoint has no metadata (a bare state dict? "
                              f"pass it as --weights to train instead)")
    unknown = sorted(set(payload) - TOP_LEVEL_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: checkpoint has entries this cellseg does not know: {unknown}")
    spec = validate_metadata(payload["metadata"], str(path))
    state = _check_state_dict(payload.get("state_dict"), str(path))
    train_state = payload.get("train_state")
    if train_state is not None and not isinstance(train_state, dict):
        raise CheckpointError(f"{path}: train_state is not a dict")
    return Checkpoint(path, state, payload["metadata"], spec, train_state)


def weights_hash(state_dict: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
