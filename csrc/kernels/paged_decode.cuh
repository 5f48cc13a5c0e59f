// Split-K paged attention for short query segments (decode, speculative verification).
// Device code only: templates on raw pointers, no torch headers.
//
// One CTA handles one query token t, one KV head (and up to G_MAX of its query heads), and one
// split of that token's visible key range:
//   grid = (num_tokens, num_kv_heads * head_chunks, num_splits), block = NUM_WARPS * 32
// (tokens on x: gridDim.x allows 2^31 - 1, y and z only 65535). Tokens past cu_seqlens_q[B]
// (padding, e.g. a CUDA graph captured for more tokens) belong to no sequence: left untouched.
// Each K/V row is read once per CTA with 16-byte loads and used by all the CTA's query heads.
// Math (base-2 online softmax, per query head g):
//   s_j   = scale * q_g . k_j                (softcap c: s_j = c * tanh(s_j / c))
//   m     = max_j s_j,  l = sum_j exp(s_j - m),  acc = sum_j exp(s_j - m) * v_j
//   out_g = acc / l,    lse_g = m + log(l)  (natural log; -inf and out = 0 when no key)
// ROPE (template flag): k_j rotated at position j as it loads (common/cuda_rope.cuh), in fp32.
// Cache element type KV (template, common/cuda_kv.cuh): q's T, the other 16-bit float, or float8
// (e4m3fn / e5m2), dequantised in registers as it loads (no copy). The scales (k_scale, v_scale:
// [Hkv] or 0-d, one value per CTA) are folded into q and the output (the dot product, RoPE and
// the softmax-weighted sum are linear in k_j and v_j; only fp32 rounding order differs):
//   s_j = (scale * k_scale / kv_decode_mul) q . k~_j,  out = (v_scale / kv_decode_mul) acc / l
// where k~_j, v~_j are the loaded rows, exactly kv_decode_mul times the stored values (2^-8 for
// e4m3, whose fp16 bit trick lands there; else 1). KV = T is the plain path: no scale code (a
// scaled cache of q's dtype is KV = scaled<T>).
// Splits write (out_s, lse_s) in fp32; paged_decode_reduce merges them exactly and adds the sink
// (common/cuda_softmax.cuh):
//   lse = log(sum_s exp(lse_s) + exp(sink_g)),  out = sum_s exp(lse_s - lse) * out_s.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common/cuda_kv.cuh"
#include "common/cuda_rope.cuh"
#include "common/cuda_softmax.cuh"
#include "common/cuda_varlen.cuh"
#include "common/cuda_vec.cuh"
#include "paged_attention/params.h"

namespace kvmem {

// The op's parameters (paged_attention/params.h) plus the launch's split-K state.
struct PagedDecodeParams : PagedAttentionParams {
  float* partial_out;  // [T, Hq, num_splits, D] fp32 (when num_splits > 1)
  float* partial_lse;  // [T, Hq, num_splits] fp32 (when num_splits > 1)
  int head_chunks, num_splits;
};

template <typename T, typename KV, int D, int G_MAX, int NUM_WARPS, bool ROPE>
struct DecodeShape {
  static constexpr int VEC = 16 / sizeof(T);                 // channels per vector (16 bytes of q)
  static constexpr int NVEC = D / VEC;                       // vectors per row
  static constexpr int TPK = NVEC >= 32 ? 32 : (NVEC > 8 ? 16 : (NVEC > 4 ? 8 : (NVEC > 2 ? 4 : 2)));
  static constexpr int VPT = (NVEC + TPK - 1) / TPK;         // vectors per thread
  static constexpr int KPW = 32 / TPK;                       // keys per warp in flight
  static constexpr int SLOTS = NUM_WARPS * KPW;              // keys per CTA step
  // steps whose loads are in flight: 2, or 4 for float8 (8-byte vectors: as many cache bytes per
  // thread as 2 steps of 16-bit K/V) without RoPE (whose partner reads and row offsets need the
  // registers: no spills on sm_90a)
  static constexpr int UNROLL = (VEC * sizeof(KV) == 8 && !ROPE) ? 4 : 2;
  static_assert(D % VEC == 0, "head_dim must be a multiple of the 16-byte vector");
};

template <typename T, typename KV, int D, int G_MAX, int NUM_WARPS, bool ROPE>
__global__ void __launch_bounds__(NUM_WARPS * 32)
paged_decode_kernel(const PagedDecodeParams p) {
  using S = DecodeShape<T, KV, D, G_MAX, NUM_WARPS, ROPE>;
  using Raw = typename KvRaw<KV, S::VEC>::type;
  constexpr bool SCALES = !std::is_same<KV, T>::value;  // KV = T: the plain path, no scales
  constexpr int VEC = S::VEC, TPK = S::TPK, VPT = S::VPT, KPW = S::KPW, U = S::UNROLL;
  constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

  const int t = blockIdx.x;
  const int kvh = blockIdx.y / p.head_chunks;
  const int chunk = blockIdx.y % p.head_chunks;
  const int split = blockIdx.z;
  const int h0 = kvh * p.group + chunk * G_MAX;
  const int ng = min(G_MAX, p.group - chunk * G_MAX);

  const int b = sequence_of_token(p.cu_seqlens_q, p.num_seqs, t);
  if (b < 0) return;  // uniform over the CTA: before any __syncthreads
  const int q_start = p.cu_seqlens_q[b];
  const int q_len = p.cu_seqlens_q[b + 1] - q_start;
  const int kv_len = p.seq_lens[b];
  const int pos = kv_len - q_len + (t - q_start);
  const int hi = p.causal ? pos + 1 : kv_len;
  const int lo = p.window > 0 ? max(0, pos - p.window + 1) : 0;
  const int n = max(0, hi - lo);
  const int per_split = (n + p.num_splits - 1) / p.num_splits;
  const int start = lo + split * per_split;
  const int end = min(hi, start + per_split);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = warp * KPW + lane / TPK;  // which key of a CTA step this thread works on
  const int tl = lane % TPK;                 // which vectors of the row

  // q for this thread's vectors, pre-scaled into base 2 when there is no softcap (and, for a
  // scaled or other-dtype cache, by k_scale and 1 / kv_decode_mul, see above).
  float qmul = p.softcap > 0.f ? p.scale : p.scale * LOG2E;
  if constexpr (SCALES) {
    if (p.k_scale != nullptr) qmul *= __ldg(p.k_scale + (int64_t)kvh * p.k_scale_stride);
    if constexpr (kv_decode_mul<KV>() != 1.f) qmul *= 1.f / kv_decode_mul<KV>();
  }
  float q[G_MAX][VPT * VEC];
  const T* qbase = static_cast<const T*>(p.q) + (int64_t)t * p.q_stride_t;
#pragma unroll
  for (int g = 0; g < G_MAX; ++g)
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int vi = tl + v * TPK;
      float tmp[VEC];
      if (g < ng && vi < S::NVEC) {
        load_vec<T, VEC>(qbase + (int64_t)(h0 + g) * p.q_stride_h + vi * VEC, tmp);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) tmp[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) q[g][v * VEC + e] = tmp[e] * qmul;
    }

