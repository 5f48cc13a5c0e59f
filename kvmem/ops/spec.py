"""The specification of kvmem's ops: the semantics, as one text.

The executable specification is each op's ``reference.py`` (``kvmem/ops/<op>/reference.py``),
in plain PyTorch with fp32 math, gathered in ``kvmem.ops.reference``.

Every backend (CUDA, Triton, C++ CPU) is tested against these functions. They do no argument
checking (the public ops in ``kvmem.ops`` do that) and favour clarity over speed, with one
exception: they read only the pages a sequence needs, so block-table entries that lie beyond a
sequence's needed blocks (or before its sliding window) may hold anything, -1 included.

The memory-bank ops state theirs in their reference modules' docstrings:
``kvmem.ops.memory_select.reference`` (summaries, block scores, the stable top-k) and
``kvmem.ops.memory_attention.reference`` (sinks + selected blocks + window, compacted positions,
block mass).

Semantics (frozen by "Paged KV core 1/3"):

* A *slot* is ``block * block_size + offset``. ``slot_mapping[t] == -1`` means token ``t`` is
  padding and is not written.
* ``seq_lens[b]`` is the KV length of sequence ``b`` *after* this step's cache write. Its
  ``q_len_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` queries are the last ones: query ``i`` sits at
  position ``p = seq_lens[b] - q_len_b + i`` (bottom-right aligned causal mask).
* Key ``j`` is visible to the query at ``p`` iff ``j < seq_lens[b]``, and ``j <= p`` when causal,
  and ``j > p - window`` when a window is given (Hugging Face's sliding-window rule).
* Score: ``s = scale * q.k``; with ``softcap=c``: ``s = c * tanh(s / c)`` (before masking).
* ``sink_logits[h]`` is an extra, unscaled logit in the softmax denominator of head ``h`` that
  attends to no value (gpt-oss): ``p_j = exp(s_j) / (sum_j exp(s_j) + exp(sink_h))``.
* ``lse = log(sum_j exp(s_j) [+ exp(sink_h)])`` in natural log, fp32; ``-inf`` when nothing is
  visible (then ``out`` is 0).
* Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (grouped-query attention).
* ``k_scale``/``v_scale`` (fp8 and other quantised caches): the stored key/value is multiplied by
  the scale on load; a 0-d tensor (per tensor) or ``[Hkv]`` (per KV head), fp32. ``cache_write``
  given the same scales stores ``k / k_scale`` computed in fp32, clamped to +- the cache format's
  largest finite value and rounded to nearest even (``kvmem.ops._common.encode``: one encoding,
  bit-exact on every backend; +-inf -> +-max, NaN stays NaN). float8 caches (``e4m3fn``,
  ``e5m2``) need scales; float caches take them too. Without scales the cache may be of another
  float dtype than ``q`` / ``k`` (e.g. bf16 KV under an fp32 model): ``cache_write`` rounds to
  nearest even into it, attention converts on load.
* ``rope_cos_sin`` (RoPE on load: keys cached *before* rotary embedding): ``[num_positions,
  rot_dim]`` fp32, row ``p`` = ``cos(p*theta_i)`` for ``i < rot_dim/2`` then ``sin(p*theta_i)``.
  Key ``j`` of a sequence is rotated at position ``j`` when loaded (after ``k_scale``), in its first
  ``rot_dim`` channels (partial rotary leaves the rest): ``rope_neox=True`` rotates the two halves
  ``(x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin)`` (Llama/NeoX, HF's ``rotate_half``), ``False``
  rotates interleaved pairs ``(x[2i], x[2i+1])`` (GPT-J). Queries arrive already rotated.
"""
