"""The shapes detection demo: training, evaluation and pre/post-processing for
:class:`attn_export.blocks.detector.ShapesDetector` on :mod:`attn_export.data.shapes`.

Command-line entry points (each ``main(argv) -> int``): :func:`attn_export.detect.data_cli.main`
(``attn-export data``), :func:`attn_export.detect.train.main` (``attn-export train``) and
:func:`attn_export.detect.evaluate.main` (``attn-export evaluate``). Importing this package imports
nothing heavy.
"""
