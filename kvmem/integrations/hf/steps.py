"""The step machine of ``PagedKVCache``: planning, the eager layer step, static decode steps.

How a forward step runs
-----------------------
HF's attention modules call ``cache.update(k, v, layer_idx)`` and then the attention function
registered as ``"kvmem"`` (``kvmem.integrations.hf.attention.kvmem_attention_forward``). The cache
does not copy anything in ``update``: it stashes the new ``k``/``v`` ``[B, Hkv, S, D]`` in the
step's ``StepContext`` (``kvmem.integrations.hf.context``) and returns them unchanged. The
attention function of the same layer takes them back from the context and calls
``PagedKVCache.attend_layer``, which

1. on the step's first layer, *plans* the step: each batch row is a kvmem sequence; the 2D
   ``attention_mask`` (from kvmem's mask function: lengths/padding only, never an L x L mask) says
   which of the ``S`` new tokens of each row are real; ``KVCacheManager.plan`` reserves their slots
   (all or nothing: ``CacheFullError`` leaves the cache unchanged) and pending copy-on-write copies
   are applied to every layer's pools;
2. runs the layer step ``kvmem.layer.run_layer`` on the layer's real tokens (padding tokens get no
   slot and are never seen): ``cache_write``, then ``paged_attention`` for the layer's group (its
   sliding window, the module's softcap and sink logits). Decode steps whose rows share leading
   pages of a full-attention group run shared-prefix (cascade) decode there, decided at plan time
   on the host (``kvmem.integrations.hf.cascade``).

A new step starts when a layer that was already updated is updated again. The logical length
grows when the step's last layer has attended; a step that stopped half-way (an exception inside
the forward) is rolled back at the start of the next one.

Decode steps can also run *static* (``static_decode_step``, see ``kvmem.cache.static``): the host
plans before the forward and fills fixed-shape buffers in place, and the forward is device work
only (``StepContext.run_static``), so it can be captured in a CUDA graph or compiled with
``torch.compile(fullgraph=True)`` (``kvmem.integrations.DecodeGraphRunner`` /
``kvmem.patch(model, cuda_graph=True)`` do it for ``generate()``). One-token steps never read the
attention mask back to the host: it is checked on the device (``check_decode_mask``).
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import torch

from kvmem.cache.static import StaticDecodeBuffers, check_decode_mask
from kvmem.integrations.hf import cascade, context
from kvmem.integrations.hf.context import StepContext
from kvmem.layer import LayerAttention, run_layer, tokens

__all__ = []


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _StepMachine:
    """Mixin of ``PagedKVCache``: its step machine (the state is the cache's)."""

    # ------------------------------------------------------------------ static decode steps
    @contextlib.contextmanager
    def static_decode_step(self, attention_mask: Optional[torch.Tensor] = None):
        """Run one decode step (one new token per row) with fixed-shape metadata.

        The host half runs on entering: the allocator reserves this step's slots (``CacheFullError``
        leaves the cache unchanged), copy-on-write copies are applied and the step's metadata is
        copied in place into persistent buffers (``kvmem.cache.StaticDecodeBuffers``). Inside the block,
        call the model's forward with ``attention_mask=None`` and explicit ``position_ids``
        ``[rows, 1]``: ``update`` and the ``"kvmem"`` attention then do device work only, with no
        Python branching on tensor values and no host int that changes between steps, so the
        forward can be captured in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``
        without recompiles. On leaving, the step counts (``get_seq_length()`` grows by one); if the
        block raised, the step is rolled back.

        Parameters
        ----------
        attention_mask: None or the step's 2D mask ``[rows, seen + 1]`` (``generate()``'s): checked on
            the device (its new column real, earlier columns matching the rows' lengths), never read
            back to the host

        Yields
        ------
        the ``StaticDecodeBuffers`` (same object every step of a batch size)

        Raises
        ------
        RuntimeError
            before the first (prefill) step, or when the layers' pools are on several devices
        ValueError
            when a row would outgrow the buffers (``max_cache_len`` the cache was made for)
        """
        st, prev = self._prepare_static(attention_mask)
        ctx = StepContext(self, st.rows, 1, self.ops, self._position_embeddings, static=st)
        context.enter(ctx)
        st.active = True
        ok = False
        try:
            yield st
            ok = True
        finally:
            st.active = False
            context.leave(ctx)
            if ok:
                self._seen += 1
            else:
                self._rollback(prev)

    def pools_device(self) -> Optional[torch.device]:
        """The one device of every layer's pools, or None (pools not all allocated, or on several
        devices: a model split over GPUs), which static decode steps cannot run."""
        devices = {k.device for k, _ in self._pools.values()}
        if len(self._pools) < self.num_layers or len(devices) != 1:
            return None
        return next(iter(devices))

    def _static_width(self) -> int:
        """Blocks per row the static buffers address: the cache's ``max_cache_len`` (+1 block)."""
        bs = self.block_size
        if self._max_cache_len is not None:
            return _cdiv(int(self._max_cache_len) + 1, bs) + 1
        full = [self._manager.allocator(g.name).num_blocks for g in self.groups if g.window is None]
        if not full:
            raise ValueError("kvmem: static decode of a sliding-window-only model needs a PagedKVCache made with "
                             "max_cache_len= (generate() passes it)")
        return max(full)

    @torch.compiler.disable  # host-side bookkeeping: never traced
    def _prepare_static(self, mask: Optional[torch.Tensor]):
        if self._released:
            raise RuntimeError("kvmem: this PagedKVCache was released")
        cur = context.current()
        if cur is not None and cur.static is not None and cur.static.active:
            raise RuntimeError("kvmem: a static decode step is already in flight")
        self._finish_step()
        m = self._manager
        if m is None or not self._seq_ids or self._seen == 0:
            raise RuntimeError("kvmem: a static decode step continues a prefilled PagedKVCache; run the prompt "
                               "through the model first")
        B = len(self._seq_ids)
        device = self.pools_device()
        if device is None:
            devices = {k.device for k, _ in self._pools.values()}
            raise RuntimeError(f"kvmem: static decode steps need every layer's pools on one device "
                               f"(got {sorted(map(str, devices))} for {len(self._pools)} of {self.num_layers} layers)")
        st = self._static
        if st is None or st.rows != B or st.device != device:
            width = self._static_width()
            key = (B, width, device)
            st = None if self._pool is None else self._pool.static.get(key)
            if st is None:  # a pool's buffers outlive this cache: graphs captured on them stay valid
                st = StaticDecodeBuffers(self.groups, self.num_layers, B, width, self.block_size, device)
                if self._pool is not None:
                    self._pool.static[key] = st
            self._static = st
        st.pools = dict(self._pools)
        if self._scales is not None:  # fixed by the prefill: the same tensors every step (graph-safe)
            st.scales = {layer: self._scales.on(layer, device) for layer in range(self.num_layers)}
            st.centers = {layer: self._scales.center_of(layer, device) for layer in range(self.num_layers)}
        if mask is not None:
            self._check_mask_shape(mask, B, 1)
        prev = [m.seq_len(s) for s in self._seq_ids]
        need = max(prev) + 1
        if need > st.max_seqlen_k:
            raise ValueError(f"kvmem: a row reaches {need} tokens but this PagedKVCache's static decode buffers hold "
                             f"{st.max_seqlen_k} per row (make the cache with a larger max_cache_len)")
        plan = m.plan(self._seq_ids, [1] * B, device, max_blocks_per_seq=st.width)  # CacheFullError: unchanged
        if plan.copies:
            m.apply_copies(self._pools)
        st.fill(plan)
        if mask is not None:
            self._check_decode_mask(mask, st.seq_lens, prev)
        return st, prev

    def _check_mask_shape(self, mask, rows: int, new_tokens: int) -> None:
        """``mask`` must be ``[rows, seen + new_tokens]`` (generate()'s 2D padding mask)."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != rows:
            raise ValueError(f"kvmem: expected a 2D attention mask [batch={rows}, tokens], got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.shape[1] != self._seen + new_tokens:
            raise ValueError(f"kvmem: the attention mask has {mask.shape[1]} columns but the cache has seen "
                             f"{self._seen} tokens and this step adds {new_tokens}")

    def _check_decode_mask(self, mask: torch.Tensor, seq_lens: torch.Tensor, prev: List[int]) -> None:
        """Device-side check of a 1-token step's mask (``kvmem.cache.static.check_decode_mask``), the step's
        reservation already made: on CPU a failure rolls it back to ``prev`` and raises ValueError;
        on a GPU it is a device assert."""
        try:
            check_decode_mask(mask, seq_lens)
        except RuntimeError as e:  # CPU: raised at once; undo the reservation
            self._rollback(prev)
            if mask.device.type != "cpu":
                raise
            raise ValueError(str(e)) from None

    def _rollback(self, prev: List[int]) -> None:
        """Truncate every row back to ``prev`` (a step that did not complete)."""
        for s, L in zip(self._seq_ids, prev):
            if self._manager.seq_len(s) > L:
                self._manager.truncate(s, L)
        if self._pool is not None:  # blocks registered at plan time were never (fully) written
            self._manager.reset_prefix_cache()
        if self._bank is not None:  # the step's evictions too
            self._bank.rollback()

    # ------------------------------------------------------------------ kvmem attention
    def attend_layer(self, step: StepContext, layer_idx: int, query: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], attention: LayerAttention) -> torch.Tensor:
        """Plan the step (its first layer), then run the layer step (``kvmem.layer.run_layer``) over the
        layer's stashed keys/values (see the module docstring).

        Parameters
        ----------
        step: the ``StepContext`` whose ``take(layer_idx, key)`` held
        query: [batch, num_heads, new_tokens, head_dim]
        attention_mask: [batch, seen + new_tokens] bool (True = real token) or None (no padding)
        attention: the module's ``LayerAttention``; its window must be the layer group's

        Returns
        -------
        out: [batch, new_tokens, num_heads, head_dim] (0 at padding positions)
        """
        window = attention.window
        key, value = step.pending.pop(layer_idx)
        if step.plan is None:
            try:
                self._plan(step, attention_mask)
            except BaseException:
                step.pending[layer_idx] = (key, value)
                raise
        md = step.plan.for_layer(layer_idx)
        k_cache, v_cache = self._layer_pools(layer_idx, key.device)
        if k_cache.device != md.device:  # a layer on another GPU: its own copy of the metadata, once a step
            ck = (step.plan.layer_to_group[layer_idx], k_cache.device)
            if ck not in self._step_md:
                self._step_md[ck] = md.to(k_cache.device)
            md = self._step_md[ck]
        if window != md.window:
            raise ValueError(
                f"kvmem: layer {layer_idx} attends with sliding_window={window} but this PagedKVCache was built "
                f"with window {md.window} for it (from the config's layer_types/sliding_window); was the cache made "
                f"for another model?")
        B, Hq, S, D = query.shape
        index = step.index
        if index is not None and index.device != query.device:
            ck = ("index", query.device)
            if ck not in self._step_md:
                self._step_md[ck] = index.to(query.device, non_blocking=True)
            index = self._step_md[ck]
        # keys/values in the model's dtype; the pools may hold another (converted as written / read)
        bank = self._bank
        if bank is not None and layer_idx in bank.layers:  # the memory bank (kvmem.integrations.hf.memory)
            out = bank.run(self.ops, step, layer_idx, query, key, value, index, k_cache, v_cache, md, attention,
                           scales=self.layer_scales, keys=self.layer_keys)
        else:
            q, k, v = tokens(query, index), tokens(key, index), tokens(value, index)
            ks, vs = self.layer_scales(layer_idx, k, v, attention.softcap is None and attention.sink_logits is None)
            k = self.layer_keys(layer_idx, k)  # centred keys (kvmem.cache.scales): scores shift by q.mu per query
            out = run_layer(self.ops, q, k, v, k_cache, v_cache, md, attention, step.layer_context(layer_idx),
                            k_scale=ks, v_scale=vs)
        step.done.add(layer_idx)
        if len(step.done) == self.num_layers:
            self._seen += S  # the step is complete
            context.leave(step)
            if bank is not None:
                bank.finish(step)
        if index is not None:
            full = out.new_zeros(B * S, Hq, D)
            full.index_copy_(0, index, out)
            out = full
        return out.view(B, S, Hq, D)

    @torch.compiler.disable  # host-side bookkeeping: never traced (torch.compile'd models)
    def _begin_step(self, key: torch.Tensor) -> StepContext:
        self._finish_step()
        B, _, S, _ = key.shape
        if self._manager is None:
            self._allocate(B, S, self._dtype or key.dtype, self._device or key.device)
        self._step = StepContext(self, B, S, self.ops, self._position_embeddings)
        return self._step

    @torch.compiler.disable  # host-side bookkeeping: never traced (torch.compile'd models)
    def _finish_step(self) -> None:
        """Close the step in flight; roll it back if it stopped half-way."""
        step, self._step = self._step, None
        if step is not None:
            context.leave(step)
        if step is None or step.plan is None or len(step.done) == self.num_layers:
            return
        self._rollback(step.prev_lens)

    @torch.compiler.disable  # host-side bookkeeping: never traced (torch.compile'd models)
    def _plan(self, step: StepContext, mask: Optional[torch.Tensor]) -> None:
        B, S = step.batch, step.q_len
        m = self._manager
        if not self._seq_ids:
            for _ in range(B):
                sid = next(self._ids)
                m.add_sequence(sid)
                self._seq_ids.append(sid)
        elif len(self._seq_ids) != B:
            raise ValueError(f"kvmem: the batch changed from {len(self._seq_ids)} to {B} rows; change it with "
                             f"reorder_cache / batch_select_indices / batch_repeat_interleave")
        prev = [m.seq_len(s) for s in self._seq_ids]
        nums, index = [S] * B, None
        if mask is not None:
            self._check_mask_shape(mask, B, S)
            N = mask.shape[1]
            if S == 1:  # decode: check on the device, never read the mask back (no host sync)
                plan = m.plan(self._seq_ids, nums)  # CacheFullError: nothing changed
                self._check_decode_mask(mask, plan.groups[self.groups[0].name].seq_lens, prev)
                self._commit_plan(step, plan, None, prev, nums)
                return
            mask = mask.to(torch.bool)
            new = mask[:, N - S:]
            counts = torch.stack([new.sum(1), mask[:, : N - S].sum(1)]).cpu().tolist()
            nums, past = counts
            if past != prev:
                raise ValueError(
                    f"kvmem: the attention mask marks {past} earlier real tokens per row but the cache holds "
                    f"{prev}: kvmem drops padding when tokens are added and cannot mask tokens it already holds")
            if any(n != S for n in nums):
                index = new.reshape(-1).nonzero().flatten()
        plan = m.plan(self._seq_ids, nums)  # CacheFullError: nothing changed
        self._commit_plan(step, plan, index, prev, nums)

    def _commit_plan(self, step: StepContext, plan, index, prev: List[int], nums: List[int]) -> None:
        m = self._manager
        self._step_md = {}
        if plan.copies:
            for layer in range(self.num_layers):  # copy-on-write needs every layer's pools
                self._layer_pools(layer, m.device)
            m.apply_copies(self._pools)
        step.plan, step.index, step.prev_lens = plan, index, prev
        bank = self._bank
        if index is None and bank is None:  # decode rows sharing leading pages: shared-prefix decode
            cascade.plan_step(m, self.groups, self._seq_ids, plan, prev, nums, how=self._cascade)
        if bank is not None:  # the step's memory tables: host, once per step, shared by every memory layer
            full = self._bank_group
            tables = [m.block_table(s, full) for s in self._seq_ids]
            step.memory = bank.plan(tables, prev, nums, plan.groups[full].block_table.device)
