"""Images in, results out: one predictor (any backend), the shared postprocess, atomic outputs.

Every image goes through cellseg.tiling: an image no larger than the tile is one tile (the same
results as Predictor.predict_coco); a larger one is read region by region (cellseg.data.slides)
and merged seam-free. Results stream to the writers of cellseg.outputs as each tile finishes,
and to a per-tile journal in a work folder next to the output (`.<out name>.work/`), which
`--resume` replays after an interruption and a successful run removes.

Image ids: from an HW3 `test_image_name_to_ids.json` id map when given (matched by file name),
otherwise 1..N in the sorted order of the input paths (folders expanded and sorted by name).
Per-image outputs (GeoJSON, label images, overlays) are named by output_names: the file stem,
or <parent folder>_<stem> when stems repeat (an HW3 root's image.tif files)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellseg import tiling
from cellseg.errors import BackendUnavailableError, InputError
from cellseg.fileio import atomic_write_json, atomic_write_bytes, check_writable
from cellseg.outputs import CLASS_COLOURS, FORMATS

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
ENGINES = ("local", "ray")
# Tile results computed elsewhere (another engine's workers): image index, its tile plan -> the
# finished tiles by index; the driver merges and writes them exactly as it does its own.
TileResultsFor = Callable[[int, tiling.TilePlan], dict[int, tiling.TileResult]]


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted by name, not recursive),
    or, for an HW3 training layout, to its samples' image.tif files in sample order."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                # An HW3 training root (or its train/ folder): one image.tif per sample folder, in
                # the sorted sample order that cellseg.data.coco.hw3_to_coco numbers 1..N.
                root = p / "train" if (p / "train").is_dir() else p
                found = sorted(d / "image.tif" for d in root.iterdir() if (d / "image.tif").is_file())
            if not found:
                raise InputError(f"{p}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    unique: dict[Path, Path] = {}  # resolved path -> path as given; first occurrence wins
    for p in paths:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def assign_image_ids(paths: Sequence[Path], id_map: dict[str, int] | None) -> list[int]:
    if id_map is None:
        return list(range(1, len(paths) + 1))
    missing = [p.name for p in paths if p.name not in id_map]
    if missing:
        raise InputError(f"id map has no entry for {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [int(id_map[p.name]) for p in paths]


@dataclass
class InferenceStats:
    images: int = 0
    instances: int = 0
    tiles: int = 0
    skipped_tiles: int = 0
    cut_objects: int = 0  # owned detections cut by a tile edge: objects larger than the overlap
    largest_cut: float = 0.0
    duplicates: int = 0  # the same cell found by two tiles, merged
    empty_polygons: int = 0  # detections with an empty mask: no GeoJSON feature
    # "predict" covers the network and the shared paste + RLE (cellseg bench splits them).
    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "predict": 0.0})
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class InferSettings:
    score_thresh: float | None = None
    tile: int | None = None  # None: from the checkpoint (cellseg.tiling.tile_settings)
    overlap: int | None = None
    skip_background: bool = True
    resume: bool = False
    progress: bool = True
    model_id: str = ""  # names the model in the resume journal


@dataclass(frozen=True)
class OutputPlan:
    formats: tuple[str, ...]
    coco: Path | None
    out_dir: Path
    names: tuple[str, ...]
    overlays: Path | None
    force: bool
    work: Path
    per_image_force: bool = False  # --force, or --resume replacing the interrupted run's own outputs

    def geojson_path(self, i: int) -> Path:
        return self.out_dir / f"{self.names[i]}.geojson"

    def labels_paths(self, i: int) -> tuple[Path, Path]:
        return (self.out_dir / f"{self.names[i]}.instances.ome.tif", self.out_dir / f"{self.names[i]}.classes.ome.tif")

    def overlay_path(self, i: int) -> Path | None:
        return None if self.overlays is None else self.overlays / f"{self.names[i]}.png"

    def per_image_paths(self, i: int) -> list[Path]:
        paths = [self.geojson_path(i)] if "geojson" in self.formats else []
        paths += list(self.labels_paths(i)) if "labels" in self.formats else []
        overlay = self.overlay_path(i)
        return paths + ([overlay] if overlay is not None else [])


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"--format {text!r}: choose one or more of {', '.join(FORMATS)} (comma-separated)")
    return formats


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct name per input for its per-image outputs: the stem; <parent>_<stem> where
    stems repeat; with the input's position prefixed if even those repeat."""
    stems = [p.stem for p in paths]
    names = [s if stems.count(s) == 1 else f"{p.parent.name}_{s}" for p, s in zip(paths, stems)]
    return [n if names.count(n) == 1 else f"{i + 1}_{n}" for i, n in enumerate(names)]


