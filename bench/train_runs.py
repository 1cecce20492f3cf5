"""Training runs side by side: the proxy table of a recipe search and each run's per-epoch curve.

Reads each run folder's metrics.jsonl and config.json (what `cellseg train` writes) and reports,
per run: the settings that differ between the runs given, epochs, iterations, wall minutes, the
best epoch (val segm AP, as best.pt) with its segm/bbox AP and AP50 (and the AP50's difference
from the first run's: list the reference run first) and per-class AP50; then per
epoch: iterations, cumulative minutes, loss, segm AP/AP50, per-class AP and AP50, bbox AP/AP50.

    python -m cellseg.bench.train_runs /tmp/proxies/p1 /tmp/proxies/p1_fpn64 /tmp/runs/consep_2h \\
        --out-dir bench/results --stem 2026-12-01-train-consep-cpu-scratch

writes <out-dir>/<stem>.{json,md,png} (the picture: val segm AP50 and AP against wall minutes for
every run, and the per-class AP50 of the longest run)."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellseg.bench.core import environment_info, fmt
from cellseg.bench.results_files import run_as_command, write_results
from cellseg.errors import InputError

SCHEMA = "cellseg-train-runs-v1"


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable metrics file ({err})") from None


def _epoch_row(record: dict, minutes: float) -> dict[str, Any]:
    val = record.get("val") or {}
    segm, bbox = val.get("segm") or {}, val.get("bbox") or {}
    return {"epoch": record["epoch"], "iterations": record.get("iterations"), "minutes": round(minutes, 2),
            "loss": (record.get("losses") or {}).get("loss"),
            "segm_AP": segm.get("AP"), "segm_AP50": segm.get("AP50"),
            "bbox_AP": bbox.get("AP"), "bbox_AP50": bbox.get("AP50"),
            "per_class_AP": segm.get("per_class", {}), "per_class_AP50": segm.get("per_class_AP50", {})}


def read_run(folder: Path) -> dict[str, Any]:
    """One run folder -> its settings and per-epoch rows (minutes are cumulative wall time)."""
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise InputError(f"{folder}: no metrics.jsonl (not a cellseg training run, or no epoch finished)")
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{config_path}: not readable JSON ({err})") from None
    rows, minutes = [], 0.0
    for record in _read_jsonl(metrics):
        minutes += float(record.get("seconds", 0.0)) / 60
        rows.append(_epoch_row(record, minutes))
    if not rows:
        raise InputError(f"{metrics}: no epoch recorded")
    best = max(rows, key=lambda r: -1.0 if r["segm_AP"] is None else r["segm_AP"])
    return {"name": folder.name, "path": str(folder), "config": config, "epochs": rows, "best": best}


def _flat_settings(config: dict) -> dict[str, Any]:
    settings = {k: v for k, v in config.items() if k not in ("data", "out", "model_overrides", "progress")}
    settings.update({f"set {k}": v for k, v in (config.get("model_overrides") or {}).items()})
    return settings


def differing_settings(runs: Sequence[dict]) -> list[dict[str, Any]]:
    """Per run, the settings whose value is not the same in every run given."""
    flat = [_flat_settings(r["config"]) for r in runs]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    return [{k: f.get(k) for k in varying} for f in flat]


def build_report(folders: Sequence[Path], note: str = "") -> dict[str, Any]:
    runs = [read_run(Path(f)) for f in folders]
    for run, differs in zip(runs, differing_settings(runs)):
        run["differs"] = differs
    return {"schema": SCHEMA, "note": note, "environment": environment_info(), "runs": runs}


def _ap(value: float | None) -> str:
    return fmt(value, ".3f")


def _classes(pcs: dict) -> str:
    return ", ".join(f"{k} {_ap(v)}" for k, v in pcs.items() if v is not None) or "-"


def _setting(value: Any) -> str:
    return "default" if value is None else json.dumps(value)


def _against_first(value: float | None, first: float | None) -> str:
    """A run's best segm AP50 minus the first run's (the table's reference), signed."""
    return "-" if value is None or first is None else f"{value - first:+.3f}"


def _summary_table(runs: Sequence[dict]) -> list[str]:
    lines = ["| run | differs | epochs | iterations | minutes | best epoch | segm AP | segm AP50 | "
             f"AP50 vs {runs[0]['name']} | bbox AP50 | per-class segm AP50 (best epoch) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    first = runs[0]["best"]["segm_AP50"]
    for run in runs:
        last, best = run["epochs"][-1], run["best"]
        differs = ", ".join(f"{k}={_setting(v)}" for k, v in run["differs"].items()) or "-"
        lines.append(f"| {run['name']} | {differs} | {len(run['epochs'])} | {last['iterations']} | "
                     f"{last['minutes']:.1f} | {best['epoch']} | {_ap(best['segm_AP'])} | {_ap(best['segm_AP50'])} | "
                     f"{_against_first(best['segm_AP50'], first)} | {_ap(best['bbox_AP50'])} | "
                     f"{_classes(best['per_class_AP50'])} |")
    return lines


def _epoch_table(run: dict) -> list[str]:
    lines = [f"### {run['name']}", "", "| epoch | iterations | minutes | loss | segm AP | segm AP50 | "
             "per-class segm AP | per-class segm AP50 | bbox AP | bbox AP50 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in run["epochs"]:
        lines.append(f"| {r['epoch']} | {r['iterations']} | {r['minutes']:.1f} | {fmt(r['loss'], '.3f')} | {_ap(r['segm_AP'])} | "
                     f"{_ap(r['segm_AP50'])} | {_classes(r['per_class_AP'])} | {_classes(r['per_class_AP50'])} | "
                     f"{_ap(r['bbox_AP'])} | {_ap(r['bbox_AP50'])} |")
    return lines + [""]


def render_markdown(report: dict) -> str:
    env = report["environment"]
    isa = "/".join(env.get("cpu_isa") or []) or "?"
    parts = ["# Training runs", "", f"Report written on: {env.get('cpu_model', '?')} ({isa}), "
             f"{env.get('cpu_affinity', '?')} CPUs; torch {env.get('versions', {}).get('torch', '?')}.", ""]
    if report["note"]:
        parts += [report["note"], ""]
    parts += ["Best epoch = highest val segm AP (the epoch kept as best.pt); minutes = wall time of the "
              "epochs (training + validation + checkpoint), not counting start-up.", ""]
    parts += _summary_table(report["runs"]) + ["", "## Per epoch", ""]
    for run in report["runs"]:
        parts += _epoch_table(run)
    return "\n".join(parts)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, (ax_runs, ax_classes) = plt.subplots(1, 2, figsize=(13, 4.6))
    for i, run in enumerate(runs):
        minutes = [r["minutes"] for r in run["epochs"]]
        color = plt.get_cmap("tab10")(i % 10)
        ax_runs.plot(minutes, [r["segm_AP50"] for r in run["epochs"]], "o-", color=color, label=f"{run['name']} AP50")
        if len(runs) <= 4:  # beyond that the AP lines hide the AP50 ones
            ax_runs.plot(minutes, [r["segm_AP"] for r in run["epochs"]], "s--", color=color, label=f"{run['name']} AP")
    ax_runs.set_xlabel("wall minutes")
    ax_runs.set_ylabel("val segm AP")
    ax_runs.set_title("runs")
    ax_runs.legend(fontsize="small")
    longest = max(runs, key=lambda r: len(r["epochs"]))
    minutes = [r["minutes"] for r in longest["epochs"]]
    for name in longest["epochs"][-1]["per_class_AP50"]:
        values = [r["per_class_AP50"].get(name) for r in longest["epochs"]]
        if any(v is not None for v in values):
            ax_classes.plot(minutes, [float("nan") if v is None else v for v in values], "o-", label=name)
    ax_classes.set_xlabel("wall minutes")
    ax_classes.set_ylabel("val segm AP50")
    ax_classes.set_title(f"{longest['name']}: per class")
    ax_classes.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # `path` is a temporary name without .png
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cellseg.bench.train_runs", description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders of `cellseg train`")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--stem", required=True, help="file name without extension")
    p.add_argument("--note", default="", help="a line for the report (what the runs were)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    report = build_report(args.runs, args.note)
    markdown = render_markdown(report)
    paths = write_results(report, args.out_dir, args.stem, markdown, plot, args.force)
    print(markdown)
    print("wrote " + ", ".join(map(str, paths)))
    return paths


if __name__ == "__main__":
    run_as_command(main)
