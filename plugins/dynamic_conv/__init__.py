"""Per-sample dynamic convolution: sample ``b`` is convolved with its own kernel ``weight[b]``.

``out[b] = conv2d(x[b], weight[b], stride, padding, dilation, groups)``

This is what ODConv (Li et al., ICLR 2022, OSVAI/ODConv) and CondConv/DyConv compute after
aggregating their candidate kernels. The official code folds the batch into the group count
(``groups = g * B``), which freezes the batch into an exported graph; this op keeps the batch a
real axis so that every backend sees it as dynamic.
"""

from attn_export.plugins.dynamic_conv.op import dynamic_conv2d

__all__ = ["dynamic_conv2d"]
