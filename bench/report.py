"""Rendering a bench report: the terminal table (rich), report.md, latency.png, report.json.
Every figure comes from the report dict run_bench builds; nothing here measures anything."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellseg.bench.core import fmt as _f
from cellseg.bench.core import fmt_ms as _ms

STAGE_ORDER = ("read", "preprocess", "backbone", "rpn", "roi_glue", "box_head", "mask_head", "mask_nms",
               "roi_heads", "paste", "paste_rle", "threshold_rle", "json", "other")

SPEED_COLUMNS = ("row", "load s", "mean ms", "p50 ms", "p90 ms", "p99 ms", "min ms", "max ms",
                 "img/s", "× ref", "× ort", "RSS MB", "CUDA MB", "size MB")
ACCURACY_COLUMNS = ("row", "dets", "segm AP", "bbox AP", "ΔAP segm", "ΔAP bbox", "parity %",
                    "mean IoU", "max Δscore")


def speed_rows(report: dict) -> list[list[str]]:
    out = []
    for row in report["rows"]:
        lat = row["latency_ms"]
        out.append([row["name"], _f(row["load_s"], ".2f"), _ms(lat["mean"]), _ms(lat["p50"]), _ms(lat["p90"]),
                    _ms(lat["p99"]), _ms(lat["min"]), _ms(lat["max"]), _f(row["throughput_ips"], ".2f"),
                    _f(row["speedup_vs_reference"], ".2f"), _f(row.get("speedup_vs_onnxruntime_fp32"), ".2f"),
                    _f(row["peak_rss_mb"], ".0f"),
                    _f(row["peak_cuda_mb"], ".0f"), _f(row["artifact_mb"], ".1f")])
    return out


def accuracy_rows(report: dict) -> list[list[str]]:
    out = []
    for row in report["rows"]:
        m, p = row["metrics"], row["parity"] or {}
        delta = p.get("delta_ap", {})
        out.append([row["name"], str(row["instances"]),
                    _f(m.get("segm", {}).get("AP"), ".4f"), _f(m.get("bbox", {}).get("AP"), ".4f"),
                    _f(delta.get("segm"), "+.4f"), _f(delta.get("bbox"), "+.4f"),
                    _f(100 * p["matched_share"] if p else None, ".2f"), _f(p.get("mean_iou"), ".4f"),
                    _f(p.get("max_score_diff") if p else None, ".0e")])
    return out


def stage_names(report: dict) -> list[str]:
    seen = {s for row in report["rows"] for s in row["stages_ms"]}
    ordered = [s for s in STAGE_ORDER if s in seen]
    return ordered + sorted(seen - set(ordered))


TERMINAL_SPEED = ("row", "load s", "mean ms", "p50 ms", "p90 ms", "p99 ms", "img/s", "× ref",
                  "× ort", "RSS MB", "CUDA MB", "size MB")


def machine_line(env: dict) -> str:
    """CPU model, its vector ISA, cores and threads, GPU: what the figures depend on."""
    gpu = (f"{env['gpu']} (driver {env.get('gpu_driver') or '?'}, CUDA {env.get('cuda') or '?'})"
           if env.get("gpu") else "none")
    isa = ", ".join(env.get("cpu_isa") or []) or "none of AVX2 / AVX-512 / VNNI / AMX reported"
    return (f"{env.get('cpu_model') or '?'} (ISA: {isa}), {env.get('cpu_cores')} cores "
            f"({env.get('cpu_affinity')} usable, torch threads {env.get('torch_threads')}); GPU: {gpu}")


def fastest_line(report: dict) -> str:
    """Which row to deploy on this machine: the fastest one inside its ΔAP gate."""
    best, s = report.get("fastest_in_gate"), report["settings"]
    gate = (f"FP32 rows |ΔAP| ≤ {s['max_map_drop']:g} and ≥ {100 * s['min_parity']:g}% matched, "
            f"fp16/int8 rows |ΔAP| ≤ {s.get('max_map_drop_reduced', s['max_map_drop']):g}")
    if not best:
        return f"fastest row inside the gate ({gate}): none"
    delta = best.get("delta_ap") or {}
    figures = [f"{_ms(best['mean_ms'])} ms mean"]
    if best.get("speedup_vs_onnxruntime_fp32") is not None:
        figures.append(f"{best['speedup_vs_onnxruntime_fp32']:.2f}× onnxruntime fp32")
    if best.get("speedup_vs_reference") is not None:
        figures.append(f"{best['speedup_vs_reference']:.2f}× reference")
    if delta:
        figures.append(f"ΔAP segm {_f(delta.get('segm'), '+.4f')}, bbox {_f(delta.get('bbox'), '+.4f')}")
    if best.get("matched_share") is not None:
        figures.append(f"{100 * best['matched_share']:.1f}% of the baseline's instances matched")
    return f"fastest row inside the gate ({gate}): {best['row']}: " + ", ".join(figures)


def print_report(report: dict, console: Any) -> None:
    """Two compact tables (every figure is in report.json / report.md)."""
    from rich import box
    from rich.table import Table

    d = report["data"]
    optional = {"CUDA MB": "peak_cuda_mb", "× ort": "speedup_vs_onnxruntime_fp32"}
    columns = [c for c in TERMINAL_SPEED
               if c not in optional or any(r.get(optional[c]) is not None for r in report["rows"])]
    keep = [SPEED_COLUMNS.index(c) for c in columns]
    speed = [[r[i] for i in keep] for r in speed_rows(report)]
    titles = (f"cellseg bench: {d['images']} images x {report['settings']['iters']} pass(es), ms per image",
              f"accuracy and parity vs {report['parity_baseline'] or '-'} ({d['gt_instances']} GT instances)")
    for title, cols, rows in zip(titles, (columns, ACCURACY_COLUMNS), (speed, accuracy_rows(report))):
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
        for i, col in enumerate(cols):
            table.add_column(col.replace(" ms", ""), justify="left" if i == 0 else "right",
                             no_wrap=i == 0)
        for cells in rows:
            table.add_row(*cells)
        console.print(table)
    console.print(f"machine: {machine_line(report['environment'])}", markup=False, highlight=False)
    console.print(fastest_line(report), markup=False, highlight=False)
    for s in report["skipped"]:
        console.print(f"skipped {s['backend']}: {s['reason']}", markup=False, highlight=False)
    for f in report["failures"]:
        console.print(f"FAILED {f}", style="bold red", markup=False, highlight=False)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    env, s, d = report["environment"], report["settings"], report["data"]
    fastest = fastest_line(report)
    v = env.get("versions", {})
    parts = [
        f"# cellseg bench — {report['started_utc']}",
        "",
        f"Machine: {machine_line(env)}; host {env.get('hostname')}, {env.get('platform')}.",
        "",
        f"**{fastest[0].upper()}{fastest[1:]}.**",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        "",
        f"Model `{s['model']}`; data `{s['data']}`: {d['images']} images, {d['gt_instances']} GT instances "
        f"(at most {d['max_gt_instances_per_image']} per image). Device {s['device']}, warm-up "
        f"{s['warmup']}, {s['iters']} timed pass(es) over every image, one image at a time. Parity "
        f"baseline: {report['parity_baseline'] or '-'} (mask IoU ≥ {s['parity_iou']}, pass: "
        f"|ΔAP| ≤ {s['max_map_drop']}, matched ≥ {100 * s['min_parity']:g}%; fp16/int8 rows: |ΔAP| ≤ "
        f"{s.get('max_map_drop_reduced', s['max_map_drop'])}, matched share reported). Rows measured in "
        f"{s.get('rows_in', 'one process')}.",
        "",
        "## Speed (latency per image, end to end: read → results → JSON)",
        "",
        _md_table(SPEED_COLUMNS, speed_rows(report)),
        "",
        "## Accuracy and parity",
        "",
        _md_table(ACCURACY_COLUMNS, accuracy_rows(report)),
        "",
        "## Time per image by stage (ms, mean over timed runs)",
        "",
    ]
    stages = stage_names(report)
    parts.append(_md_table(["row", *stages],
                           [[r["name"], *(_f(r["stages_ms"].get(st), ".2f") for st in stages)]
                            for r in report["rows"]]))
    parts += ["", "## Accuracy (COCO, maxDets sized from the GT)", ""]
    acc_rows = []
    for r in report["rows"]:
        for iou_type, m in r["metrics"].items():
            per_class = ", ".join(f"{k} {_f(a, '.3f')}" for k, a in m["per_class"].items())
            acc_rows.append([r["name"], iou_type, _f(m["AP"], ".4f"), _f(m["AP50"], ".4f"),
                             _f(m["AP75"], ".4f"), str(m["max_dets"]), per_class])
    parts.append(_md_table(["row", "type", "AP", "AP50", "AP75", "maxDets", "per class AP"], acc_rows))
    parts += ["", "## Parity details", ""]
    par_rows = [[r["name"], r["parity"]["baseline"], str(r["parity"]["ref_count"]), str(r["parity"]["other_count"]),
                 str(r["parity"]["matched"]), _f(100 * r["parity"]["matched_share"], ".2f"),
                 _f(100 * r["parity"]["other_matched_share"], ".2f")]
                for r in report["rows"] if r["parity"]]
    parts.append(_md_table(["row", "baseline", "baseline instances", "row instances", "matched",
                            "baseline matched %", "row matched %"], par_rows) if par_rows else "(no parity rows)")
    parts += ["", "## Skipped backends", ""]
    parts += [f"- {x['backend']}: {x['reason']}" for x in report["skipped"]] or ["(none)"]
    parts += ["", "## Failed rows (no figures)", ""]
    parts += [f"- {x['row']}: {x['reason']}" for x in report.get("failed_rows", [])] or ["(none)"]
    parts += ["", "## Failures", ""]
    parts += [f"- {f}" for f in report["failures"]] or ["(none)"]
    parts += ["", "## Row settings", ""]
    parts += [f"- {r['name']}: `{json.dumps(r['settings'], sort_keys=True)}`" for r in report["rows"]]
    parts.append("")
    return "\n".join(parts)


def plot_latency(report: dict, path: Path) -> None:
    """Left: per-row latency distribution (box plot over every timed image). Right: mean time per
    image split into stages (stacked bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["name"] for r in rows]
    fig, (ax_lat, ax_stage) = plt.subplots(1, 2, figsize=(13, max(4.0, 1.2 + 0.7 * len(rows))))
    data = [report["latencies_ms"].get(n, []) or [0.0] for n in names]
    if names:
        ax_lat.boxplot(data, orientation="horizontal", tick_labels=names, showmeans=True)
    ax_lat.invert_yaxis()  # rows top to bottom in table order
    ax_lat.set_xlabel("latency per image (ms)")
    ax_lat.set_title("latency distribution")
    stages = stage_names(report)
    cmap = plt.get_cmap("tab20")
    left = [0.0] * len(rows)
    for i, st in enumerate(stages):
        widths = [r["stages_ms"].get(st, 0.0) for r in rows]
        ax_stage.barh(names, widths, left=left, label=st, color=cmap(i % 20))
        left = [a + b for a, b in zip(left, widths)]
    ax_stage.invert_yaxis()
    ax_stage.set_xlabel("mean time per image (ms)")
    ax_stage.set_title("stages")
    if stages:
        ax_stage.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps the legend
    plt.close(fig)


def write_report(report: dict, out: Path, force: bool = False) -> Path:
    """report.json, report.md and latency.png into `out`, all or nothing (see
    cellseg.bench.harness.replace_dir_atomically)."""
    from cellseg.bench.harness import replace_dir_atomically

    def fill(folder: Path) -> None:
        (folder / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        (folder / "report.md").write_text(render_markdown(report))
        plot_latency(report, folder / "latency.png")

    return replace_dir_atomically(out, fill, force)
