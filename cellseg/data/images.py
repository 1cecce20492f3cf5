"""Reading images (tif / png / jpg) as float RGB in [0, 1], and instance label images as int64.

The scaling rule is named by IMAGE_RULE and recorded in checkpoints, so that training and
inference see pixels the same way.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cellseg.errors import DataError, foreign_errors

IMAGE_RULE = "rgb01-v1"
"""How `read_image` turns a file into float32 HxWx3 in [0, 1] (rule "rgb01-v1"):

Channels: HxW or HxWx1 gray -> repeated to 3 channels; HxWx3 kept; HxWx4 -> first 3 channels
(alpha or an unused 4th sample dropped, never composited); 2 channels -> error.
Axes are never guessed: a TIFF's axes come from its own metadata (tifffile's series axes such
as 'YXS', 'SYX', 'CYX', 'QYXS'); Y, X and at most one channel axis (S or C) are kept in that
order, other axes must have size 1 (a one-pixel-high image stays 1 x W), and anything else
(stacks, time series, two channel axes) is refused. Min-is-white TIFFs are inverted, palette
TIFFs expanded through their colour map; other photometric interpretations (CMYK, CIELab) are
refused. Images over MAX_IMAGE_PIXELS are refused from the header.
Values (decided per image, after the channel step):
  * uint8: x / 255.
  * bool: False -> 0, True -> 1.
  * float whose values all lie in [0, 1]: kept as they are.
  * every other dtype (uint16, int16, int32, uint32, float outside [0, 1], ...): a per-image
    percentile stretch over all channels together (keeps the colour balance):
    lo, hi = 0.1 and 99.9 percentiles; x -> clip((x - lo) / (hi - lo), 0, 1). When hi == lo
    the min and max are used instead; a constant image becomes all zeros.
NaN or infinite pixels are an error.
"""

STRETCH_PERCENTILES = (0.1, 99.9)
MAX_IMAGE_PIXELS = 2**28
"""Largest image (height x width, 268,435,456 = 16384^2 pixels) that `read_image` and
`read_label_image` load whole. The declared size is checked from the file header before any
pixel is decoded, so a huge or forged header is refused in one line instead of exhausting memory
(the RGB float copy of such an image alone takes 3 GiB). Larger images are for tiled
(whole-slide) inference, which reads them tile by tile."""
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_CHANNEL_AXES = "SC"  # tifffile: S = samples of a pixel (RGB), C = channel planes
_AXIS_NAMES = {"Q": "page", "I": "image", "Z": "depth", "T": "time", "C": "channel", "S": "sample",
               "E": "lambda", "R": "tile", "P": "phase", "A": "angle", "L": "exposure", "V": "view",
               "H": "lifetime", "M": "mosaic"}
# TIFF photometric interpretations read as they are (JPEG-compressed YCbCr decodes to RGB).
_PLAIN_PHOTOMETRIC = {1: "min-is-black", 2: "RGB", 6: "YCbCr"}
_MINISWHITE, _PALETTE, _YCBCR = 0, 3, 6
_JPEG_COMPRESSIONS = (6, 7)  # tifffile converts JPEG-compressed YCbCr to RGB; raw YCbCr it does not


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head in _TIFF_MAGIC


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")


def _check_pixel_count(path: Path, height: int, width: int, limit: int = MAX_IMAGE_PIXELS) -> None:
    if limit < MAX_IMAGE_PIXELS and height * width > limit:
        raise DataError(f"{path}: image is {height} x {width} = {height * width:,} pixels, more than the "
                        f"{limit:,} allowed here")
    if height * width > MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: image declares {height} x {width} = {height * width:,} pixels, more than "
                        f"the {MAX_IMAGE_PIXELS:,} (16384^2) read whole; tiled (whole-slide) inference "
                        f"reads larger images")


def _series_axes(tif, path: Path) -> tuple[str, tuple[int, ...]]:
    """(axes, shape) of the first series from the TIFF's own metadata. When the series axes are
    not a valid description (a repeated letter, as tifffile gives for some shaped files) and the
    file has one page, the page's axes, read from its tags, describe the image."""
    if not tif.pages or not tif.series:
        raise DataError(f"{path}: corrupt or truncated TIFF (no readable image page)")
    series = tif.series[0]
    axes, shape = str(series.axes), tuple(int(n) for n in series.shape)
    if len(set(axes)) != len(axes) or len(axes) != len(shape):
        page = tif.pages.first
        if int(np.prod(shape)) != int(np.prod(page.shape)):
            raise DataError(f"{path}: TIFF axes {axes!r} for shape {shape} cannot be interpreted")
        axes, shape = str(page.axes), tuple(int(n) for n in page.shape)
    return axes, shape


