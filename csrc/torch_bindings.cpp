// kvmem's compiled ops: the op schemas (TORCH_LIBRARY, all in one block) and, when built by
// setup.py as the Python extension kvmem._C, a small pybind11 module with build info.
//
// The schemas are the contract the Python layer (kvmem/ops) is written against (diffed against
// tests/schemas.txt by tests/test_schemas.py). Each op's kernels register themselves next to
// their glue: csrc/<op>/cpu.cpp (CPU) and csrc/<op>/cuda.cu (CUDA, when compiled in).

#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "common/cpu_isa.h"
#include "common/kernel_facts.h"
#include "paged_attention/capabilities.h"

#ifndef KVMEM_CUDA_ARCHS
#define KVMEM_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(kvmem_C, m) {
  // k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D];
  // slot_mapping: [T] int64 (block * block_size + offset, -1 skips the token);
  // k_scale, v_scale: 0-d or [Hkv] fp32 or None: k / k_scale is stored, encoded as
  // kvmem/ops/_common.py's encode() (clamp to +- the format's max, round to nearest even;
  // common/fp8.h for the float8 caches). The caches may be float8_e4m3fn / float8_e5m2 (with
  // scales) or any float dtype (k/v rounded to nearest even into it).
  m.def(
      "cache_write(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor? k_scale, Tensor? v_scale) -> ()");
  // out: [T, Hq, D] (q's dtype); lse: [T, Hq] fp32 or None; q: [T, Hq, D];
  // k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_table: [B, max_blocks] int32;
  // seq_lens: [B] int32; cu_seqlens_q: [B + 1] int32; window <= 0: none; softcap <= 0: none;
  // sink_logits: [Hq] fp32 or None; rope_cos_sin: [num_positions >= max_seqlen_k, rot_dim] fp32
  // (cos half, then sin half) or None: key j of a sequence rotated at position j as it is loaded,
  // halves (rope_neox) or interleaved pairs; k_scale, v_scale: 0-d or [Hkv] fp32 or None (the
  // stored key/value times the scale on load, before RoPE). The caches may be of another dtype
  // than q: any float dtype, or float8_e4m3fn / float8_e5m2 (with scales).
  m.def(
      "paged_attention(Tensor(a!) out, Tensor(b!)? lse, Tensor q, Tensor k_cache, "
      "Tensor v_cache, Tensor block_table, Tensor seq_lens, Tensor cu_seqlens_q, "
      "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, int window, "
      "float softcap, Tensor? sink_logits, Tensor? k_scale, Tensor? v_scale, "
      "Tensor? rope_cos_sin, bool rope_neox) -> ()");
  // out, out_a, out_b: [T, H, D] (one dtype); lse, lse_a, lse_b: [T, H] fp32.
  m.def(
      "merge_states(Tensor(a!) out, Tensor(b!) lse, Tensor out_a, Tensor lse_a, "
      "Tensor out_b, Tensor lse_b) -> ()");
  // selected: [B, Hkv, top_k] int32; q: [T, Hq, D]; summaries: [num_blocks, Hkv, 2, D];
  // bank_table: [B, max_bank] int32; bank_lens: [B] int32; cu_seqlens_q: [B + 1] int32;
  // query_index: [B] int32 or None (each segment's first token); summary: "minmax" | "box".
  m.def(
      "memory_select(Tensor(a!) selected, Tensor q, Tensor summaries, Tensor bank_table, "
      "Tensor bank_lens, Tensor cu_seqlens_q, float scale, Tensor? query_index, str summary) -> ()");
}

#ifdef KVMEM_PYTHON_MODULE
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvmem compiled ops (registered as torch.ops.kvmem_C.*)";
  m.def(
      "build_info",
      [] {
        py::dict d;
        d["torch_version"] = std::string(TORCH_VERSION);
#ifdef KVMEM_WITH_CUDA
        d["cuda"] = true;
#else
        d["cuda"] = false;
#endif
        d["cuda_archs"] = std::string(KVMEM_CUDA_ARCHS);
#ifdef _OPENMP
        d["openmp"] = true;
#else
        d["openmp"] = false;
#endif
#if defined(__VERSION__)
#if defined(__clang__)
        d["compiler"] = std::string("clang ") + __VERSION__;
#elif defined(__GNUC__)
        d["compiler"] = std::string("gcc ") + __VERSION__;
#else
        d["compiler"] = std::string(__VERSION__);
#endif
#elif defined(_MSC_FULL_VER)
        d["compiler"] = std::string("msvc ") + std::to_string(_MSC_FULL_VER);
#else
        d["compiler"] = std::string("unknown");
#endif
        // What each compiled kernel accepts, per op and device: kvmem/dispatch reads these facts
        // (they are not restated in Python). head_dims empty = any head_dim up to max_head_dim.
        // Each list comes from the constants the kernels' dispatch switches expand
        // (common/kernel_facts.h, csrc/<op>/capabilities.h).
        // cache_dtypes (ops with a KV cache): the cache dtypes it takes with any of its dtypes.
        auto names = [](const auto& list) {
          py::list out;
          for (const char* s : list) out.append(std::string(s));
          return out;
        };
        auto facts = [&](const auto& dtypes, py::list head_dims, int max_head_dim) {
          py::dict f;
          f["dtypes"] = names(dtypes);
          f["head_dims"] = head_dims;
          f["max_head_dim"] = max_head_dim;
          return f;
        };
        const int max_head_dim = kvmem::kMaxHeadDim;
        py::dict kernels;
        for (const char* op : {"cache_write", "paged_attention", "merge_states", "memory_select"}) {
          py::dict per_device;
          py::dict cpu = facts(kvmem::kFloatDtypeNames, py::list(), max_head_dim);
          const bool cached = std::string(op) == "cache_write" || std::string(op) == "paged_attention";
          if (cached) cpu["cache_dtypes"] = names(kvmem::kCacheDtypeNames);
          per_device["cpu"] = cpu;
#ifdef KVMEM_WITH_CUDA
          if (std::string(op) == "memory_select") {
            // CPU only (CUDA tensors take the Triton block-score kernel)
          } else if (std::string(op) == "paged_attention") {
            py::list cuda_head_dims;
            for (int h : kvmem::kPagedAttentionCudaHeadDims) cuda_head_dims.append(h);
            py::dict cuda = facts(kvmem::kHalfDtypeNames, cuda_head_dims, max_head_dim);
            cuda["cache_dtypes"] = names(kvmem::kCudaPagedAttentionCacheDtypeNames);
            per_device["cuda"] = cuda;
          } else {
            py::dict cuda = facts(kvmem::kFloatDtypeNames, py::list(), max_head_dim);
            if (cached) cuda["cache_dtypes"] = names(kvmem::kCudaCacheWriteCacheDtypeNames);
            per_device["cuda"] = cuda;
          }
#endif
          kernels[op] = per_device;
        }
        d["kernels"] = kernels;
        return d;
      },
      "How this extension was built: torch_version, cuda, cuda_archs, openmp, compiler, and "
      "kernels[op][device] = {dtypes, head_dims, max_head_dim}.");
  m.def(
      "cpu_isa", [] { return std::string(kvmem::cpu::isa_name(kvmem::cpu::cpu_isa())); },
      "The instruction set the CPU kernels dispatch to at runtime (baseline, avx2 or avx512; "
      "the env var KVMEM_CPU_ISA can lower it).");
}
#endif  // KVMEM_PYTHON_MODULE
