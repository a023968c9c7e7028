"""Per-pixel involution aggregation (Li et al., "Involution", CVPR 2021).

``out[b, g*cg + c, i, j] = sum_t weight[b, g, t, i, j] * x_pad[b, g*cg + c, i*s + a_t*d, j*s + b_t*d]``

where ``t = a_t * k + b_t`` runs over the ``k x k`` taps, ``G = weight.shape[1]`` groups share one
kernel per pixel, and ``cg = C / G`` channels sit in a group. This is the ``unfold -> multiply ->
sum`` of the official code (d-li14/involution), computed without the ``k*k``-fold unfold buffer.
"""

from attn_export.plugins.involution.op import involution2d

__all__ = ["involution2d"]