def _axis_plan(path: Path, axes: str, shape: tuple[int, ...]) -> list[int]:
    """Positions of the axes to keep, in the order Y, X[, channel]; every other axis must have
    size 1 and is dropped. Refuses what does not describe one 2-D image: stacks, time series,
    more than one channel axis, more than 4 channels."""
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: TIFF axes {axes!r} (shape {shape}) have no Y and X image axes")
    channels = [i for i, a in enumerate(axes) if a in _CHANNEL_AXES and shape[i] > 1]
    if len(channels) > 1:
        raise DataError(f"{path}: TIFF has more than one channel axis (axes {axes!r}, shape {shape})")
    for i, a in enumerate(axes):
        if a not in "YX" + _CHANNEL_AXES and shape[i] > 1:
            name = _AXIS_NAMES.get(a, a)
            raise DataError(f"{path}: unsupported image shape {shape}: a stack of {shape[i]} images along "
                            f"the {name} axis {a!r} (axes {axes!r}); cellseg reads one 2-D image per file")
    if channels and shape[channels[0]] > 4:
        raise DataError(f"{path}: unsupported image shape {shape} (axes {axes!r}): {shape[channels[0]]} "
                        f"channels, expected 1, 3 or 4")
    return [axes.index("Y"), axes.index("X"), *channels]


def _select_axes(array: np.ndarray, axes: str, keep: list[int]) -> np.ndarray:
    """Drop every axis not in `keep` (all of size 1) and order the rest Y, X[, channel]."""
    index = tuple(slice(None) if i in keep else 0 for i in range(len(axes)))
    kept_order = [i for i in range(len(axes)) if i in keep]
    array = array[index]
    return np.moveaxis(array, [kept_order.index(i) for i in keep], list(range(len(keep))))


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs header inconsistencies as warnings on stderr; a cellseg command reports a
    problem in one line (a DataError) or not at all, so its logger is muted while we read."""
    logger = logging.getLogger("tifffile")
    saved = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _read_tiff(path: Path, as_labels: bool, source: io.BytesIO | None = None,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The first series of the tif (the file at `path`, or `source` named `path`) as HxW or
    HxWxC, its axes mapped from the TIFF metadata."""
    import tifffile

    with _quiet_tifffile(), tifffile.TiffFile(path if source is None else source) as tif:
        axes, shape = _series_axes(tif, path)
        keep = _axis_plan(path, axes, shape)
        _check_pixel_count(path, shape[keep[0]], shape[keep[1]], max_pixels)
        page = tif.pages.first
        photometric = int(page.photometric)
        if photometric == _YCBCR and int(page.compression) not in _JPEG_COMPRESSIONS and not as_labels:
            raise DataError(f"{path}: YCbCr TIFF without JPEG compression is not supported (convert to RGB)")
        array = tif.series[0].asarray().reshape(shape)
        colormap = page.colormap if photometric == _PALETTE else None
    array = _select_axes(array, axes, keep)
    if as_labels:
        return array  # ids are ids, whatever the photometric says
    return _apply_photometric(path, array, photometric, colormap)


def _apply_photometric(path: Path, array: np.ndarray, photometric: int, colormap) -> np.ndarray:
    if photometric in _PLAIN_PHOTOMETRIC:
        return array
    if photometric == _MINISWHITE and array.ndim == 2 and (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.unsignedinteger)):
        return ~array if array.dtype == np.bool_ else np.iinfo(array.dtype).max - array
    if photometric == _PALETTE and colormap is not None and array.ndim == 2 and np.issubdtype(array.dtype, np.integer):
        rgb = np.moveaxis(np.asarray(colormap), 0, -1)[np.clip(array, 0, colormap.shape[1] - 1)]
        return (rgb >> 8).astype(np.uint8) if rgb.max() > 255 else rgb.astype(np.uint8)
    raise DataError(f"{path}: unsupported TIFF photometric interpretation {photometric} for "
                    f"{array.dtype} {tuple(array.shape)} (supported: min-is-black, min-is-white, RGB, palette)")


_PILLOW_LIMIT_LOCK = threading.Lock()


