"""The implementations the harness times on one :class:`~kvmem.bench.inputs.PagedBatch`.

kvmem's own backends (each forced through ``KVMEM_BACKEND`` while it runs) and the peers:
torch SDPA per backend on a contiguous copy, FlexAttention (on a contiguous copy, and
``flex[paged]`` directly on kvmem's pages through a BlockMask built from the block table), and
FlashInfer / flash-attn when they are importable. A builder returns ``(impls, skipped)``: what can run, and
``(name, reason)`` for what cannot.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

import kvmem
from kvmem import backends

Skipped = List[Tuple[str, str]]


@dataclass
class Impl:
    """One timed implementation.

    Attributes
    ----------
    name : str
        Label in the table, e.g. ``kvmem[cpu]`` or ``sdpa[math]``.
    fn : callable
        Runs the attention once and returns its output.
    tokens : callable
        Maps ``fn()``'s output to kvmem's ``[num_tokens, Hq, D]`` layout (for the correctness guard).
    kvmem : bool
        True for kvmem's own backends, False for peers.
    env : str or None
        ``KVMEM_BACKEND`` value to hold while ``fn`` runs.
    note : str
        Extra detail shown in the table (auto-selected, GQA by repeat, eager, ...).
    """

    name: str
    fn: Callable[[], torch.Tensor]
    tokens: Callable[[torch.Tensor], torch.Tensor]
    kvmem: bool = False
    env: Optional[str] = None
    note: str = ""

    def context(self):
        """The context to run ``fn`` in (the forced kvmem backend, warnings silenced)."""
        return _running(self.env)


@contextlib.contextmanager
def _running(env: Optional[str]):
    old = os.environ.get("KVMEM_BACKEND")
    if env is not None:
        os.environ["KVMEM_BACKEND"] = env
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if env is not None:
            if old is None:
                os.environ.pop("KVMEM_BACKEND", None)
            else:
                os.environ["KVMEM_BACKEND"] = old


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (short, for a skip reason)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


def kvmem_impls(b, *, causal: bool = True, include_reference: bool = False,
                only: Optional[List[str]] = None) -> Tuple[List[Impl], Skipped]:
    """kvmem's backends for this batch.

    Parameters
    ----------
    b : PagedBatch
    causal : bool
    include_reference : bool
        Also time the pure-PyTorch reference backend (slow; excluded by default).
    only : list of str, optional
        Force exactly these backends (even ones ``explain`` rejects unforced, e.g. an unverified
        CUDA build); a backend that refuses even when forced is reported as skipped.

    Returns
    -------
    (impls, skipped)
    """
    call = backends.Call.paged_attention(b.q, b.k_cache, b.v_cache, b.max_seqlen_q)
    saved = os.environ.pop("KVMEM_BACKEND", None)  # explain the automatic choice
    try:
        verdicts = backends.explain(call)
    finally:
        if saved is not None:
            os.environ["KVMEM_BACKEND"] = saved
    out = torch.empty_like(b.q)
    scale = b.q.shape[-1] ** -0.5
    impls, skipped = [], []
    names = only if only else list(verdicts)
    for name in names:
        verdict = verdicts.get(name, "rejected: unknown backend")
        if only:
            try:
                with _running(name):
                    backends.select(call)
            except (RuntimeError, ValueError) as e:
                skipped.append((f"kvmem[{name}]", str(e)[:160]))
                continue
        elif verdict.startswith("rejected"):
            skipped.append((f"kvmem[{name}]", verdict))
            continue
        elif name == "reference" and not include_reference:
            skipped.append(("kvmem[reference]", "excluded (pass --include-reference)"))
            continue
        def fn():
            return kvmem.paged_attention(*b.args(), scale=scale, causal=causal, out=out, check=False)
        impls.append(Impl(f"kvmem[{name}]", fn, lambda o: o, kvmem=True, env=name,
                          note="auto" if verdict == "selected" else ""))
    return impls, skipped


def _sdpa_backends(device_type: str):
    from torch.nn.attention import SDPBackend

    if device_type == "cuda":
        return [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    return [("default", None), ("math", SDPBackend.MATH)]


def sdpa_impls(b, dense, *, causal: bool = True) -> Tuple[List[Impl], Skipped]:
    """torch SDPA, one entry per SDPA backend that accepts the call (``sdpa_kernel``).

    GQA goes through ``enable_gqa=True``; a backend that refuses it gets K/V repeated to the
    query heads (``repeat_interleave``, done once outside the timing).
    """
    from torch.nn.attention import sdpa_kernel

    q, k, v = dense
    is_causal, mask = b.dense_mask(causal)
    group = q.shape[1] // k.shape[1]
    repeated = None
    impls, skipped = [], []
    for label, backend in _sdpa_backends(q.device.type):
        ctx = (lambda bk=backend: sdpa_kernel([bk])) if backend is not None else contextlib.nullcontext

        def make(kk, vv, gqa, ctx=ctx):
            def fn():
                with ctx():
                    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=is_causal,
                                                          enable_gqa=gqa)
            return fn

        fn, note, errors = None, "", []
        for attempt in ("gqa", "repeat"):
            if attempt == "repeat":
                if group == 1:
                    break
                if repeated is None:
                    repeated = (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
                cand, note = make(*repeated, False), "K/V repeated for GQA"
            else:
                cand = make(k, v, group > 1)
            try:
                with _running(None):
                    cand()
                fn = cand
                break
            except RuntimeError as e:
                errors.append(first_line(e))
        if fn is None:
            skipped.append((f"sdpa[{label}]", "refuses the call: " + "; ".join(errors)))
        else:
            impls.append(Impl(f"sdpa[{label}]", fn, b.tokens, note=note))
    return impls, skipped


def flex_impls(b, dense, *, causal: bool = True, compile: bool = True) -> Tuple[List[Impl], Skipped]:
    """FlexAttention with a block mask for the (bottom-right) causal mask; compiled or eager."""
    name = "flex" if compile else "flex[eager]"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return [], [(name, f"not available in torch {torch.__version__} ({e})")]
    q, k, v = dense
    offset = b.ctx - b.q_len
    block_mask = None
    try:
        if causal and b.q_len > 1:
            def mask_mod(bi, h, qi, ki):
                return ki <= qi + offset

            with _running(None):
                block_mask = create_block_mask(mask_mod, None, None, b.q_len, b.ctx, device=q.device)
        attn = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
    except Exception as e:  # noqa: BLE001 - any failure here means "skip with the reason"
        return [], [(name, first_line(e))]

    def fn():
        return attn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return [Impl(name, fn, b.tokens, note="" if compile else "not compiled")], []


def paged_block_mask(b, *, causal: bool = True, q_block: int = 128):
    """FlexAttention's view of kvmem's pages: the K/V pools as one long sequence and a
    :class:`~torch.nn.attention.flex_attention.BlockMask` built from the block table.

    The pools ``[num_blocks, block_size, Hkv, D]`` are viewed (no copy) as
    ``[1, Hkv, num_blocks * block_size, D]``: key index ``i`` of that sequence is slot
    ``i % block_size`` of page ``i // block_size`` (a *physical* position). Flex attends with
    ``Bkv = 1`` against ``Bq = B`` (allowed when a block mask is given), and the mask does the
    paging:

    - the BlockMask's KV block size is the page size, so its ``kv_indices`` for sequence ``b``
      are simply ``block_table[b]`` (physical pages in logical order): Flex reads only those
      pages. Per query block, pages entirely visible to every query in it are listed as *full*
      (no mask_mod call); the rest of the visible pages as *partial*;
    - ``mask_mod(b, h, q, kv)`` maps the physical key index back to its logical position
      through ``page_to_logical[b, page]`` (the block table inverted, -1 for pages of other
      sequences) and keeps ``pos < seq_len`` and, when causal, kvmem's bottom-right
      alignment ``pos <= q + seq_len - q_len``. It is exact on its own, so an eager Flex that
      evaluates it everywhere gives the same result.

    No copy is made here; the K/V views keep the pools' NHD strides (token stride ``Hkv * D``).
    Checked on torch 2.13 CPU: Inductor's generated code is one fused flex kernel reading the
    strided view directly (no layout copy), but that kernel runs decode markedly slower on the
    strided view than on the same pool made contiguous (a property of Flex's CPU kernel, not a
    copy; prefill was about even).

    Parameters
    ----------
    b : PagedBatch
        Every sequence has ``b.q_len`` queries (``q: [B * q_len, Hq, D]``).
    causal : bool
    q_block : int
        Query rows per BlockMask row tile (Flex's default sparse block size).

    Returns
    -------
    (q, k, v, block_mask)
        ``q: [B, Hq, q_len, D]``, ``k, v: [1, Hkv, num_blocks * block_size, D]`` (strided
        views of the caller's tensors) and the BlockMask.
    """
    from torch.nn.attention.flex_attention import BlockMask

    num_blocks, page, hkv, d = b.k_cache.shape
    batch, per_seq = b.block_table.shape
    dev, q_len = b.q.device, b.q_len
    table = b.block_table.long()
    # page_to_logical[b, physical page] = logical page index in sequence b, or -1
    page_to_logical = torch.full((batch, num_blocks), -1, dtype=torch.int32, device=dev)
    page_to_logical.scatter_(1, table, torch.arange(per_seq, dtype=torch.int32, device=dev).expand(batch, -1)
                             .contiguous())
    seq_lens = b.seq_lens.to(torch.int32)
    offset = seq_lens - q_len  # keys before the first query of each sequence

    def mask_mod(bi, h, qi, kv):
        logical_page = page_to_logical[bi, kv // page]
        pos = logical_page * page + kv % page
        keep = (logical_page >= 0) & (pos < seq_lens[bi])
        if causal:
            keep = keep & (pos <= qi + offset[bi])
        return keep

    # Per query block: the first query sees `first` keys, the last one `last` (causal, bottom-right).
    n_q = -(-q_len // q_block)
    q_first = torch.arange(n_q, device=dev) * q_block
    q_last = torch.clamp(q_first + q_block, max=q_len) - 1
    lens = seq_lens.long()[:, None]
    if causal:
        last = torch.minimum(lens, offset.long()[:, None] + q_last[None] + 1)
        first = torch.minimum(lens, offset.long()[:, None] + q_first[None] + 1)
    else:
        last = first = lens.expand(batch, n_q)
    n_visible = (last + page - 1) // page  # pages any query of the block sees
    n_full = first // page  # pages every query of the block sees completely
    # BlockMask wants the index rows as wide as the KV sequence has blocks (num_blocks);
    # entries past each row's count are ignored.
    cols = torch.arange(num_blocks, device=dev)
    rows = table[:, None, :].expand(batch, n_q, per_seq)
    full_idx = torch.gather(rows, 2, cols.clamp(max=per_seq - 1).expand(batch, n_q, -1))
    part_idx = torch.gather(rows, 2, (n_full[:, :, None] + cols).clamp(max=per_seq - 1))
    block_mask = BlockMask.from_kv_blocks(
        (n_visible - n_full)[:, None].to(torch.int32), part_idx[:, None].to(torch.int32).contiguous(),
        n_full[:, None].to(torch.int32), full_idx[:, None].to(torch.int32).contiguous(),
        BLOCK_SIZE=(q_block, page), mask_mod=mask_mod, seq_lengths=(q_len, num_blocks * page))
    k = b.k_cache.view(1, num_blocks * page, hkv, d).transpose(1, 2)
    v = b.v_cache.view(1, num_blocks * page, hkv, d).transpose(1, 2)
    q = b.q.view(batch, q_len, -1, d).transpose(1, 2)
    return q, k, v, block_mask


def flex_paged_impls(b, *, causal: bool = True, compile: bool = True) -> Tuple[List[Impl], Skipped]:
    """FlexAttention directly on kvmem's page pools (see :func:`paged_block_mask`); no
    contiguous copy. GQA through ``enable_gqa``. Eager Flex evaluates the mask over the whole
    pool for every sequence (B x the work), so only the compiled one is a fair peer."""
    name = "flex[paged]" if compile else "flex[paged,eager]"
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        return [], [(name, f"not available in torch {torch.__version__} ({e})")]
    if int(b.seq_lens.min()) < b.q_len:
        return [], [(name, "a sequence has fewer keys than queries")]
    try:
        with _running(None):
            q, k, v, block_mask = paged_block_mask(b, causal=causal)
        attn = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
    except Exception as e:  # noqa: BLE001 - any failure here means "skip with the reason"
        return [], [(name, first_line(e))]
    gqa = q.shape[1] != k.shape[1]
    page = b.k_cache.shape[1]
    # Flex's Triton prefill kernel needs its KV tile (BLOCK_N) to divide the BlockMask's KV block
    # (here the page); its default tiles are larger than small pages. Not measured (no GPU yet).
    options = {"BLOCK_N": page} if b.q.device.type == "cuda" and page <= 64 else None

    def fn():
        return attn(q, k, v, block_mask=block_mask, enable_gqa=gqa, kernel_options=options)
    note = "on the pages (strided view, no copy), BlockMask from block table"
    return [Impl(name, fn, b.tokens, note=note if compile else "not compiled; mask over whole pool")], []


def flashinfer_impls(b, *, causal: bool = True) -> Tuple[List[Impl], Skipped]:
    """FlashInfer's paged decode / prefill wrappers on kvmem's own pages (NHD layout), if installed."""
    try:
        import flashinfer
    except ImportError:
        return [], [("flashinfer", "not installed")]
    if b.q.device.type != "cuda":
        return [], [("flashinfer", "CUDA only")]
    try:
        dev, page = b.q.device, b.k_cache.shape[1]
        hq, hkv, d = b.q.shape[1], b.k_cache.shape[2], b.q.shape[2]
        per_seq = b.block_table.shape[1]
        indices = b.block_table.reshape(-1).contiguous()
        indptr = torch.arange(b.batch + 1, dtype=torch.int32, device=dev) * per_seq
        last = torch.full((b.batch,), b.ctx - (per_seq - 1) * page, dtype=torch.int32, device=dev)
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
        if b.q_len == 1:
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
            w.plan(indptr, indices, last, hq, hkv, d, page, q_data_type=b.q.dtype)
        else:
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
            w.plan(b.cu_seqlens_q, indptr, indices, last, hq, hkv, d, page, causal=causal,
                   q_data_type=b.q.dtype)
        kv = (b.k_cache, b.v_cache)
        return [Impl("flashinfer", lambda: w.run(b.q, kv), lambda o: o, note="paged")], []
    except Exception as e:  # noqa: BLE001
        return [], [("flashinfer", first_line(e))]


def flash_attn_impls(b, dense, *, causal: bool = True) -> Tuple[List[Impl], Skipped]:
    """flash-attn: ``flash_attn_with_kvcache`` on the pages when it takes this page size,
    else ``flash_attn_func`` on the contiguous copy. Only when installed."""
    try:
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
    except ImportError:
        return [], [("flash-attn", "not installed")]
    if b.q.device.type != "cuda":
        return [], [("flash-attn", "CUDA only")]
    qb = b.q.view(b.batch, b.q_len, *b.q.shape[1:])
    flat = lambda o: o.reshape(b.q.shape)  # noqa: E731

    def paged():
        return flash_attn_with_kvcache(qb, b.k_cache, b.v_cache, cache_seqlens=b.seq_lens,
                                       block_table=b.block_table, causal=causal)
    try:
        with _running(None):
            paged()
        return [Impl("flash-attn", paged, flat, note="paged")], []
    except Exception as e:  # noqa: BLE001 - older releases need pages of 256
        why = first_line(e)
    q, k, v = (t.transpose(1, 2).contiguous() for t in dense)  # [B, S, H, D]
    if b.q_len not in (1, b.ctx):
        return [], [("flash-attn", f"paged call refused ({why}); dense top-left causal differs")]

    def contiguous():
        return flash_attn_func(q, k, v, causal=causal and b.q_len > 1)
    return [Impl("flash-attn", contiguous, flat, note=f"contiguous (paged refused: {why[:60]})")], []


def peer_impls(b, *, causal: bool = True, flex_compile: bool = True) -> Tuple[List[Impl], Skipped]:
    """Every peer this environment can import, on the same data as ``b``."""
    dense = b.dense()
    impls, skipped = [], []
    for found, skip in (sdpa_impls(b, dense, causal=causal),
                        flex_impls(b, dense, causal=causal, compile=flex_compile),
                        flex_paged_impls(b, causal=causal, compile=flex_compile),
                        flashinfer_impls(b, causal=causal),
                        flash_attn_impls(b, dense, causal=causal)):
        impls += found
        skipped += skip
    return impls, skipped
