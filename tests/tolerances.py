"""Per-dtype tolerances: the one place every backend test takes them from.

Backends and the reference both compute in fp32 from the same low-precision inputs; what differs
is summation order (fp32 noise) and the final rounding of ``out`` to its dtype (one ulp of the
output dtype relative to values of order 1). lse stays fp32 for every dtype.
"""

import torch

OUT = {
    torch.float32: dict(atol=3e-5, rtol=3e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
LSE = dict(atol=5e-5, rtol=5e-5)
# The reference checked against dense SDPA (both fp32 math, different kernels).
DENSE = dict(atol=2e-5, rtol=2e-5)

# Triton kernels (tests/ops/test_paged_attention_triton.py, the ops' Triton cases, and the
# forced-Triton dispatch test): fp32 tiles go through tl.dot and the interpreter's numpy matmuls,
# a summation order further from the reference's than the C++ kernels' (hence fp32 looser than
# OUT); low precision is bounded by the output rounding.
TRITON_OUT = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
TRITON_LSE = dict(atol=2e-4, rtol=2e-4)
# merge_states of an fp32 partial with itself: weights exp(lse - lse - log 2) = 1/2 up to exp's
# rounding, so the merge returns the partial to a few fp32 ulps.
MERGE_SELF_FP32 = dict(atol=1e-5, rtol=1e-5)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, what: str = "out", **override):
    """``torch.testing.assert_close`` with kvmem's tolerances for ``expected``'s dtype."""
    tol = dict(LSE if what == "lse" else OUT[expected.dtype])
    tol.update(override)
    torch.testing.assert_close(actual, expected, equal_nan=False, msg=lambda m: f"{what}: {m}", **tol)

# fp8 (e4m3) quantised caches vs the unquantised fp32 reference, for unit-variance K/V: 3 mantissa
# bits, relative rounding error up to 2**-4 per stored element (|v| up to ~3.5 -> ~0.2 worst
# single element), averaged down by the softmax-weighted sum.
FP8_E4M3 = dict(atol=1e-1, rtol=1e-1)
