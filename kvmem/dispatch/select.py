"""Choosing a backend for a call: the order, ``KVMEM_BACKEND``, explanations, one log line per
fallback."""

from __future__ import annotations

import functools
import logging
from typing import Dict, Optional

from kvmem.dispatch.backends import BACKENDS, BY_NAME, Backend, forced
from kvmem.dispatch.call import Call

logger = logging.getLogger("kvmem")

_logged: set = set()


@functools.lru_cache(maxsize=4096)
def _select(call: Call, forced_name: Optional[str]) -> Backend:
    if forced_name is not None:
        backend = BY_NAME[forced_name]
        why = backend.rejects(call)
        if why is not None:
            raise RuntimeError(f"KVMEM_BACKEND={forced_name} cannot run {call.op} here: {why[1]}")
        return backend
    fallbacks = []
    for backend in BACKENDS:
        why = backend.rejects(call)
        if why is None:
            for name, reason in fallbacks:
                key = (call.op, name, reason)  # once per reason, not per query length
                if key not in _logged:
                    _logged.add(key)
                    logger.warning("kvmem: %s falls back from %s to %s: %s", call.op, name, backend.name, reason)
            return backend
        if why[0] == "fallback":
            fallbacks.append((backend.name, why[1]))
    raise AssertionError("the reference backend accepts every call")


def select(call: Call) -> Backend:
    """The backend that runs ``call`` (cached per call signature and KVMEM_BACKEND)."""
    return _select(call, forced())


def explain(call: Call) -> Dict[str, str]:
    """For each backend, fastest first: 'selected', 'capable (not chosen)' or why it was rejected.

    When ``KVMEM_BACKEND`` forces a backend that cannot run ``call`` (the call itself would raise),
    that backend reads 'rejected (forced by KVMEM_BACKEND=<name>): <why>' and every other backend
    still says why it was or was not capable."""
    forced_name = forced()
    forced_why = BY_NAME[forced_name].rejects(call) if forced_name is not None else None
    chosen = None if forced_why is not None else select(call).name
    result = {}
    for backend in BACKENDS:
        why = forced_why if backend.name == forced_name else backend.rejects(call)
        if backend.name == chosen:
            result[backend.name] = "selected"
        elif backend.name == forced_name:
            # Starts with 'rejected' like every rejection (the demo and bench skip on that).
            result[backend.name] = f"rejected (forced by KVMEM_BACKEND={forced_name}): {why[1]}"
        elif why is None:
            result[backend.name] = "capable (not chosen)"
        else:
            result[backend.name] = f"rejected: {why[1]}"
    return result
