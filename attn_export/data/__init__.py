"""Synthetic data sets for the demo tasks (numpy, Pillow and scikit-image; no torch).

:mod:`attn_export.data.shapes` draws the four-class shapes detection task with COCO-style labels.
"""

from attn_export.data.shapes import CATEGORIES, CLASSES, Scene, coco_dataset, generate, render_scene, write_coco

__all__ = ["CATEGORIES", "CLASSES", "Scene", "coco_dataset", "generate", "render_scene", "write_coco"]