  float m[G_MAX], l[G_MAX], acc[G_MAX][VPT * VEC];
#pragma unroll
  for (int g = 0; g < G_MAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < VPT * VEC; ++e) acc[g][e] = 0.f;
  }

  const KV* kbase = static_cast<const KV*>(p.k_cache) + (int64_t)kvh * p.k_stride_h;
  const KV* vbase = static_cast<const KV*>(p.v_cache) + (int64_t)kvh * p.v_stride_h;
  const int32_t* table = p.block_table + (int64_t)b * p.table_stride_b;

  for (int j0 = start; j0 < end; j0 += U * S::SLOTS) {
    // Issue every K and V load of U steps first (several 16- or 8-byte loads in flight per thread).
    Raw kraw[U][VPT], vraw[U][VPT];
    bool valid[U];
    int64_t krow[U];  // ROPE: the key rows' offsets (NeoX partners are read again from them)
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * S::SLOTS + slot;
      valid[u] = j < end;
      int64_t koff = 0, voff = 0;
      if (valid[u]) {
        const int64_t blk = __ldg(table + j / p.block_size);
        const int64_t off = j % p.block_size;
        koff = blk * p.k_stride_b + off * p.k_stride_s;
        voff = blk * p.v_stride_b + off * p.v_stride_s;
      }
      krow[u] = koff;
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        const int vi = tl + v * TPK;
        if (valid[u] && vi < S::NVEC) {
          kraw[u][v] = kv_load<KV, VEC>(kbase + koff + vi * VEC);
          vraw[u][v] = kv_load<KV, VEC>(vbase + voff + vi * VEC);
        } else {
          kraw[u][v] = kv_zero<KV, VEC>();
          vraw[u][v] = kv_zero<KV, VEC>();
        }
      }
    }
    // Scores of the U keys for every head: partial dots, then a reduction over the TPK lanes.
    float s[U][G_MAX];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[VPT * VEC];
#pragma unroll
      for (int v = 0; v < VPT; ++v) kv_unpack<KV, VEC>(kraw[u][v], kf + v * VEC);
      if constexpr (ROPE) {
        const int j = j0 + u * S::SLOTS + slot;
        if (valid[u]) {
          rope_rotate_vecs<KV, VEC, VPT, TPK>(kf, kbase + krow[u], p.rope_cos_sin + (int64_t)j * p.rope_stride,
                                             p.rot_dim, p.rope_neox, tl);
        }
      }
#pragma unroll
      for (int g = 0; g < G_MAX; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < VPT * VEC; ++e) d = fmaf(q[g][e], kf[e], d);
#pragma unroll
        for (int off = TPK / 2; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
        if (p.softcap > 0.f) d = p.softcap * tanhf(d / p.softcap) * LOG2E;
        s[u][g] = valid[u] ? d : -INFINITY;
      }
    }
    // Online softmax update with the U keys, then accumulate their values.