def work_dir(anchor: Path) -> Path:
    return anchor.parent / f".{anchor.name}.work"


def plan_outputs(paths: Sequence[Path], out: Path, formats: Sequence[str], out_dir: Path | None,
                 overlays: Path | None, force: bool, resume: bool = False) -> OutputPlan:
    """Every final path, checked before any work: an existing one is refused without --force
    (with --resume, the per-image outputs of the interrupted run itself may be replaced)."""
    per_image_force = force or (resume and work_dir(out).is_dir())
    plan = OutputPlan(tuple(formats), out if "coco" in formats else None, out_dir or out.parent,
                      tuple(output_names(paths)), overlays, force, work_dir(out), per_image_force)
    if plan.coco is not None:
        check_writable(plan.coco, force)
    for i in range(len(paths)):
        for p in plan.per_image_paths(i):
            check_writable(p, per_image_force)
    return plan


# ------------------------------------------------------------------------------ streaming run
def infer_to_outputs(predictor, paths: Sequence[Path], image_ids: Sequence[int], plan: OutputPlan,
                     settings: InferSettings, computed: TileResultsFor | None = None) -> InferenceStats:
    """Run every image (tiled when large), streaming results into the planned outputs. Tiles
    that `computed` supplies are merged as they are; the predictor runs the rest."""
    from cellseg.outputs.coco import CocoResultsWriter

    stats = InferenceStats()
    _prepare_work(plan.work, settings.resume, stats)
    coco = CocoResultsWriter(plan.coco, plan.force) if plan.coco is not None else None
    try:
        with _Bar(settings.progress, len(paths)) as bar:
            for i, (path, image_id) in enumerate(zip(paths, image_ids)):
                _infer_one(predictor, path, image_id, i, plan, settings, coco, stats, bar, computed)
                bar.image_done()
        if coco is not None:
            coco.close()
    except BaseException:
        if coco is not None:
            coco.abort()
        raise
    shutil.rmtree(plan.work, ignore_errors=True)
    _final_notes(stats, predictor)
    return stats


@dataclass(frozen=True)
class EngineSettings:
    """Where the predictions run: `local` (this process) or `ray` (Ray Data actors, one predictor
    each, on this machine or the cluster at `address`); the outputs are the same."""
    name: str = "local"
    workers: int | None = None  # ray: actors (default 2)
    address: str | None = None  # ray: an existing cluster (default: a local one for this run)


def check_engine(engine: EngineSettings) -> None:
    if engine.name not in ENGINES:
        raise InputError(f"--engine {engine.name!r}: choose one of {', '.join(ENGINES)}")
    if engine.name != "ray" and (engine.workers is not None or engine.address is not None):
        raise InputError("--workers and --address need --engine ray")
    if engine.workers is not None and engine.workers < 1:
        raise InputError(f"--workers {engine.workers}: must be at least 1")
    if engine.name == "ray" and importlib.util.find_spec("ray") is None:
        raise BackendUnavailableError("--engine ray: ray is not installed; pip install 'cellseg[ray]'")


def run_engine(engine: EngineSettings, predictor, model: Path, device: str, paths: Sequence[Path],
               image_ids: Sequence[int], plan: OutputPlan, settings: InferSettings,
               precision: str | None = None) -> InferenceStats:
    """infer_to_outputs here, or with the tiles predicted by Ray workers that load `model`
    themselves (this process's predictor still names the backend and merges and writes)."""
    check_engine(engine)
    if engine.name == "local":
        return infer_to_outputs(predictor, paths, image_ids, plan, settings)
    from cellseg.ray_engine import infer_with_ray

    return infer_with_ray(predictor, model, device, paths, image_ids, plan, settings,
                          workers=engine.workers or 2, address=engine.address, precision=precision)


def _prepare_work(work: Path, resume: bool, stats: InferenceStats) -> None:
    if work.is_dir() and not resume:
        stats.notes.append(f"discarded the journal of an interrupted run in {work} (--resume continues one)")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)


def _final_notes(stats: InferenceStats, predictor) -> None:
    if stats.cut_objects:
        need = int(np.ceil(stats.largest_cut)) + 2 * tiling.EDGE_MARGIN
        stats.notes.append(f"warning: {stats.cut_objects} objects larger than the tile overlap were cut at tile "
                           f"edges (largest {stats.largest_cut:.0f} px); they may be split or partly lost: "
                           f"rerun with --overlap {need} or more")
    if stats.skipped_tiles:
        stats.notes.append(f"skipped {stats.skipped_tiles} of {stats.tiles} tiles with no tissue "
                           f"(--no-skip-background runs them)")


