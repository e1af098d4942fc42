// CPU kernels: the same table and chunks as the CUDA path, parallel over chunks.
//
// Pass 1 writes one (dot, rr) partial per chunk; the partials are then summed in chunk
// order in fp64, so the result is bitwise identical for any number of threads.
// Pass 2 runs only when the decision is to project.
//
// The extension is built for the baseline x86-64 instruction set (SSE2), where both
// passes ran 8-10% slower than torch's own AVX2 kernels (torch.dot, Tensor.add_) on cold
// 48-350 MB vectors, memory-bound as they are. On x86 CPUs with AVX2 and FMA the chunk
// loops run a second copy compiled for them, chosen at run time (cpu_isa()), which
// matches torch. The copies round differently (twice the lanes, fused multiply-adds), so
// bits are reproducible per machine, as DESIGN section 1 asks, not across machines.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define AGEM_FAST_X86_AVX2 1
#endif

#include "../agem_ops.h"

namespace agem_fast {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// A chunk is summed in blocks of kBlock elements: inside a block the compiler keeps one
// fp32 partial per SIMD lane (`omp simd` reduction), and block totals are added up in
// fp32. Short running sums keep the error near 1e-7 relative; the order depends only on
// the vector width of the copy that runs (see cpu_isa()), never on the number of threads.
constexpr int64_t kBlock = 256;

// kHasG = false for reference-only entries (rr only); a template so the hot loop has no branch.
// Always inlined, so each caller (chunk_sums, chunk_sums_avx2) compiles it for its own
// instruction set; the same for chunk_update_body below.
template <typename T, bool kHasG>
[[gnu::always_inline]] inline void chunk_sums_body(const T* g, const T* r, int64_t n,
                                                   double* dot_out, double* rr_out) {
  using A = typename Acc<T>::type;
  A dot = 0, rr = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    A block_dot = 0, block_rr = 0;
#pragma omp simd reduction(+ : block_dot, block_rr)
    for (int64_t i = b; i < e; ++i) {
      const A rv = static_cast<A>(r[i]);
      if constexpr (kHasG) block_dot += static_cast<A>(g[i]) * rv;
      block_rr += rv * rv;
    }
    dot += block_dot;
    rr += block_rr;
  }
  *dot_out = static_cast<double>(dot);
  *rr_out = static_cast<double>(rr);
}

#ifdef AGEM_FAST_X86_AVX2
template <typename T, bool kHasG>
[[gnu::target("avx2,fma")]] void chunk_sums_avx2(const T* g, const T* r, int64_t n,
                                                 double* dot_out, double* rr_out) {
  chunk_sums_body<T, kHasG>(g, r, n, dot_out, rr_out);
}
#endif

// Tests force the baseline copies to check them on machines that would pick AVX2.
std::atomic<bool> force_baseline{false};

bool use_avx2() {
#ifdef AGEM_FAST_X86_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported && !force_baseline.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

template <typename T, bool kHasG>
void chunk_sums(bool avx2, const T* g, const T* r, int64_t n, double* dot_out, double* rr_out) {
#ifdef AGEM_FAST_X86_AVX2
  if (avx2) return chunk_sums_avx2<T, kHasG>(g, r, n, dot_out, rr_out);
#endif
  chunk_sums_body<T, kHasG>(g, r, n, dot_out, rr_out);
}

// coef in the update's precision, rounded to nearest as the CUDA kernels' conversion
// does: past float's largest value by less than half an ulp (2^103) it is that value, at
// or past the midpoint an infinity. (A plain cast of a double past FLT_MAX would be
// undefined behaviour.)
template <typename A>
A update_coef(double coef) {
  if constexpr (std::is_same_v<A, float>) {
    constexpr double kRoundsToInf = 0x1.ffffffp127;  // 2^128 - 2^103: ties go to even, the infinity
    constexpr float kMax = std::numeric_limits<float>::max();
    constexpr float kInf = std::numeric_limits<float>::infinity();
    if (std::fabs(coef) >= kRoundsToInf) return coef > 0 ? kInf : -kInf;
    if (std::fabs(coef) > kMax) return coef > 0 ? kMax : -kMax;
  }
  return static_cast<A>(coef);
}

template <typename T>
[[gnu::always_inline]] inline void chunk_update_body(T* g, const T* r, int64_t n, double coef) {
  using A = typename Acc<T>::type;
  const A c = update_coef<A>(coef);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    g[i] = static_cast<T>(static_cast<A>(g[i]) - c * static_cast<A>(r[i]));
  }
}

#ifdef AGEM_FAST_X86_AVX2
template <typename T>
[[gnu::target("avx2,fma")]] void chunk_update_avx2(T* g, const T* r, int64_t n, double coef) {
  chunk_update_body<T>(g, r, n, coef);
}
#endif

template <typename T>
void chunk_update(bool avx2, T* g, const T* r, int64_t n, double coef) {
#ifdef AGEM_FAST_X86_AVX2
  if (avx2) return chunk_update_avx2<T>(g, r, n, coef);
#endif
  chunk_update_body<T>(g, r, n, coef);
}