#pragma unroll
    for (int g = 0; g < G_MAX; ++g) {
      float mt = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mt = fmaxf(mt, s[u][g]);
      if (mt == -INFINITY) continue;
      const float alpha = exp2f(m[g] - mt);  // m = -inf -> 0
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < VPT * VEC; ++e) acc[g][e] *= alpha;
      m[g] = mt;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float pr = exp2f(s[u][g] - mt);  // invalid key: exp2(-inf) = 0, its v is 0
        l[g] += pr;
        float vf[VPT * VEC];
#pragma unroll
        for (int v = 0; v < VPT; ++v) kv_unpack<KV, VEC>(vraw[u][v], vf + v * VEC);
#pragma unroll
        for (int e = 0; e < VPT * VEC; ++e) acc[g][e] = fmaf(pr, vf[e], acc[g][e]);
      }
    }
  }

  // Merge the KPW key slots of each warp (lanes with equal tl), then the warps through smem.
#pragma unroll
  for (int off = TPK; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < G_MAX; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float lo_ = __shfl_xor_sync(0xffffffffu, l[g], off);
      float mn, a, c;
      merge_state_weights(m[g], mo, mn, a, c);
      l[g] = l[g] * a + lo_ * c;
#pragma unroll
      for (int e = 0; e < VPT * VEC; ++e) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[g][e], off);
        acc[g][e] = acc[g][e] * a + ao * c;
      }
      m[g] = mn;
    }
  }
  __shared__ float sm_m[NUM_WARPS][G_MAX], sm_l[NUM_WARPS][G_MAX];
  __shared__ float sm_acc[NUM_WARPS][G_MAX][D];
  if (lane < TPK) {
#pragma unroll
    for (int g = 0; g < G_MAX; ++g) {
      if (lane == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        const int vi = tl + v * TPK;
        if (vi < S::NVEC)
#pragma unroll
          for (int e = 0; e < VEC; ++e) sm_acc[warp][g][vi * VEC + e] = acc[g][v * VEC + e];
      }
    }
  }
  __syncthreads();

  // v_scale and 1 / kv_decode_mul, applied to each split's output (the merge is linear in it).
  float omul = 1.f;
  if constexpr (SCALES) {
    if (p.v_scale != nullptr) omul = __ldg(p.v_scale + (int64_t)kvh * p.v_scale_stride);
    if constexpr (kv_decode_mul<KV>() != 1.f) omul *= 1.f / kv_decode_mul<KV>();
  }
  for (int idx = threadIdx.x; idx < ng * D; idx += NUM_WARPS * 32) {
    const int g = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
    float lsum = 0.f, o = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) {
        const float wgt = exp2f(sm_m[w][g] - mx);
        lsum += sm_l[w][g] * wgt;
        o += sm_acc[w][g][d] * wgt;
      }
    }
    // lse of this split in natural log; -inf when it saw no key.
    float lse = lsum > 0.f ? (mx + log2f(lsum)) * LN2 : -INFINITY;
    if constexpr (SCALES) o *= omul;
    o = lsum > 0.f ? o / lsum : 0.f;
    const int h = h0 + g;
    if (p.num_splits == 1) {
      if (p.sink_logits != nullptr) fold_sink(p.sink_logits[h], lse, o);
      T* out = static_cast<T*>(p.out) + (int64_t)t * p.o_stride_t + (int64_t)h * p.o_stride_h;
      out[d] = from_float<T>(o);
      if (p.lse != nullptr && d == 0) p.lse[(int64_t)t * p.lse_stride_t + (int64_t)h * p.lse_stride_h] = lse;
    } else {
      const int64_t row = ((int64_t)t * p.num_heads + h) * p.num_splits + split;
      p.partial_out[row * D + d] = o;
      if (d == 0) p.partial_lse[row] = lse;
    }
  }
}

// Merge the splits of paged_decode_kernel: grid = (num_tokens, num_heads), block = D threads.
template <typename T, int D>
__global__ void paged_decode_reduce_kernel(const PagedDecodeParams p) {
  const int t = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  if (sequence_of_token(p.cu_seqlens_q, p.num_seqs, t) < 0) return;  // no partials were written
  const int64_t row0 = ((int64_t)t * p.num_heads + h) * p.num_splits;
  float o;
  const float lse = combine_splits(p.partial_lse + row0, p.partial_out + row0 * D, p.num_splits, D, d,
                                   p.sink_logits != nullptr ? p.sink_logits + h : nullptr, &o);
  if (d < D) {
    T* out = static_cast<T*>(p.out) + (int64_t)t * p.o_stride_t + (int64_t)h * p.o_stride_h;
    out[d] = from_float<T>(o);
  }
  if (p.lse != nullptr && d == 0) p.lse[(int64_t)t * p.lse_stride_t + (int64_t)h * p.lse_stride_h] = lse;
}

}  // namespace kvmem
