"""cocoef: COCO-EF simulator."""

__version__ = "0.1.0"
