"""A small subset of kvmem's CUDA and Triton calls for `compute-sanitizer --tool memcheck`
(benchmarks/gpu_check.sh runs it with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so reads past a tensor
are not hidden inside the caching allocator's blocks): odd shapes, page sizes 1 and 16, split and
unsplit decode, strided (interleaved) caches, a GQA group of 12 (head chunks), and q rows past
cu_seqlens_q[-1] (padding, check=False)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import kvmem  # noqa: E402
from cases import make_case  # noqa: E402

for backend in ("cuda", "triton"):
    os.environ["KVMEM_BACKEND"] = backend
    for dtype in (torch.bfloat16, torch.float16):
        for block_size in (1, 16):
            for q_lens, kv_lens in (([1, 1, 1], [1, 77, 1300]), ([3, 1], [40, 9])):
                case = make_case(q_lens, kv_lens, num_heads=12, num_kv_heads=4, head_dim=80, block_size=block_size,
                                 dtype=dtype, window=50, softcap=20.0, sink=True, strided=True, device="cuda")
                out, lse = kvmem.paged_attention(*case.args(), **case.kwargs, return_lse=True)
                ref, _ = case.reference()
                torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    case = make_case([1, 2], [2000, 33], num_heads=24, num_kv_heads=2, head_dim=128, block_size=16,
                     dtype=torch.bfloat16, sink=True, device="cuda")
    q = torch.cat([case.q, torch.zeros(3, 24, 128, dtype=torch.bfloat16, device="cuda")])  # 3 padding rows
    kvmem.paged_attention(q, *case.args()[1:], **case.kwargs, check=False)
    k_cache = torch.zeros(5, 16, 4, 80, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    kv = torch.randn(9, 8, 80, dtype=torch.bfloat16, device="cuda")
    kvmem.cache_write(kv[:, :4], kv[:, 4:], k_cache, v_cache, torch.tensor([0, 3, -1, 17, 33, 79, 5, 6, -1], device="cuda"))
    o = torch.randn(9, 4, 80, dtype=torch.bfloat16, device="cuda")
    l = torch.randn(9, 4, device="cuda")
    kvmem.merge_states(o, l, o, l)
torch.cuda.synchronize()
print("sanitize subset ran")
