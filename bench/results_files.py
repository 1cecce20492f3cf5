"""What the benches writing into bench/results share: one result as three files beside each
other (STEM.json the data, STEM.md the tables, STEM.png the picture), and running as a command."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_results(report: dict, out_dir: Path, stem: str, markdown: str,
                  plot: Callable[[dict, Path], None], force: bool) -> list[Path]:
    """Write the three files, each atomically; refuse (before writing any) when one exists
    and `force` is not given."""
    from cellseg.errors import OutputExistsError
    from cellseg.fileio import atomic_write, atomic_write_json, atomic_write_text, ensure_writable_folder

    ensure_writable_folder(out_dir)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise OutputExistsError(f"{existing[0]}: already exists (pass --force to overwrite)")
    atomic_write_json(paths[0], report, indent=2)
    atomic_write_text(paths[1], markdown)
    atomic_write(paths[2], lambda tmp: plot(report, tmp))
    return paths


def write_and_print(report: dict, args: Any, default_stem: str, render_markdown: Callable[[dict], str],
                    plot: Callable[[dict, Path], None]) -> list[Path]:
    """A bench's last step: its three files under `args.out_dir` (stem `args.stem`, else
    `default_stem`; `args.force` to overwrite), and its tables on stdout."""
    markdown = render_markdown(report)
    paths = write_results(report, args.out_dir, args.stem or default_stem, markdown, plot, args.force)
    print(markdown)
    return paths


def new_figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """(figure, axes) of matplotlib's file-only backend, for a bench's picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(fig: Any, path: Path) -> None:
    """A bench's picture as PNG (110 dpi), the figure closed after."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def run_as_command(main: Callable[[], object]) -> None:
    """`python -m cellseg.bench.<module>`: a CellsegError becomes its one `cellseg: error:` line
    on stderr and its exit code."""
    import sys

    from cellseg.errors import CellsegError

    try:
        main()
    except CellsegError as err:
        print(f"cellseg: error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 1))
