"""Backends and the dispatcher (public facade of :mod:`kvmem.dispatch`).

``kvmem.backends.explain(kvmem.backends.Call.paged_attention(q, k_cache, v_cache, max_seqlen_q,
window=128))`` says, for a call, why each backend was taken or rejected; ``KVMEM_BACKEND`` forces
one. What each backend runs of each op is declared as data in the op folders
(``kvmem/ops/<op>/capabilities.py``).
"""

from kvmem.dispatch import (BACKENDS, BY_NAME, Backend, Call, Capability, CompiledBackend, CpuBackend,  # noqa: F401
                            CudaBackend, ReferenceBackend, Rejection, TritonBackend, _logged, _select,
                            capability, explain, logger, select)

__all__ = ["BACKENDS", "BY_NAME", "Backend", "Call", "Capability", "CompiledBackend", "CpuBackend",
           "CudaBackend", "ReferenceBackend", "Rejection", "TritonBackend", "capability", "explain", "select"]
