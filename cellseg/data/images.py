"""Reading images (tif / png / jpg) as float RGB in [0, 1], and instance label images as int64.

The scaling rule is named by IMAGE_RULE and recorded in checkpoints, so that training and
inference see pixels the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cellseg.errors import DataError

IMAGE_RULE = "rgb01-v1"
"""How `read_image` turns a file into float32 HxWx3 in [0, 1] (rule "rgb01-v1"):

Channels: HxW or HxWx1 gray -> repeated to 3 channels; HxWx3 kept; HxWx4 -> first 3 channels
(alpha or an unused 4th sample dropped, never composited); 2 channels -> error. Planar tif
pages stored as (C, H, W) are moved to channel-last.
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
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


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


def _read_tiff(path: Path) -> np.ndarray:
    """First series of the tif, planar (C, H, W) pages moved to channel-last."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.pages or not tif.series:
            raise DataError(f"{path}: corrupt or truncated TIFF (no readable image page)")
        series = tif.series[0]
        axes = series.axes
        array = series.asarray()
    # drop leading singleton axes (e.g. a 1-page 'IYXS' series)
    while array.ndim > 2 and array.shape[0] == 1 and len(axes) > 2:
        array, axes = array[0], axes[1:]
    if array.ndim == 3 and axes[0] in "SC" and axes[-1] not in "SC":
        array = np.moveaxis(array, 0, -1)
    return array


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # forces decoding, so truncated files fail here
        if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
        if img.mode == "LA":
            img = img.getchannel("L")
        return np.asarray(img)


def _read_raw(path: str | os.PathLike) -> tuple[Path, np.ndarray]:
    """Decode the file into a numpy array, any DataError naming the file."""
    path = Path(path)
    _check_file(path)
    try:
        array = _read_tiff(path) if _is_tiff(path) else _read_pillow(path)
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # tifffile / Pillow / imagecodecs raise many types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {msg})") from exc
    if array.size == 0:
        raise DataError(f"{path}: empty image (shape {tuple(array.shape)})")
    return path, array


def _to_three_channels(path: Path, array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channel-first from a non-tiff source
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
    rgb = _to_three_channels(path, array)
    return np.ascontiguousarray(_scale(path, rgb))


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label image (0 = background, >0 = instance id) as int64 HxW.

    Any integer or float dtype is accepted; floats must be integer-valued. HxWx1 is squeezed.
    Negative ids, NaN and non-integer values are errors.
    """
    path, array = _read_raw(path)
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
