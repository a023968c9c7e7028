"""The Triton kernels compile for Hopper (sm_90) in bf16, and the implicit GEMMs in TF32/fp16/bf16, with no GPU.

The interpreter runs kernel bodies as numpy and never sees what only the compiler does (type rules of
loop-carried values, layouts, ``tl.dot`` lowering), so compiling is a check of its own. Triton's own
toolchain (``ptxas`` ships in its wheel) compiles for a named target without a driver; this runs in a
subprocess because the test process has ``TRITON_INTERPRET=1``. The implicit GEMM must reach the
tensor cores: ``wgmma`` on sm_90 for TF32, fp16 and bf16, on NCHW and on channels-last operands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from attn_export.plugins.dynamic_conv.cuda_kernel import _dynamic_conv2d_igemm, _dynamic_conv2d_igemm_cl
    from attn_export.plugins.involution.cuda_kernel import _involution2d_fwd, _involution2d_rows
    from attn_export.plugins.outlook.cuda_kernel import _outlook_aggregate_fwd, _outlook_rows

    target = GPUTarget("cuda", 90, 32)

    def build(fn, ptrs, ints, dt, constexprs, warps=4, stages=3):
        sig = {p: f"*{dt}" for p in ptrs}
        sig.update(dict.fromkeys(ints, "i32"))
        sig.update(dict.fromkeys(constexprs, "constexpr"))
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        c = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
        ptx = c.asm["ptx"]
        return {"wgmma": "wgmma" in ptx, "entry": ".entry" in ptx, "shfl": "shfl.sync" in ptx}

    out = {}
    # the TensorRT test compiles the plugin kernels in fp32/fp16 for sm_80; here bf16 and the GEMM
    out["outlook/bf16/s2"] = build(
        _outlook_aggregate_fwd, ("v_ptr", "attn_ptr", "out_ptr"),
        ("C", "H", "W", "GH", "GW", "HEADS", "CH", "n_pblk", "n_cblk"), "bf16",
        {"K": 3, "PAD": 1, "STRIDE": 2, "BLOCK_C": 32, "BLOCK_P": 64})
    out["outlook-rows/bf16/s2"] = build(
        _outlook_rows, ("v_ptr", "attn_ptr", "out_ptr"),
        ("C", "H", "W", "GH", "GW", "HEADS", "CH", "n_tile", "n_xblk", "n_cblk"), "bf16",
        {"K": 3, "PAD": 1, "STRIDE": 2, "BLOCK_C": 32, "BLOCK_V": 32, "BLOCK_J": 16, "ROWS": 8,
         "KK2P": 128}, warps=8)
    out["involution/bf16/k7"] = build(
        _involution2d_fwd, ("x_ptr", "w_ptr", "out_ptr"),
        ("C", "H", "W", "Ho", "Wo", "G", "CG", "n_pblk", "n_cblk"), "bf16",
        {"STRIDE": 1, "PAD": 3, "DIL": 1, "K": 7, "BLOCK_C": 16, "BLOCK_P": 128, "SAME": True})
    out["involution-rows/bf16/k7"] = build(
        _involution2d_rows, ("x_ptr", "w_ptr", "out_ptr"),
        ("C", "H", "W", "Ho", "Wo", "G", "CG", "n_hblk", "n_cblk"), "bf16",
        {"STRIDE": 1, "PAD": 3, "DIL": 1, "K": 7, "BLOCK_C": 16, "BLOCK_W": 64, "BLOCK_WIN": 64, "ROWS": 2},
        warps=2)
    conv_ints = ("CIN", "H", "W", "COUT", "HO", "WO", "GROUPS", "CIN_G", "COUT_G")
    geom = dict(SH=2, SW=1, PH=1, PW=1, DH=1, DW=2, KH=3, KW=3)
    for dt in ("fp32", "fp16", "bf16"):
        precision = "tf32" if dt == "fp32" else None
        for name, fn in (("igemm", _dynamic_conv2d_igemm), ("igemm_cl", _dynamic_conv2d_igemm_cl)):
            out[f"{name}/{dt}"] = build(
                fn, ("x_ptr", "w_ptr", "out_ptr"), conv_ints, dt,
                dict(geom, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, DOT_PRECISION=precision, UPCAST=False))
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_the_gemm_uses_tensor_cores():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        if "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
            pytest.skip("Triton's ptxas is not available here")
        pytest.fail(f"compilation failed:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[0][len("RESULT") :])
    assert len(result) == 10 and all(info["entry"] for info in result.values())
    assert result["involution-rows/bf16/k7"]["shfl"], "the row gather should stay inside a warp (shuffles)"
    assert result["outlook-rows/bf16/s2"]["shfl"], "the window-row gathers should stay inside a warp (shuffles)"
    assert all(result[f"{k}/{dt}"]["wgmma"] for k in ("igemm", "igemm_cl") for dt in ("fp32", "fp16", "bf16")), result
