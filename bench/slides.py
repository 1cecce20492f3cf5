"""Seconds per megapixel and peak RSS of tiled inference against image size.

python -m cellseg.bench.slides --model M --sizes 2048,8192,16384 [--out bench/results]
Each size gets a synthetic slide (cellseg data synth --slide, cached in --work) and runs in a
child process of its own, so each peak RSS (ru_maxrss) belongs to one size alone. Writes
slides.json and slides.md into --out."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure_one(model: str, slide: Path, backend: str | None, tile: int | None, overlap: int | None) -> dict:
    """Runs in the child: one slide through `cellseg infer`'s streaming path."""
    import tempfile

    from cellseg.infer import InferSettings, infer_to_outputs, plan_outputs
    from cellseg.pipeline import load_predictor

    predictor = load_predictor(model, backend=backend, device="auto")
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_outputs([slide], Path(tmp) / "r.json", ("coco",), None, None, False)
        t0 = time.perf_counter()
        stats = infer_to_outputs(predictor, [slide], [1], plan, InferSettings(tile=tile, overlap=overlap, progress=False))
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tiles": stats.tiles, "skipped_tiles": stats.skipped_tiles,
            "instances": stats.instances, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "backend": predictor.backend_name}


def _child(args: argparse.Namespace, slide: Path) -> dict:
    code = ("import json, sys; from pathlib import Path; from cellseg.bench.slides import measure_one; "
            f"print(json.dumps(measure_one({args.model!r}, Path({str(slide)!r}), {args.backend!r}, "
            f"{args.tile!r}, {args.overlap!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _slide(work: Path, side: int) -> Path:
    folder = work / f"slide{side}"
    if not (folder / "slide.tif").is_file():
        subprocess.run([sys.executable, "-m", "cellseg", "data", "synth", str(folder), "--slide", str(side),
                        "--force"], check=True)
    return folder / "slide.tif"


def _markdown(rows: list[dict]) -> str:
    lines = ["# Tiled inference: time and memory against image size", "",
             "| side | Mpx | tiles (skipped) | instances | s | s/Mpx | s/Mpx of tissue tiles | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['side']} | | | | | | | failed: {r['error']} |")
            continue
        mpx = r["side"] ** 2 / 1e6
        run = max(1, r["tiles"] - r["skipped_tiles"])
        tissue_mpx = mpx * run / max(1, r["tiles"])
        lines.append(f"| {r['side']} | {mpx:.1f} | {r['tiles']} ({r['skipped_tiles']}) | {r['instances']} | "
                     f"{r['seconds']:.1f} | {r['seconds'] / mpx:.2f} | {r['seconds'] / tissue_mpx:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sizes", default="2048,8192")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--tile", type=int, default=None)
    parser.add_argument("--overlap", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("bench/slides_work"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        row = {"side": side, **_child(args, _slide(args.work, side))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    from cellseg.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(args.out / "slides.json", rows, indent=1)
    atomic_write_text(args.out / "slides.md", _markdown(rows))
    print(f"wrote {args.out / 'slides.md'}")


if __name__ == "__main__":
    main()