template <typename Fn>
void dispatch_dtype(int32_t code, Fn&& fn) {
  switch (code) {
    case kHalf: fn(c10::Half{}); break;
    case kBFloat16: fn(c10::BFloat16{}); break;
    case kFloat: fn(float{}); break;
    default: fn(double{}); break;
  }
}

}  // namespace

namespace {

// Runs fn(chunk index, entry, element range, dtype tag) for chunks [0, n_chunks), in
// parallel over chunks. Each chunk's work is independent of the thread that does it.
// Each thread walks its contiguous range of chunks forwards, or backwards with
// `backwards`: pass 2 does, so that it starts on what pass 1 read last (still in cache).
// The owning entry is looked up once per range, then followed step by step (thousands
// of tiny tensors would otherwise pay a binary search per chunk).
template <typename Fn>
void for_each_chunk(const Table& table, int64_t n_chunks, bool backwards, Fn&& fn) {
  const TensorEntry* entries = table.entries.data();
  const int64_t n_entries = static_cast<int64_t>(table.entries.size());
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    int64_t idx = find_entry(entries, n_entries, backwards ? end - 1 : begin);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c = backwards ? end - 1 - (k - begin) : k;
      if (backwards) {
        while (entries[idx].chunk_begin > c) --idx;
      } else {
        while (idx + 1 < n_entries && entries[idx + 1].chunk_begin <= c) ++idx;
      }
      const TensorEntry& e = entries[idx];  // = entries[find_entry(entries, n_entries, c)]
      const ChunkRange cr = chunk_range(e, c);
      dispatch_dtype(e.dtype, [&](auto tag) { fn(c, e, cr, tag); });
    }
  });
}

// Pass 1: (dot, rr) over every chunk, summed in chunk order in fp64.
std::pair<double, double> table_sums(const Table& table) {
  std::vector<double> partial(2 * table.total_chunks);
  const bool avx2 = use_avx2();  // once per call: every chunk of a call rounds alike
  for_each_chunk(table, table.total_chunks, /*backwards=*/false, [&](int64_t c, const TensorEntry& e, ChunkRange cr, auto tag) {
    using T = decltype(tag);
    const T* r = static_cast<const T*>(e.r) + cr.begin;
    double* out = &partial[2 * c];
    if (e.g) {
      chunk_sums<T, true>(avx2, static_cast<const T*>(e.g) + cr.begin, r, cr.end - cr.begin, out, out + 1);
    } else {
      chunk_sums<T, false>(avx2, nullptr, r, cr.end - cr.begin, out, out + 1);
    }
  });
  double dot = 0.0, rr = 0.0;
  for (int64_t c = 0; c < table.total_chunks; ++c) {
    dot += partial[2 * c];
    rr += partial[2 * c + 1];
  }
  return {dot, rr};
}

// Pass 2: g <- g - coef * r over the pairs' chunks.
void table_update(const Table& table, double coef) {
  const bool avx2 = use_avx2();
  for_each_chunk(table, table.pair_chunks, /*backwards=*/true, [&](int64_t, const TensorEntry& e, ChunkRange cr, auto tag) {
    using T = decltype(tag);
    chunk_update<T>(avx2, static_cast<T*>(e.g) + cr.begin, static_cast<const T*>(e.r) + cr.begin,
                    cr.end - cr.begin, coef);
  });
}

}  // namespace

const char* cpu_isa() { return use_avx2() ? "avx2" : "baseline"; }

void force_cpu_baseline(bool baseline) { force_baseline.store(baseline, std::memory_order_relaxed); }

namespace {

// A 0-dim CPU tensor holding v: at::scalar_tensor without its two trips through the
// dispatcher (empty, then fill_), a fixed cost of every call.
template <typename T>
at::Tensor cpu_scalar(T v) {
  at::Tensor t = at::detail::empty_cpu({}, c10::CppTypeToScalarType<T>::value);
  *t.mutable_data_ptr<T>() = v;
  return t;
}

}  // namespace

ProjectResult project_table_cpu(const Table& table, double eps) {
  const auto [dot, rr] = table_sums(table);
  double coef = 0.0;
  const bool projected = decide(dot, rr, eps, &coef);
  if (projected) table_update(table, coef);
  return {cpu_scalar(dot), cpu_scalar(rr), cpu_scalar(coef), cpu_scalar(projected)};
}

ProjectResult project_cpu(at::TensorList grads, at::TensorList refs, at::TensorList ref_only,
                          double eps) {
  return project_table_cpu(build_table(grads, refs, ref_only), eps);
}

at::Tensor sums_cpu(at::TensorList grads, at::TensorList refs, at::TensorList ref_only) {
  const auto [dot, rr] = table_sums(build_table(grads, refs, ref_only));
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
  out.data_ptr<double>()[0] = dot;
  out.data_ptr<double>()[1] = rr;
  return out;
}

void apply_cpu(at::TensorList grads, at::TensorList refs, const at::Tensor& coef,
               const at::Tensor& projected) {
  check_decision(coef, projected, at::kCPU);
  const Table table = build_table(grads, refs, {});
  if (projected.item<bool>()) table_update(table, coef.item<double>());
}

}  // namespace agem_fast
