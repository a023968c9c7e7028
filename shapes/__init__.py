"""The shapes detector's data, training and evaluation: synthetic images of four shape classes with
COCO labels (:mod:`attn_export.shapes.data`), training and its loss, mAP evaluation, and the
half-precision report, for :class:`attn_export.blocks.detector.ShapesDetector`.

Command-line entry points (each ``main(argv) -> int``): :func:`attn_export.shapes.data_cli.main`
(``attn-export data``), :func:`attn_export.shapes.train.main` (``attn-export train``) and
:func:`attn_export.shapes.evaluate.main` (``attn-export evaluate``). Importing this package imports
nothing heavy.
"""
