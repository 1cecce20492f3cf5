"""Large images read a region at a time: same pixels as read_image, bad files in one line."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import tifffile

from cellseg.data.images import read_image
from cellseg.data.slides import ArraySource, TiffSource, open_image
from cellseg.errors import DataError, InputError


@pytest.mark.parametrize("layout", [{"tile": (64, 64)}, {"rowsperstrip": 37}])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_regions_equal_read_image(tmp_path, layout, dtype):
    rng = np.random.default_rng(0)
    image = (rng.random((300, 410, 3)) * (255 if dtype == np.uint8 else 4000)).astype(dtype)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, image, photometric="rgb", **layout)
    source = open_image(path, whole_below=100)
    assert isinstance(source, TiffSource) and (source.height, source.width) == (300, 410)
    whole = read_image(path)
    np.testing.assert_allclose(source.read(37, 99, 200, 250), whole[37:237, 99:349], atol=1e-6)
    source.close()


def test_small_images_are_read_whole(tmp_path):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.zeros((20, 30), np.uint8))
    assert isinstance(open_image(path, whole_below=10_000), ArraySource)


def test_pyramid_thumbnail_comes_from_a_low_level(tmp_path, monkeypatch):
    import cellseg.data.slides as slides

    monkeypatch.setattr(slides, "THUMB_SIDE", 100)
    image = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    path = tmp_path / "p.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(64, 64), photometric="rgb", subifds=1)
        tif.write(image[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    thumb, step = open_image(path, 100).thumbnail()
    assert step == 2 and thumb.shape == (200, 200, 3)
    np.testing.assert_allclose(thumb, image[::2, ::2] / 255, atol=1e-6)


def test_truncated_tiled_tiff_is_one_line(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, np.zeros((512, 512, 3), np.uint8), photometric="rgb", tile=(64, 64), compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError) as err:
        open_image(path, 100).read(0, 0, 512, 512)
    assert "t.tif" in str(err.value) and "\n" not in str(err.value)


def test_slide_format_without_the_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiffslide", None)
    monkeypatch.setitem(sys.modules, "openslide", None)
    path = tmp_path / "s.svs"
    path.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(InputError, match=r"cellseg\[slide\]"):
        open_image(path, 100)
