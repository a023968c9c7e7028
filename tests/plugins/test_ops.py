"""The three dynamic-kernel ops against independent naive references.

The expectations here are built only from the ops' documented semantics, with plain Python loops
over output pixels and taps in float64 (``dynamic_conv2d``: one ``F.conv2d`` per sample). Nothing
from ``attn_export.plugins._taps`` or the ops' own ``reference`` functions is used to build them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim

from attn_export.plugins import dynamic_conv2d, involution2d, outlook_aggregate

F64 = torch.float64


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def conv_len(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# --------------------------------------------------------------------------------------------------
# naive references
# --------------------------------------------------------------------------------------------------


def naive_involution(x: torch.Tensor, weight: torch.Tensor, k: int, s: int, p: int, d: int) -> torch.Tensor:
    """out[b, g*cg+c, i, j] = sum_{a,bb} weight[b, g, a*k+bb, i, j] * x[b, g*cg+c, i*s-p+a*d, j*s-p+bb*d]
    (zero outside the input), looping over output pixels and taps."""
    x, weight = x.to(F64), weight.to(F64)
    bsz, c, h, w = x.shape
    groups, ho, wo = weight.shape[1], weight.shape[3], weight.shape[4]
    xg = x.reshape(bsz, groups, c // groups, h, w)
    out = torch.zeros(bsz, groups, c // groups, ho, wo, dtype=F64)
    for i in range(ho):
        for j in range(wo):
            for a in range(k):
                for bb in range(k):
                    r, q = i * s - p + a * d, j * s - p + bb * d
                    if 0 <= r < h and 0 <= q < w:
                        out[:, :, :, i, j] += weight[:, :, a * k + bb, i, j, None] * xg[:, :, :, r, q]
    return out.reshape(bsz, c, ho, wo)


def naive_dynamic_conv(x, weight, stride, padding, dilation, groups) -> torch.Tensor:
    """One ordinary convolution per sample."""
    x, weight = x.to(F64), weight.to(F64)
    return torch.cat(
        [F.conv2d(x[b : b + 1], weight[b], None, stride, padding, dilation, groups) for b in range(x.shape[0])]
    )


def naive_outlook(v: torch.Tensor, attn: torch.Tensor, k: int, p: int, s: int) -> torch.Tensor:
    """For window centre n = (i, j) and head m: the window's output tap t (at row i*s - p + t // k,
    column j*s - p + t % k) receives sum_u attn[b, m, n, t, u] * v[b, m-th channels, at tap u]; taps
    outside the input read zero and are discarded on write. Loops over centres and both taps."""
    v, attn = v.to(F64), attn.to(F64)
    bsz, c, hh, ww = v.shape
    heads = attn.shape[1]
    h, w = conv_len(hh, k, s, p, 1), conv_len(ww, k, s, p, 1)
    vh = v.reshape(bsz, heads, c // heads, hh, ww)
    out = torch.zeros_like(vh)
    for i in range(h):
        for j in range(w):
            n = i * w + j
            for t in range(k * k):
                ty, tx = i * s - p + t // k, j * s - p + t % k
                if not (0 <= ty < hh and 0 <= tx < ww):
                    continue
                for u in range(k * k):
                    uy, ux = i * s - p + u // k, j * s - p + u % k
                    if 0 <= uy < hh and 0 <= ux < ww:
                        out[:, :, :, ty, tx] += attn[:, :, n, t, u, None] * vh[:, :, :, uy, ux]
    return out.reshape(bsz, c, hh, ww)


# --------------------------------------------------------------------------------------------------
# cases: (B, C, H, W, groups/heads, k, stride, padding, dilation)
# --------------------------------------------------------------------------------------------------

INVOLUTION_CASES = [
    pytest.param(1, 16, 9, 9, 1, 7, 1, 3, 1, id="b1-c16-9x9-g1-k7-s1-p3"),
    pytest.param(3, 8, 7, 5, 2, 3, 2, 1, 1, id="b3-c8-7x5-g2-k3-s2-p1"),
    pytest.param(2, 12, 9, 8, 3, 3, 1, 2, 2, id="b2-c12-9x8-g3-k3-s1-p2-d2"),
    pytest.param(5, 4, 6, 7, 4, 5, 2, 2, 1, id="b5-c4-6x7-g4-k5-s2-p2"),
    pytest.param(4, 6, 5, 5, 6, 1, 1, 0, 1, id="b4-c6-5x5-g6-k1"),
    pytest.param(2, 4, 8, 8, 1, 3, 3, 0, 1, id="b2-c4-8x8-g1-k3-s3-p0"),
    pytest.param(1, 2, 7, 9, 2, 3, 1, 0, 3, id="b1-c2-7x9-g2-k3-d3-p0"),
    pytest.param(2, 8, 5, 5, 2, 7, 2, 3, 1, id="b2-c8-5x5-g2-k7-s2-p3"),
]


@pytest.mark.parametrize(("b", "c", "h", "w", "g", "k", "s", "p", "d"), INVOLUTION_CASES)
def test_involution2d_matches_naive(b, c, h, w, g, k, s, p, d):
    ho, wo = conv_len(h, k, s, p, d), conv_len(w, k, s, p, d)
    x = randn(b, c, h, w, seed=1)
    weight = randn(b, g, k * k, ho, wo, seed=2)
    out = involution2d(x, weight, k, s, p, d)
    assert out.shape == (b, c, ho, wo)
    assert out.dtype == F64
    torch.testing.assert_close(out, naive_involution(x, weight, k, s, p, d), rtol=1e-12, atol=1e-12)


DYNAMIC_CONV_CASES = [
    # B, Cin, Cout, H, W, kh, kw, stride, padding, dilation, groups
    pytest.param(1, 4, 6, 7, 7, 3, 3, (1, 1), (1, 1), (1, 1), 1, id="b1-4to6-7x7-k3-p1"),
    pytest.param(3, 8, 8, 9, 7, 3, 3, (2, 2), (1, 1), (1, 1), 8, id="b3-depthwise8-9x7-k3-s2"),
    pytest.param(2, 6, 9, 8, 9, 5, 5, (1, 1), (2, 2), (1, 1), 3, id="b2-6to9-g3-8x9-k5"),
    pytest.param(5, 4, 2, 5, 6, 1, 1, (1, 1), (0, 0), (1, 1), 1, id="b5-4to2-k1"),
    pytest.param(4, 4, 4, 9, 9, 3, 3, (1, 1), (2, 2), (2, 2), 2, id="b4-g2-k3-d2-p2"),
    pytest.param(2, 3, 5, 7, 8, 2, 3, (2, 1), (0, 1), (1, 2), 1, id="b2-k2x3-s2x1-p0x1-d1x2"),
    pytest.param(3, 16, 32, 5, 5, 7, 7, (1, 1), (3, 3), (1, 1), 4, id="b3-16to32-g4-k7"),
]


@pytest.mark.parametrize(("b", "cin", "cout", "h", "w", "kh", "kw", "s", "p", "d", "g"), DYNAMIC_CONV_CASES)
def test_dynamic_conv2d_matches_naive(b, cin, cout, h, w, kh, kw, s, p, d, g):
    x = randn(b, cin, h, w, seed=3)
    weight = randn(b, cout, cin // g, kh, kw, seed=4)
    out = dynamic_conv2d(x, weight, list(s), list(p), list(d), g)
    ref = naive_dynamic_conv(x, weight, s, p, d, g)
    assert out.shape == ref.shape == (b, cout, conv_len(h, kh, s[0], p[0], d[0]), conv_len(w, kw, s[1], p[1], d[1]))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_dynamic_conv2d_uses_each_samples_own_kernel():
    """Swapping two samples' kernels must swap exactly those samples' outputs."""
    x = randn(3, 4, 6, 6, seed=5)
    weight = randn(3, 5, 4, 3, 3, seed=6)
    out = dynamic_conv2d(x, weight, [1, 1], [1, 1], [1, 1], 1)
    swapped = dynamic_conv2d(x, weight[[1, 0, 2]], [1, 1], [1, 1], [1, 1], 1)
    torch.testing.assert_close(swapped[2], out[2])
    assert not torch.allclose(swapped[0], out[0])
    torch.testing.assert_close(swapped[0], F.conv2d(x[:1], weight[1], padding=1)[0])


OUTLOOK_CASES = [
    # B, C, H, W, heads, k, padding, stride
    pytest.param(1, 4, 5, 5, 1, 3, 1, 1, id="b1-c4-5x5-h1-k3-p1-s1"),
    pytest.param(3, 8, 7, 5, 2, 3, 1, 2, id="b3-c8-7x5-h2-k3-p1-s2"),
    pytest.param(2, 6, 6, 6, 3, 3, 1, 2, id="b2-c6-6x6-h3-k3-p1-s2"),
    pytest.param(5, 4, 5, 4, 2, 1, 0, 1, id="b5-c4-5x4-h2-k1"),
    pytest.param(2, 4, 5, 5, 4, 5, 2, 2, id="b2-c4-5x5-h4-k5-p2-s2"),
    pytest.param(2, 4, 6, 5, 2, 3, 0, 1, id="b2-c4-6x5-h2-k3-p0"),
    pytest.param(1, 2, 7, 7, 1, 2, 0, 2, id="b1-c2-7x7-h1-k2-s2-gap"),
    pytest.param(4, 6, 6, 9, 3, 3, 0, 3, id="b4-c6-6x9-h3-k3-s3-nonoverlap"),
    pytest.param(2, 8, 3, 3, 2, 7, 3, 1, id="b2-c8-3x3-h2-k7-p3"),
]


@pytest.mark.parametrize(("b", "c", "hh", "ww", "heads", "k", "p", "s"), OUTLOOK_CASES)
def test_outlook_aggregate_matches_naive(b, c, hh, ww, heads, k, p, s):
    h, w = conv_len(hh, k, s, p, 1), conv_len(ww, k, s, p, 1)
    v = randn(b, c, hh, ww, seed=7)
    attn = randn(b, heads, h * w, k * k, k * k, seed=8)
    out = outlook_aggregate(v, attn, k, p, s)
    assert out.shape == v.shape
    torch.testing.assert_close(out, naive_outlook(v, attn, k, p, s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["involution2d", "dynamic_conv2d", "outlook_aggregate"])
def test_float32_matches_float64_naive(op):
    if op == "involution2d":
        x, weight = randn(2, 8, 7, 6, seed=9, dtype=torch.float32), randn(2, 2, 9, 4, 3, seed=10, dtype=torch.float32)
        out, ref = involution2d(x, weight, 3, 2, 1, 1), naive_involution(x, weight, 3, 2, 1, 1)
    elif op == "dynamic_conv2d":
        x, weight = randn(2, 8, 7, 6, seed=9, dtype=torch.float32), randn(2, 4, 4, 3, 3, seed=10, dtype=torch.float32)
        out = dynamic_conv2d(x, weight, [2, 2], [1, 1], [1, 1], 2)
        ref = naive_dynamic_conv(x, weight, (2, 2), (1, 1), (1, 1), 2)
    else:
        v, attn = randn(2, 8, 7, 6, seed=9, dtype=torch.float32), randn(2, 2, 12, 9, 9, seed=10, dtype=torch.float32)
        out, ref = outlook_aggregate(v, attn, 3, 1, 2), naive_outlook(v, attn, 3, 1, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------


def _leaf(*shape: int, seed: int) -> torch.Tensor:
    return randn(*shape, seed=seed).requires_grad_()


@pytest.mark.parametrize(
    ("b", "c", "h", "w", "g", "k", "s", "p", "d"),
    [
        pytest.param(2, 4, 5, 5, 2, 3, 1, 1, 1, id="b2-c4-5x5-g2-k3-s1"),
        pytest.param(1, 3, 6, 5, 1, 3, 2, 2, 2, id="b1-c3-6x5-g1-k3-s2-d2"),
    ],
)
def test_involution2d_gradcheck(b, c, h, w, g, k, s, p, d):
    ho, wo = conv_len(h, k, s, p, d), conv_len(w, k, s, p, d)
    x, weight = _leaf(b, c, h, w, seed=11), _leaf(b, g, k * k, ho, wo, seed=12)
    assert torch.autograd.gradcheck(lambda x, wt: involution2d(x, wt, k, s, p, d), (x, weight))


@pytest.mark.parametrize(
    ("b", "cin", "cout", "h", "w", "kh", "kw", "s", "p", "d", "g"),
    [
        pytest.param(2, 4, 2, 5, 5, 3, 3, (1, 1), (1, 1), (1, 1), 2, id="b2-4to2-g2-k3"),
        pytest.param(3, 2, 3, 6, 5, 2, 3, (2, 1), (0, 1), (1, 2), 1, id="b3-2to3-k2x3-s2x1-d1x2"),
    ],
)
def test_dynamic_conv2d_gradcheck(b, cin, cout, h, w, kh, kw, s, p, d, g):
    x, weight = _leaf(b, cin, h, w, seed=13), _leaf(b, cout, cin // g, kh, kw, seed=14)
    assert torch.autograd.gradcheck(lambda x, wt: dynamic_conv2d(x, wt, list(s), list(p), list(d), g), (x, weight))


@pytest.mark.parametrize(
    ("b", "c", "hh", "ww", "heads", "k", "p", "s"),
    [
        pytest.param(1, 2, 3, 3, 1, 3, 1, 1, id="b1-c2-3x3-h1-k3-s1"),
        pytest.param(2, 4, 5, 4, 2, 3, 1, 2, id="b2-c4-5x4-h2-k3-s2"),
    ],
)
def test_outlook_aggregate_gradcheck(b, c, hh, ww, heads, k, p, s):
    h, w = conv_len(hh, k, s, p, 1), conv_len(ww, k, s, p, 1)
    v, attn = _leaf(b, c, hh, ww, seed=15), _leaf(b, heads, h * w, k * k, k * k, seed=16)
    assert torch.autograd.gradcheck(lambda v, a: outlook_aggregate(v, a, k, p, s), (v, attn))


# --------------------------------------------------------------------------------------------------
# registration: opcheck, fake-kernel metadata, export with a dynamic batch
# --------------------------------------------------------------------------------------------------


def _op_cases():
    """(name, op, tensor args, non-tensor args, expected output shape without batch)."""
    return {
        "involution2d": (involution2d, ((3, 8, 7, 6), (3, 2, 9, 4, 3)), (3, 2, 1, 1), (8, 4, 3)),
        "dynamic_conv2d": (dynamic_conv2d, ((3, 4, 7, 6), (3, 6, 2, 3, 3)), ([2, 2], [1, 1], [1, 1], 2), (6, 4, 3)),
        "outlook_aggregate": (outlook_aggregate, ((3, 4, 7, 6), (3, 2, 12, 9, 9)), (3, 1, 2), (4, 7, 6)),
    }


OP_NAMES = ["involution2d", "dynamic_conv2d", "outlook_aggregate"]


OPCHECK_UTILS = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]


@pytest.mark.parametrize("test_util", OPCHECK_UTILS)
@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name, test_util):
    """``torch.library.opcheck``, one check at a time so that one failure does not hide the others:
    schema, autograd registration, fake kernel vs real kernel (shape, strides, storage offset) and
    AOT dispatch with dynamic shapes."""
    op, shapes, rest, _ = _op_cases()[name]
    tensors = [_leaf(*shape, seed=20 + i) for i, shape in enumerate(shapes)]
    assert torch.library.opcheck(op, (*tensors, *rest), test_utils=test_util) == {test_util: "SUCCESS"}


@pytest.mark.parametrize("name", OP_NAMES)
def test_output_metadata_matches_fake_kernel(name):
    """What compile/export assume about the output (from the fake kernel) must hold for the real one."""
    op, shapes, rest, _ = _op_cases()[name]
    tensors = [randn(*shape, seed=30 + i) for i, shape in enumerate(shapes)]
    real = op(*tensors, *rest)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(t) for t in tensors], *rest)
    assert (real.shape, real.dtype) == (fake.shape, fake.dtype)
    assert (real.stride(), real.storage_offset()) == (fake.stride(), fake.storage_offset()), (
        f"{name}: real output has stride {real.stride()} and storage offset {real.storage_offset()}, "
        f"the fake kernel promises stride {fake.stride()} and storage offset {fake.storage_offset()}"
    )


class _Call(torch.nn.Module):
    def __init__(self, op, rest):
        super().__init__()
        self.op, self.rest = op, rest

    def forward(self, a, b):
        return self.op(a, b, *self.rest)


@pytest.mark.parametrize("name", OP_NAMES)
def test_export_with_dynamic_batch(name):
    op, shapes, rest, tail = _op_cases()[name]
    tensors = tuple(randn(*shape, seed=40 + i) for i, shape in enumerate(shapes))
    batch = Dim("batch", min=1, max=64)
    ep = torch.export.export(_Call(op, rest), tensors, dynamic_shapes=({0: batch}, {0: batch}))

    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    in_batch = placeholders[0].meta["val"].shape[0]
    assert isinstance(in_batch, torch.SymInt)
    (out_node,) = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    val = out_node.meta["val"]
    assert isinstance(val.shape[0], torch.SymInt), f"batch was specialised to {val.shape[0]}"
    assert str(val.shape[0]) == str(in_batch)
    assert tuple(val.shape[1:]) == tail
    assert val.dtype == F64
    assert any(f"attn_export.{name}" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    rng = ep.range_constraints[in_batch.node.expr]
    assert (int(rng.lower), int(rng.upper)) == (1, 64)

    # the exported program runs at other batch sizes and agrees with eager
    for b in (1, 5):
        args = tuple(randn(b, *shape[1:], seed=50 + i) for i, shape in enumerate(shapes))
        out = ep.module()(*args)
        assert out.shape == (b, *tail)
        torch.testing.assert_close(out, op(*args, *rest), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------------------


def _t(*shape: int) -> torch.Tensor:
    return randn(*shape, seed=60)


ERROR_CASES = [
    pytest.param(lambda: involution2d(_t(2, 8, 5), _t(2, 2, 9, 5, 5), 3, 1, 1, 1), r"x must be 4-D", id="inv-x-rank"),
    pytest.param(
        lambda: involution2d(_t(2, 8, 5, 5), _t(2, 2, 9, 25), 3, 1, 1, 1), r"weight must be 5-D", id="inv-w-rank"
    ),
    pytest.param(
        lambda: involution2d(_t(2, 6, 5, 5), _t(2, 4, 9, 5, 5), 3, 1, 1, 1),
        r"channels \(6\) must be divisible by the groups in weight \(4\)",
        id="inv-groups",
    ),
    pytest.param(
        lambda: involution2d(_t(2, 8, 5, 5), _t(2, 2, 9, 4, 4), 3, 1, 1, 1),
        r"does not fit x .* expected \(2, 2, 9, 5, 5\)",
        id="inv-w-spatial",
    ),
    pytest.param(
        lambda: involution2d(_t(2, 8, 5, 5), _t(2, 2, 25, 5, 5), 3, 1, 1, 1),
        r"expected \(2, 2, 9, 5, 5\)",
        id="inv-w-taps",
    ),
    pytest.param(
        lambda: involution2d(_t(2, 8, 5, 5), _t(3, 2, 9, 5, 5), 3, 1, 1, 1),
        r"expected \(2, 2, 9, 5, 5\)",
        id="inv-w-batch",
    ),
    pytest.param(
        lambda: involution2d(_t(2, 8, 5, 5), _t(2, 2, 9, 5, 5), 3, 0, 1, 1),
        r"need kernel_size, stride, dilation >= 1 and padding >= 0",
        id="inv-stride0",
    ),
    pytest.param(
        lambda: dynamic_conv2d(_t(2, 4, 5), _t(2, 4, 4, 3, 3), [1, 1], [0, 0], [1, 1], 1),
        r"x must be 4-D",
        id="dc-x-rank",
    ),
    pytest.param(
        lambda: dynamic_conv2d(_t(2, 4, 5, 5), _t(4, 4, 3, 3), [1, 1], [0, 0], [1, 1], 1),
        r"weight must be 5-D .* one kernel per sample",
        id="dc-w-rank",
    ),
    pytest.param(
        lambda: dynamic_conv2d(_t(2, 4, 5, 5), _t(2, 4, 4, 3, 3), [1], [0, 0], [1, 1], 1),
        r"stride must be two ints >= 1",
        id="dc-stride-len",
    ),
    pytest.param(
        lambda: dynamic_conv2d(_t(2, 4, 5, 5), _t(2, 4, 4, 3, 3), [1, 1], [-1, 0], [1, 1], 1),
        r"padding must be two ints >= 0",
        id="dc-padding-neg",
    ),
    pytest.param(
        lambda: dynamic_conv2d(_t(2, 4, 5, 5), _t(2, 4, 4, 3, 3), [1, 1], [0, 0], [0, 1], 1),
        r"dilation must be two ints >= 1",
        id="dc-dilation0",
    ),
    pytest.param(
        lambda: dynamic_conv2d(_t(2, 4, 5, 5), _t(2, 6, 1, 3, 3), [1, 1], [0, 0], [1, 1], 3),
        r"groups=3 must divide in channels \(4\)",
        id="dc-groups-in",
    ),
    pytest.param(
        lambda: dynamic_conv2d(_t(2, 4, 5, 5), _t(2, 5, 2, 3, 3), [1, 1], [0, 0], [1, 1], 2),
        r"groups=2 must divide .* out channels \(5\)",
        id="dc-groups-out",
    ),
    pytest.param(
        lambda: dynamic_conv2d(_t(2, 4, 5, 5), _t(2, 6, 2, 3, 3), [1, 1], [0, 0], [1, 1], 1),
        r"does not fit x .* expected \(2, C_out, 4, kH, kW\)",
        id="dc-w-cin",
    ),
    pytest.param(
        lambda: dynamic_conv2d(_t(2, 4, 5, 5), _t(3, 6, 4, 3, 3), [1, 1], [0, 0], [1, 1], 1),
        r"expected \(2, C_out, 4, kH, kW\)",
        id="dc-w-batch",
    ),
    pytest.param(
        lambda: dynamic_conv2d(_t(2, 4, 3, 3), _t(2, 6, 4, 5, 5), [1, 1], [0, 0], [1, 1], 1),
        r"smaller than the kernel 5x5",
        id="dc-too-small",
    ),
    pytest.param(
        lambda: outlook_aggregate(_t(2, 4, 25), _t(2, 2, 25, 9, 9), 3, 1, 1), r"v must be 4-D", id="ol-v-rank"
    ),
    pytest.param(
        lambda: outlook_aggregate(_t(2, 4, 5, 5), _t(2, 25, 9, 9), 3, 1, 1), r"attn must be 5-D", id="ol-attn-rank"
    ),
    pytest.param(
        lambda: outlook_aggregate(_t(2, 6, 5, 5), _t(2, 4, 25, 9, 9), 3, 1, 1),
        r"channels \(6\) must be divisible by the heads in attn \(4\)",
        id="ol-heads",
    ),
    pytest.param(
        lambda: outlook_aggregate(_t(2, 4, 5, 5), _t(2, 2, 25, 9, 9), 3, 1, 2),
        r"does not fit v .* expected \(2, 2, 9, 9, 9\)",
        id="ol-attn-grid",
    ),
    pytest.param(
        lambda: outlook_aggregate(_t(2, 4, 5, 5), _t(2, 2, 25, 4, 4), 3, 1, 1),
        r"expected \(2, 2, 25, 9, 9\)",
        id="ol-attn-taps",
    ),
    pytest.param(
        lambda: outlook_aggregate(_t(2, 4, 5, 5), _t(2, 2, 25, 9, 9), 3, -1, 1),
        r"need kernel_size, stride >= 1 and padding >= 0",
        id="ol-padding-neg",
    ),
]


@pytest.mark.parametrize(("call", "match"), ERROR_CASES)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
