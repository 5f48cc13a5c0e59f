"""The Hugging Face transformers integration of kvmem.

Modules, each importing only those before it (one direction, no cycles):

``compat``       every transformers-version shim (the cache's keyword name, interfaces, classes)
``options``      ``KvmemOptions``: what ``kvmem.patch`` stores on a model
``context``      ``StepContext``: the hand-over of a step's keys to the attention function (the one
                 thread-local slot)
``fingerprint``  ``model_fingerprint``: the key of everything never reused across models
``steps``        the ``PagedKVCache`` step machine (planning, the layer step, static decode steps)
``rows``         ``PagedKVCache`` row operations (prefix reuse, crop, beam-search reordering)
``cache``        ``PagedKVCache``: the transformers ``Cache``
``attention``    the ``"kvmem"`` attention and mask functions
``graphs``       ``DecodeGraphRunner``: static decode steps (CUDA graphs / torch.compile)
``generate``     the cache ``generate()`` builds, and its hook
``patch``        ``patch`` / ``unpatch`` / ``register``
``calibrate``    ``calibrate_kv_scales``: static float8 KV scales from one forward

The layer step itself (write -> evict/summarise -> select -> attend) is ``kvmem.layer`` (torch
only); pool sizing, ``KVPool`` and the static decode buffers are ``kvmem.cache``.
"""

from kvmem.integrations.hf.cache import PagedKVCache
from kvmem.integrations.hf.calibrate import calibrate_kv_scales
from kvmem.integrations.hf.fingerprint import model_fingerprint
from kvmem.integrations.hf.generate import model_layer_devices
from kvmem.integrations.hf.graphs import DecodeGraphRunner
from kvmem.integrations.hf.options import KvmemOptions, options_of
from kvmem.integrations.hf.patch import is_patched, is_registered, patch, register, unpatch

__all__ = ["patch", "unpatch", "is_patched", "register", "is_registered", "PagedKVCache", "DecodeGraphRunner",
           "KvmemOptions", "options_of", "model_fingerprint", "model_layer_devices", "calibrate_kv_scales"]
