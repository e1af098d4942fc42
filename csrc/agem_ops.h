// Host-side declarations of the agem_fast op: table planning and the per-device impls.
#pragma once

#include <ATen/ATen.h>

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
};

// Checks the op's inputs (each pair dense with identical strides and dtype, all on one
// device) and lays out the table. Empty tensors are left out.
Table build_table(at::TensorList grads, at::TensorList refs, at::TensorList ref_only);

// Device of the first tensor of the op's lists (they are checked to agree).
at::Device op_device(at::TensorList grads, at::TensorList ref_only);

ProjectResult project_cpu(at::TensorList grads, at::TensorList refs, at::TensorList ref_only,
                          double eps);

}  // namespace agem_fast