def open_planned(spec, path: Path, settings: InferSettings):
    """(image source, its tile plan): the image opened for reading tile by tile."""
    from cellseg.data.slides import open_image

    tile, overlap = tiling.tile_settings(spec, settings.tile, settings.overlap)
    tiling.plan_tiles(tile, tile, tile, overlap)  # a bad --tile/--overlap fails before reading
    source = open_image(path, whole_below=tile * tile)
    return source, tiling.plan_tiles(source.height, source.width, tile, overlap)


def image_tile_results(predictor, path: Path, image_id: int, settings: InferSettings) -> list[tiling.TileResult]:
    """Every tile of one image through the predictor, unmerged: what a remote worker computes
    for the driver's infer_to_outputs(computed=...)."""
    source, tile_plan = open_planned(predictor.spec, path, settings)
    try:
        tiles = tile_plan.tiles()
        keep = _tissue(source, tiles, settings)
        return list(tiling.iter_tile_results(predictor, source, tile_plan, image_id, settings.score_thresh, tiles, keep))
    finally:
        source.close()


def _infer_one(predictor, path: Path, image_id: int, index: int, plan: OutputPlan, settings: InferSettings,
               coco, stats: InferenceStats, bar: "_Bar", computed: TileResultsFor | None = None) -> None:
    from cellseg.data.slides import ArraySource

    t0 = time.perf_counter()
    source, tile_plan = open_planned(predictor.spec, path, settings)
    stats.seconds["read"] += time.perf_counter() - t0
    try:
        _check_rle_size(path, tile_plan, plan)
        given = computed(index, tile_plan) if computed is not None else {}
        writers = _image_writers(plan, index, tile_plan, predictor.spec)
        collected: list[dict] | None = [] if plan.overlay_path(index) is not None and isinstance(source, ArraySource) else None
        try:
            _run_tiles(predictor, source, image_id, index, tile_plan, plan, settings, [coco, *writers], collected, stats,
                       bar, given)
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        _finish_image(predictor, source, index, plan, collected, stats, writers)
    finally:
        source.close()


def _check_rle_size(path: Path, tile_plan: tiling.TilePlan, plan: OutputPlan) -> None:
    if tile_plan.height * tile_plan.width >= 2 ** 32:
        raise InputError(f"{path}: {tile_plan.width}x{tile_plan.height} px is beyond what COCO RLE masks can "
                         f"encode (2^32 px); split the image")


def _image_writers(plan: OutputPlan, index: int, tile_plan: tiling.TilePlan, spec) -> list:
    writers: list = []
    per_image_force = plan.per_image_force
    if "geojson" in plan.formats:
        from cellseg.outputs.geojson import GeoJsonWriter

        writers.append(GeoJsonWriter(plan.geojson_path(index), spec.class_names, spec.category_ids, per_image_force))
    if "labels" in plan.formats:
        from cellseg.outputs.labels import LabelImageWriter

        writers.append(LabelImageWriter(*plan.labels_paths(index), tile_plan.height, tile_plan.width, per_image_force))
    return writers


def _finish_image(predictor, source, index: int, plan: OutputPlan, collected: list[dict] | None,
                  stats: InferenceStats, writers: list) -> None:
    stats.images += 1
    stats.empty_polygons += sum(getattr(w, "empty", 0) for w in writers)
    overlay = plan.overlay_path(index)
    if overlay is None:
        return
    if collected is None:
        stats.notes.append(f"{source.path}: no overlay (image too large for one PNG)")
        return
    write_overlay(source.image, collected, predictor.spec.class_names, predictor.spec.category_ids, overlay,
                  force=plan.per_image_force)


