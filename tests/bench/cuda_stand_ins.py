"""Stand-ins shared by the tests of ``attn-export bench --device cuda``: a timer that only counts, and
tiny op shapes that run on the CPU (the Triton kernels in the interpreter)."""

from __future__ import annotations

from attn_export.bench.cuda_sections import OpCase


class CountingTimer:
    def __init__(self, ms: float = 2.0) -> None:
        self.ms, self.calls = ms, 0

    def __call__(self, fn) -> float:
        self.calls += 1
        fn()
        return self.ms


TINY = [
    OpCase("involution", "involution tiny", 2, 4, 7, 9, 3, 1, 2),
    OpCase("dynamic_conv", "dynamic_conv tiny", 2, 4, 7, 5, 3, 1, 2, 6),
    OpCase("outlook", "outlook tiny s2", 1, 4, 7, 9, 3, 2, 2),
]
PEAKS = {"copy_gbps": 100.0, "matmul_fp32_tflops": 1.0, "matmul_tf32_tflops": 2.0}