def _read_pillow(path: Path, source: io.BytesIO | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    from PIL import Image

    # Pillow's own decompression-bomb limit is lower than ours and would refuse in its words; the
    # declared size is checked against MAX_IMAGE_PIXELS instead, before decoding.
    with _PILLOW_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(path if source is None else source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with img:
        _check_pixel_count(path, img.height, img.width, max_pixels)
        img.load()  # forces decoding, so truncated files fail here
        if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
        if img.mode == "LA":
            img = img.getchannel("L")
        return np.asarray(img)


def _read_raw(path: str | os.PathLike, as_labels: bool = False) -> tuple[Path, np.ndarray]:
    """Decode the file into HxW or HxWxC, any failure a one-line DataError naming the file."""
    path = Path(path)
    _check_file(path)
    with foreign_errors(path, "image"):
        array = _read_tiff(path, as_labels) if _is_tiff(path) else _read_pillow(path)
    if array.size == 0:
        raise DataError(f"{path}: empty image (shape {tuple(array.shape)})")
    return path, array


def _to_three_channels(path: Path, array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3:
        raise DataError(f"{path}: unsupported image shape {tuple(array.shape)} (expected HxW or HxWxC)")
    channels = array.shape[2]
    if channels > 4:
        raise DataError(f"{path}: unsupported image shape {tuple(array.shape)} (expected HxW, HxWxC or CxHxW, C in 1, 3, 4)")
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 3:
        return array
    if channels == 4:
        return array[:, :, :3]
    raise DataError(f"{path}: unsupported number of channels {channels} (expected 1, 3 or 4)")


def _scale(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{path}: unsupported pixel type {array.dtype}")
    values = array.astype(np.float64) if array.dtype.itemsize > 4 else array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(values).all():
            raise DataError(f"{path}: image contains NaN or infinite values")
        if values.min() >= 0.0 and values.max() <= 1.0:
            return values.astype(np.float32)
    lo, hi = np.percentile(values, STRETCH_PERCENTILES)
    if hi <= lo:
        lo, hi = values.min(), values.max()
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    out = (values - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as float32 HxWx3 in [0, 1] following IMAGE_RULE ("rgb01-v1")."""
    path, array = _read_raw(path)
    return _to_rgb01(path, array)


def _to_rgb01(path: Path, array: np.ndarray) -> np.ndarray:
    rgb = _to_three_channels(path, array)
    return np.ascontiguousarray(_scale(path, rgb))


def _explain_bytes_error(err: BaseException) -> str | None:
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):  # its own text names a BytesIO object, not the image
        return "not a recognised image format (expected the bytes of a tif, png or jpg file)"
    return None


def read_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An encoded image (the bytes of a tif / png / jpg file) as float32 HxWx3 in [0, 1], decoded
    exactly as `read_image` decodes the same file. `name` stands for the file in error messages;
    images declaring more than `max_pixels` are refused from the header, before decoding."""
    path = Path(name)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"{path}: expected the bytes of an encoded image, got {type(data).__name__}")
    if len(data) == 0:
        raise DataError(f"{path}: empty image (0 bytes)")
    source = io.BytesIO(bytes(data))
    with foreign_errors(path, "image", explain=_explain_bytes_error):
        if bytes(data[:4]) in _TIFF_MAGIC:
            array = _read_tiff(path, False, source, max_pixels)
        else:
            array = _read_pillow(path, source, max_pixels)
    if array.size == 0:
        raise DataError(f"{path}: empty image (shape {tuple(array.shape)})")
    return _to_rgb01(path, array)


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label image (0 = background, >0 = instance id) as int64 HxW.

    Any integer or float dtype is accepted; floats must be integer-valued. HxWx1 is squeezed.
    Negative ids, NaN and non-integer values are errors.
    """
    path, array = _read_raw(path, as_labels=True)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise DataError(f"{path}: label image has shape {tuple(array.shape)}, expected HxW")
    if array.dtype == np.bool_:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        if np.isnan(array).any():
            raise DataError(f"{path}: label image contains NaN")
        if not np.isfinite(array).all():
            raise DataError(f"{path}: label image contains infinite values")
        if (array < 0).any():
            raise DataError(f"{path}: label image has negative ids (min {array.min():g})")
        if array.max() > np.iinfo(np.int64).max:
            raise DataError(f"{path}: label ids too large (max {array.max():g})")
        labels = array.astype(np.int64)
        if not np.array_equal(labels, array):
            raise DataError(f"{path}: label image has non-integer ids (float {array.dtype})")
        return labels
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: unsupported label pixel type {array.dtype}")
    if array.dtype == np.uint64 and array.max() > np.iinfo(np.int64).max:
        raise DataError(f"{path}: label ids too large (max {array.max()})")
    labels = array.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{path}: label image has negative ids (min {labels.min()})")
    return labels