def _run_tiles(predictor, source, image_id: int, index: int, tile_plan: tiling.TilePlan, plan: OutputPlan,
               settings: InferSettings, sinks: list, collected: list[dict] | None, stats: InferenceStats,
               bar: "_Bar", given: dict[int, tiling.TileResult] | None = None) -> None:
    header = {"path": str(Path(source.path).resolve()), "image_id": int(image_id), "height": tile_plan.height,
              "width": tile_plan.width, "tile": tile_plan.tile, "overlap": tile_plan.overlap,
              "score_thresh": settings.score_thresh, "model": settings.model_id,
              "skip_background": settings.skip_background}
    journal = TileJournal(journal_path(plan.work, index), header, settings.resume)
    merger = tiling.SeamMerger(tile_plan)
    tiles = tile_plan.tiles()
    bar.start_image(Path(source.path).name, len(tiles))
    keep: list[bool] | None = None  # judged only when a tile must run here (a thumbnail read)
    for tile in tiles:
        result = journal.finished.get(tile.index)
        if result is None:
            result = (given or {}).get(tile.index)
            if result is None:
                keep = keep or _tissue(source, tiles, settings)
                t0 = time.perf_counter()
                result = next(tiling.iter_tile_results(predictor, source, tile_plan, image_id, settings.score_thresh,
                                                       [tile], keep))
                stats.seconds["predict"] += time.perf_counter() - t0
            journal.record(result)
        _account(result, stats)
        _emit(merger.add(result), sinks, collected, stats)
        bar.tile_done()
    _emit(merger.finish(), sinks, collected, stats)
    stats.duplicates += merger.duplicates
    journal.close()


def _tissue(source, tiles: list, settings: InferSettings) -> list[bool]:
    if not settings.skip_background or len(tiles) < 2:
        return [True] * len(tiles)
    thumb, step = source.thumbnail()
    return tiling.tissue_tiles(thumb, step, tiles)


def _account(result: tiling.TileResult, stats: InferenceStats) -> None:
    stats.tiles += 1
    stats.skipped_tiles += int(result.skipped)
    stats.cut_objects += result.cut
    stats.largest_cut = max(stats.largest_cut, result.largest_cut)


def _emit(entries: list[dict], sinks: list, collected: list[dict] | None, stats: InferenceStats) -> None:
    if not entries:
        return
    stats.instances += len(entries)
    for sink in sinks:
        if sink is not None:
            sink.add(entries)
    if collected is not None:
        collected.extend(entries)


def journal_path(work: Path, index: int) -> Path:
    return work / f"image{index:06d}.jsonl"


def journal_complete(path: Path) -> bool:
    """Whether a journal (written by TileJournal) holds every tile of its image; a resumed run
    need not send such an image to workers again (TileJournal still checks its header)."""
    if not path.is_file():
        return False
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        header = json.loads(lines[0])
        total = len(tiling.plan_tiles(header["height"], header["width"], header["tile"], header["overlap"]))
    except (json.JSONDecodeError, KeyError, TypeError, InputError):
        return False
    done = set()
    for line in lines[1:]:
        try:
            done.add(json.loads(line)["tile"])
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    return len(done) >= total


def tile_record(result: tiling.TileResult) -> dict:
    """A finished tile as plain JSON data (the journal's line; what a Ray worker sends back)."""
    return {"tile": result.tile.index, "entries": result.entries, "cut": result.cut,
            "largest_cut": result.largest_cut, "skipped": result.skipped}


def tile_from_record(rec: dict, tiles: dict[int, tiling.Tile]) -> tiling.TileResult:
    return tiling.TileResult(tiles[rec["tile"]], rec["entries"], rec["cut"], rec["largest_cut"], rec["skipped"])


class TileJournal:
    """Per-image journal of finished tiles: a JSON header line, then one line per tile. A
    resumed run replays the tiles recorded under the same header; a torn last line (the run was
    killed while writing it) is ignored."""

    def __init__(self, path: Path, header: dict, resume: bool) -> None:
        self.path = path
        self.finished: dict[int, tiling.TileResult] = {}
        if resume and path.is_file():
            self._load(header)
        mode = "a" if self.finished or (resume and path.is_file()) else "w"
        self._fh = open(path, mode, encoding="utf-8")
        if mode == "w":
            self._write(header)

    def _load(self, header: dict) -> None:
        lines = self.path.read_text(encoding="utf-8").split("\n")
        try:
            recorded = json.loads(lines[0])
        except json.JSONDecodeError:
            recorded = None
        if recorded != json.loads(json.dumps(header)):
            raise InputError(f"{self.path}: the interrupted run had other inputs or settings "
                             f"(image, model, --tile, --overlap, --score-thresh); rerun without --resume")
        plan_tiles = {t.index: t for t in tiling.plan_tiles(header["height"], header["width"], header["tile"],
                                                            header["overlap"]).tiles()}
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            self.finished[rec["tile"]] = tile_from_record(rec, plan_tiles)
        self._rewrite_clean(lines[0])

    def _rewrite_clean(self, header_line: str) -> None:
        """Drop a torn last line so that appended records start on a line of their own."""
        body = "\n".join([header_line] + [json.dumps(tile_record(r)) for r in self.finished.values()]) + "\n"
        self.path.write_text(body, encoding="utf-8")

    def _write(self, obj: dict) -> None:
        self._fh.write(json.dumps(obj) + "\n")
        self._fh.flush()

    def record(self, result: tiling.TileResult) -> None:
        self._write(tile_record(result))

    def close(self) -> None:
        self._fh.close()


