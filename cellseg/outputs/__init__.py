"""Writers of inference results, each streaming to a temporary file renamed into place at the
end: COCO results JSON (coco.py), QuPath GeoJSON (geojson.py), label images (labels.py).
A writer takes one image's entries at a time (COCO results entries with full-image RLEs) and
never holds a full-size mask: masks are decoded box-locally (masks.py)."""
from __future__ import annotations

CLASS_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                 (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))
FORMATS = ("coco", "geojson", "labels")


def class_colour(index: int) -> tuple[int, int, int]:
    """Colour of the class at position `index` (0-based) of the model's classes."""
    return CLASS_COLOURS[index % len(CLASS_COLOURS)]
