"""Images of any size, read a region at a time.

`open_image(path, whole_below)` gives an ImageSource: `read(y, x, h, w)` -> float32 h x w x 3 in
[0, 1], `thumbnail()` -> a small float32 image and its downsample factor. Three kinds:
  * ArraySource: the image read whole by cellseg.data.images.read_image (PNG / JPEG, and TIFFs
    of at most `whole_below` pixels): exactly rule rgb01-v1.
  * TiffSource: a larger TIFF / OME-TIFF / BigTIFF, tiled or in strips, pyramidal or not, read
    with tifffile one stored segment (tile or strip) at a time: never the whole image.
  * OpenSlideSource: SVS / NDPI / MRXS / SCN / VMS / BIF through the `slide` extra (tiffslide,
    else openslide), imported only here.

Pixel values (rule rgb01-v1, slide variant). Channels as rgb01-v1 (gray repeated, a 4th channel
dropped). uint8 -> x / 255 and bool -> 0 / 1, exactly as rgb01-v1. Every other dtype is stretched
between the 0.1 and 99.9 percentiles like rgb01-v1, but the percentiles come from the thumbnail
(the smallest pyramid level at least THUMB_SIDE px on its longer side, else every k-th pixel of
the full image), since a tile alone cannot know the image's range. For images of at most
THUMB_SIDE px a side the thumbnail is the image itself, so the values equal rgb01-v1's.
Float images whose thumbnail lies in [0, 1] are kept as they are."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from cellseg.errors import DataError, InputError

THUMB_SIDE = 2048
STRETCH_PERCENTILES = (0.1, 99.9)
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageSource(Protocol):
    path: Path
    height: int
    width: int

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray: ...

    def thumbnail(self) -> tuple[np.ndarray, int]: ...

    def close(self) -> None: ...


class ArraySource:
    """An image already in memory as float32 HxWx3 (small images read by read_image)."""

    def __init__(self, path: Path, image: np.ndarray) -> None:
        self.path, self.image = path, image
        self.height, self.width = int(image.shape[0]), int(image.shape[1])

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.image[y:y + h, x:x + w]

    def thumbnail(self) -> tuple[np.ndarray, int]:
        step = max(1, math.ceil(max(self.height, self.width) / THUMB_SIDE))
        return self.image[::step, ::step], step

    def close(self) -> None:
        self.image = np.zeros((0, 0, 3), np.float32)


def is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def open_image(path: str | os.PathLike, whole_below: int) -> ImageSource:
    """The right source for `path`: whole in memory when small (or not a TIFF), else streamed."""
    from cellseg.data.images import read_image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() in SLIDE_SUFFIXES:
        return OpenSlideSource(path)
    if path.stat().st_size > 0 and is_tiff(path):
        source = TiffSource(path)
        if source.height * source.width > whole_below:
            return source
        source.close()
    return ArraySource(path, read_image(path))


# ------------------------------------------------------------------------------- TIFF, streamed
class TiffSource:
    """A TIFF read one stored segment at a time through tifffile's own decoder."""

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            self._levels = [_LevelReader(path, self._tif, level.pages) for level in series.levels]
        except DataError:
            self.close()
            raise
        except Exception as exc:  # tifffile raises many types on a damaged header
            self.close()
            raise DataError(f"{path}: cannot read TIFF ({type(exc).__name__}: {_first_line(exc)})") from None
        self.height, self.width = self._levels[0].height, self._levels[0].width
        self._stretch: tuple[float, float] | None | bool = False  # False: not computed yet

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self._scale(self._levels[0].read(y, x, h, w))

    def thumbnail(self) -> tuple[np.ndarray, int]:
        raw, step = self._raw_thumbnail()
        return self._scale(raw), step

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()

    def _raw_thumbnail(self) -> tuple[np.ndarray, int]:
        """The smallest pyramid level still >= THUMB_SIDE px a side (or every k-th pixel)."""
        for level in reversed(self._levels):
            if max(level.height, level.width) >= min(THUMB_SIDE, max(self.height, self.width)):
                step = max(1, round(self.width / level.width))
                sub = max(1, math.ceil(max(level.height, level.width) / (THUMB_SIDE * 2)))
                return level.subsampled(sub), step * sub
        step = max(1, math.ceil(max(self.height, self.width) / THUMB_SIDE))
        return self._levels[0].subsampled(step), step

    def _scale(self, raw: np.ndarray) -> np.ndarray:
        if raw.dtype == np.uint8:
            return raw.astype(np.float32) / np.float32(255.0)
        if raw.dtype == np.bool_:
            return raw.astype(np.float32)
        if self._stretch is False:
            self._stretch = _stretch_range(self.path, self._raw_thumbnail()[0])
        if self._stretch is None:
            return raw.astype(np.float32)
        lo, hi = self._stretch
        if hi <= lo:
            return np.zeros(raw.shape, np.float32)
        return np.clip((raw.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _stretch_range(path: Path, thumb: np.ndarray) -> tuple[float, float] | None:
    """rgb01-v1's stretch limits, from the thumbnail; None = float already in [0, 1]."""
    if not (np.issubdtype(thumb.dtype, np.integer) or np.issubdtype(thumb.dtype, np.floating)):
        raise DataError(f"{path}: unsupported pixel type {thumb.dtype}")
    values = thumb.astype(np.float64)
    if np.issubdtype(thumb.dtype, np.floating):
        if not np.isfinite(values).all():
            raise DataError(f"{path}: image contains NaN or infinite values")
        if values.min() >= 0.0 and values.max() <= 1.0:
            return None
    lo, hi = np.percentile(values, STRETCH_PERCENTILES)
    if hi <= lo:
        lo, hi = values.min(), values.max()
    return float(lo), float(hi)


class _LevelReader:
    """One resolution level: its pages (one, or one per channel) and their segment grids."""

    def __init__(self, path: Path, tif, pages) -> None:
        self.path, self._fh = path, tif.filehandle
        self._pages = list(pages)
        first = self._pages[0].keyframe  # a TiffFrame carries only offsets; its keyframe decodes
        if first.is_tiled:
            self._seg_h, self._seg_w = int(first.tilelength), int(first.tilewidth)
        else:
            self._seg_h, self._seg_w = int(first.rowsperstrip or first.imagelength), int(first.imagewidth)
        self.height, self.width = int(first.imagelength), int(first.imagewidth)
        self._samples = int(first.samplesperpixel)
        self._planar = int(first.planarconfig) == 2 and self._samples > 1
        self.channels = self._samples * len(self._pages)
        if self.channels == 2 or self.channels > 4:
            raise DataError(f"{path}: unsupported number of channels {self.channels} (expected 1, 3 or 4)")
        self.dtype = np.dtype(first.dtype)
        self._rows = math.ceil(self.height / self._seg_h)
        self._cols = math.ceil(self.width / self._seg_w)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Raw pixels of the region, h x w x 3 (channel rule of rgb01-v1), native dtype."""
        out = np.zeros((h, w, self.channels), self.dtype)
        for r in range(y // self._seg_h, min(self._rows, math.ceil((y + h) / self._seg_h))):
            for c in range(x // self._seg_w, min(self._cols, math.ceil((x + w) / self._seg_w))):
                self._paste_segment(out, r, c, y, x)
        return _three_channels(out)

    def subsampled(self, step: int) -> np.ndarray:
        """Every `step`-th pixel of the whole level, one segment at a time."""
        out = np.zeros((math.ceil(self.height / step), math.ceil(self.width / step), self.channels), self.dtype)
        for r in range(self._rows):
            for c in range(self._cols):
                seg, sy, sx = self._segment(r, c)
                oy, ox = (-sy) % step, (-sx) % step
                part = seg[oy::step, ox::step]
                ty, tx = (sy + oy) // step, (sx + ox) // step
                out[ty:ty + part.shape[0], tx:tx + part.shape[1]] = part
        return _three_channels(out)

    def _paste_segment(self, out: np.ndarray, r: int, c: int, y: int, x: int) -> None:
        seg, sy, sx = self._segment(r, c)
        y0, x0 = max(sy, y), max(sx, x)
        y1, x1 = min(sy + seg.shape[0], y + out.shape[0]), min(sx + seg.shape[1], x + out.shape[1])
        if y1 > y0 and x1 > x0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = seg[y0 - sy:y1 - sy, x0 - sx:x1 - sx]

    def _segment(self, r: int, c: int) -> tuple[np.ndarray, int, int]:
        """Segment (r, c) of every page and sample plane, stacked: (h, w, channels), its origin."""
        planes = []
        per_plane = self._rows * self._cols
        for page in self._pages:
            for s in range(self._samples if self._planar else 1):
                planes.append(self._decode(page, s * per_plane + r * self._cols + c))
        seg = np.concatenate(planes, axis=-1)
        h, w = min(self._seg_h, self.height - r * self._seg_h), min(self._seg_w, self.width - c * self._seg_w)
        return seg[:h, :w], r * self._seg_h, c * self._seg_w

    def _decode(self, page, index: int) -> np.ndarray:
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        try:
            self._fh.seek(offset)
            data = self._fh.read(count)
            if count == 0 or len(data) < count:
                raise ValueError(f"segment {index} lies past the end of the file")
            key = page.keyframe
            seg, _, shape = key.decode(data, index, jpegtables=key.jpegtables, jpegheader=key.jpegheader)
        except Exception as exc:
            raise DataError(f"{self.path}: corrupt or truncated TIFF ({_first_line(exc)})") from None
        if seg is None:
            raise DataError(f"{self.path}: corrupt or truncated TIFF (segment {index} missing)")
        seg = np.asarray(seg).reshape(shape)[0]  # (depth, h, w, samples) -> (h, w, samples)
        return seg.reshape(seg.shape[-3], seg.shape[-2], -1)


def _three_channels(raw: np.ndarray) -> np.ndarray:
    if raw.shape[-1] == 1:
        return np.repeat(raw, 3, axis=-1)
    return raw[..., :3]


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------- whole-slide formats (extra)
class OpenSlideSource:
    """SVS / NDPI / MRXS ... through tiffslide (or openslide): the `slide` extra."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._slide = _open_slide_library(path)
        self.width, self.height = (int(v) for v in self._slide.dimensions)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        region = np.asarray(self._slide.read_region((x, y), 0, (w, h)))
        if region.ndim == 2:
            region = np.repeat(region[:, :, None], 3, axis=2)
        return region[:, :, :3].astype(np.float32) / np.float32(255.0)

    def thumbnail(self) -> tuple[np.ndarray, int]:
        step = max(1, math.ceil(max(self.height, self.width) / THUMB_SIDE))
        thumb = self._slide.get_thumbnail((math.ceil(self.width / step), math.ceil(self.height / step)))
        return np.asarray(thumb.convert("RGB")).astype(np.float32) / np.float32(255.0), step

    def close(self) -> None:
        self._slide.close()


def _open_slide_library(path: Path):
    try:
        import tiffslide as library
    except ImportError:
        try:
            import openslide as library
        except ImportError:
            raise InputError(f"{path}: {path.suffix} slides need the `slide` extra "
                             f"(pip install 'cellseg[slide]')") from None
    try:
        return library.open_slide(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot open slide ({type(exc).__name__}: {_first_line(exc)})") from None