class _Bar:
    """A rich progress bar over images and over the current image's tiles, with ETAs."""

    def __init__(self, enabled: bool, images: int) -> None:
        self.enabled, self.images = enabled, images
        self._progress = None

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), transient=True)
            self._progress.__enter__()
            self._images = self._progress.add_task("images", total=self.images, visible=self.images > 1)
            self._tiles = self._progress.add_task("tiles", total=1, visible=False)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_image(self, name: str, tiles: int) -> None:
        if self._progress is not None:
            self._progress.reset(self._tiles, total=tiles, description=f"{name} tiles", visible=tiles > 1)

    def tile_done(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._tiles)

    def image_done(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._images)


# ------------------------------------------------------------------------------- in memory
def predict_image(predictor, image: np.ndarray, image_id: int, score_thresh: float | None = None) -> list[dict]:
    """Run one image through a predictor and the shared postprocess -> COCO result entries."""
    return predictor.predict_coco(image, image_id, score_thresh)


def run_inference(predictor, paths: Sequence[Path], image_ids: Sequence[int],
                  score_thresh: float | None = None, overlays: Path | None = None,
                  progress: bool = True, overlay_force: bool = True) -> tuple[list[dict], InferenceStats]:
    """In memory, for small sets (demo, tests): the same run as infer_to_outputs, results
    returned as one list (entries in output order)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cellseg-infer-") as tmp:
        out = Path(tmp) / "results.json"
        plan = plan_outputs(paths, out, ("coco",), None, overlays, overlay_force)
        stats = infer_to_outputs(predictor, paths, image_ids, plan,
                                 InferSettings(score_thresh=score_thresh, progress=progress))
        results = json.loads(out.read_text())
    return results, stats


def write_results(results: list[dict], out: Path, force: bool) -> Path:
    return atomic_write_json(out, results, force=force)


OVERLAY_MIN_SCORE = 0.5  # overlays are for looking: the results JSON keeps every detection
_PALETTE = np.array(CLASS_COLOURS, dtype=np.float32)


def write_overlay(image: np.ndarray, entries: list[dict], class_names: Sequence[str],
                  category_ids: Sequence[int], out: Path, min_score: float = OVERLAY_MIN_SCORE,
                  force: bool = False) -> Path:
    """A PNG with each instance scoring >= min_score filled in its class colour (half
    transparent), outlined, and labelled with class and score at its box corner."""
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    canvas = (np.clip(image, 0, 1) * 255).astype(np.float32)
    names = dict(zip(category_ids, class_names))
    colour_of = {cid: _PALETTE[i % len(_PALETTE)] for i, cid in enumerate(category_ids)}
    entries = [e for e in entries if e["score"] >= min_score]
    for e in entries:
        m = mask_utils.decode(e["segmentation"]).astype(bool)
        canvas[m] = 0.5 * canvas[m] + 0.5 * colour_of.get(e["category_id"], _PALETTE[0])
    img = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for e in entries:
        x, y, w, h = e["bbox"]
        colour = tuple(int(c) for c in colour_of.get(e["category_id"], _PALETTE[0]))
        draw.rectangle([x, y, x + w, y + h], outline=colour)
        draw.text((x + 1, y + 1), f"{names.get(e['category_id'], e['category_id'])} {e['score']:.2f}", fill=colour)
    return atomic_write_bytes(out, _png_bytes(img), force=force)


def _png_bytes(img) -> bytes:
    import io

    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def load_id_map_if_any(path: Path | None) -> dict[str, int] | None:
    if path is None:
        return None
    from cellseg.data.hw3 import read_id_map

    return read_id_map(path)


def prepare_output(out: Path, force: bool) -> None:
    """Fail before any work if the results file exists (no silent overwrite)."""
    check_writable(out, force)


def results_summary(results: list[dict]) -> dict:
    by_cat: dict[int, int] = {}
    for r in results:
        by_cat[r["category_id"]] = by_cat.get(r["category_id"], 0) + 1
    return {"instances": len(results), "per_category": by_cat}
