// Host-side declarations of the agem_fast op: table planning and the per-device impls.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "agem_table.h"

namespace agem_fast {

// (dot, ref_sq_norm, coef) as float64 0-dim tensors and `projected` as a bool one.
using ProjectResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct Table {
  std::vector<TensorEntry> entries;  // pairs first, then reference-only entries
  int64_t pair_chunks = 0;           // chunks of the (g, r) pairs: the update's range
  int64_t total_chunks = 0;          // + chunks of the reference-only tensors

  // Appends one tensor (g == nullptr: reference-only) after the entries so far; an
  // empty tensor gets no entry. Add every pair first, then call end_pairs().
  void add(void* g, const void* r, int64_t numel, int32_t dtype) {
    if (numel == 0) return;
    entries.push_back({g, r, numel, total_chunks, dtype, 0});
    total_chunks += chunks_for(numel);
  }
  void end_pairs() { pair_chunks = total_chunks; }
};

// DTypeCode of a supported dtype, -1 for any other.
int32_t dtype_code(at::ScalarType dtype);

// Checks the op's inputs (each pair dense with identical strides and dtype, all on one
// device; two contiguous tensors pair up whatever their shapes) and lays out the table.
// Empty tensors are left out.
Table build_table(at::TensorList grads, at::TensorList refs, at::TensorList ref_only);

// Device of the first tensor of the op's lists (they are checked to agree).
at::Device op_device(at::TensorList grads, at::TensorList ref_only);

// Checks the (coef, projected) pair given to apply_: 0-dim float64 and bool on `device`.
void check_decision(const at::Tensor& coef, const at::Tensor& projected, at::DeviceType device);

// Instruction set of the CPU kernels ("avx2" or "baseline", see cpu/agem_cpu.cpp), and a
// switch for tests to force the baseline copies (false: back to the best available).
const char* cpu_isa();
void force_cpu_baseline(bool baseline);

// The fused projection over a laid-out table, on the CPU or on `device` (CUDA): what
// project_ runs after build_table, and what the Python module's fast path calls.
ProjectResult project_table_cpu(const Table& table, double eps);
#ifdef AGEM_FAST_WITH_CUDA
ProjectResult project_table_cuda(const Table& table, const at::Device& device, double eps);

// How the CUDA kernels get the table: "inline" (inside the kernels' parameters, for tables
// of up to 96 or 512 entries; larger ones are uploaded) or "upload" (always a copy from
// pinned memory). The first call reads AGEM_FAST_CUDA_TABLE (default "inline"); the setter
// raises on any other name.
const char* cuda_table_route();
void set_cuda_table_route(const std::string& name);
// The table sizes (entries) the "inline" route can take, smallest first.
std::vector<int64_t> cuda_inline_table_sizes();
// The architectures the kernels were compiled for, as compute capabilities ("7.5", "8.0",
// "9.0" for TORCH_CUDA_ARCH_LIST "7.5;8.0;9.0+PTX"): what to compare with a GPU that
// finds no kernel image.
std::vector<std::string> cuda_archs();
#endif

// The three ops: project_ = sums + decide + apply_ in one call; sums and apply_ let a
// sharded caller all-reduce (dot, rr) between the two passes.
ProjectResult project_cpu(at::TensorList grads, at::TensorList refs, at::TensorList ref_only,
                          double eps);
at::Tensor sums_cpu(at::TensorList grads, at::TensorList refs, at::TensorList ref_only);
void apply_cpu(at::TensorList grads, at::TensorList refs, const at::Tensor& coef,
               const at::Tensor& projected);

}  // namespace agem_fast
