"""cellseg: train, export and run Mask R-CNN cell instance segmentation, with verified fast paths."""

__version__ = "0.1.0"
