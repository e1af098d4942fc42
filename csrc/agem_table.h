// Tensor table and chunk lookup shared by the CPU and CUDA kernels (host and device).
//
// A projection walks a list of tensor pairs (g_i, r_i) plus reference-only tensors
// (g_i absent, r_i counted in ||r||^2 only). Each tensor is cut into chunks of
// kChunkElems elements; chunk c belongs to the entry whose [chunk_begin, chunk_end)
// holds c. Per-chunk partial sums are reduced in chunk order, so results do not depend
// on how chunks are spread over threads or blocks.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define AGEM_HD __host__ __device__ __forceinline__
#else
#define AGEM_HD inline
#endif

namespace agem_fast {

// 16K elements: small enough to balance a few hundred SMs on a 10M-parameter model,
// large enough that the per-chunk partials stay tiny next to the data.
constexpr int64_t kChunkElems = int64_t(1) << 14;

enum DTypeCode : int32_t { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

struct TensorEntry {
  void* g;             // gradient, updated in place; nullptr for reference-only entries
  const void* r;       // reference gradient, same dtype and memory order as g
  int64_t numel;
  int64_t chunk_begin; // index of this entry's first chunk
  int32_t dtype;       // DTypeCode
  int32_t pad_;
};

AGEM_HD int64_t chunks_for(int64_t numel) {
  return (numel + kChunkElems - 1) / kChunkElems;
}

// Index of the entry owning chunk c: the last entry with chunk_begin <= c.
// Entries with zero chunks share chunk_begin with their successor and are skipped.
AGEM_HD int64_t find_entry(const TensorEntry* table, int64_t n_entries, int64_t c) {
  int64_t lo = 0, hi = n_entries - 1;
  while (lo < hi) {
    int64_t mid = lo + (hi - lo + 1) / 2;
    if (table[mid].chunk_begin <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Element range [begin, end) of chunk c inside its entry.
struct ChunkRange {
  int64_t begin;
  int64_t end;
};

AGEM_HD ChunkRange chunk_range(const TensorEntry& e, int64_t c) {
  int64_t begin = (c - e.chunk_begin) * kChunkElems;
  int64_t end = begin + kChunkElems < e.numel ? begin + kChunkElems : e.numel;
  return {begin, end};
}

// The decision of DESIGN section 1. NaN dot compares false: no projection.
AGEM_HD bool decide(double dot, double rr, double eps, double* coef) {
  double denom = rr + eps;
  bool projected = dot < 0.0 && denom > 0.0;
  *coef = projected ? dot / denom : 0.0;
  return projected;
}

}  // namespace agem_fast
