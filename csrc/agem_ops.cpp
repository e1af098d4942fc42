// The agem_fast torch.library ops and their table planning.
#include "agem_ops.h"

#include <torch/library.h>

#include <string>

namespace agem_fast {

namespace {

int32_t checked_dtype_code(const at::Tensor& t, const char* what, size_t i) {
  const int32_t code = dtype_code(t.scalar_type());
  TORCH_CHECK_TYPE(code >= 0, "agem_fast: ", what, "[", i, "] has unsupported dtype ",
                   t.scalar_type(), "; supported: float16, bfloat16, float32, float64");
  return code;
}

void check_dense(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "agem_fast: ", what, "[", i, "] is not dense");
  TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), "agem_fast: ", what, "[", i,
                    "] must be non-overlapping and dense (the Python wrapper stages other layouts)");
}

}  // namespace

int32_t dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return kHalf;
    case at::kBFloat16: return kBFloat16;
    case at::kFloat: return kFloat;
    case at::kDouble: return kDouble;
    default: return -1;
  }
}

at::Device op_device(at::TensorList grads, at::TensorList ref_only) {
  if (!grads.empty()) return grads[0].device();
  TORCH_CHECK_VALUE(!ref_only.empty(), "agem_fast: project_ needs at least one tensor");
  return ref_only[0].device();
}

void check_decision(const at::Tensor& coef, const at::Tensor& projected, at::DeviceType device) {
  TORCH_CHECK_VALUE(coef.dim() == 0 && coef.scalar_type() == at::kDouble && coef.device().type() == device,
                    "agem_fast: coef must be a 0-dim float64 tensor on ", device);
  TORCH_CHECK_VALUE(projected.dim() == 0 && projected.scalar_type() == at::kBool &&
                        projected.device().type() == device,
                    "agem_fast: projected must be a 0-dim bool tensor on ", device);
}

Table build_table(at::TensorList grads, at::TensorList refs, at::TensorList ref_only) {
  TORCH_CHECK_VALUE(grads.size() == refs.size(), "agem_fast: ", grads.size(), " grads but ",
                    refs.size(), " refs");
  Table table;
  if (grads.empty() && ref_only.empty()) return table;
  const at::Device device = op_device(grads, ref_only);
  table.entries.reserve(grads.size() + ref_only.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& r = refs[i];
    TORCH_CHECK_VALUE(g.device() == device && r.device() == device, "agem_fast: pair ", i,
                      " is not on ", device);
    check_dense(g, "grads", i);
    check_dense(r, "refs", i);
    if (!(g.is_contiguous() && r.is_contiguous())) {
      TORCH_CHECK_VALUE(g.sizes() == r.sizes(), "agem_fast: grads[", i, "] has shape ", g.sizes(),
                        " but refs[", i, "] has ", r.sizes(), " (only contiguous pairs may differ)");
      for (int64_t d = 0; d < g.dim(); ++d) {
        // Strides of size-1 dimensions never matter for the element order.
        TORCH_CHECK_VALUE(g.size(d) == 1 || g.stride(d) == r.stride(d), "agem_fast: grads[", i,
                          "] and refs[", i, "] have different strides (memory orders)");
      }
    }
    TORCH_CHECK_VALUE(g.numel() == r.numel(), "agem_fast: grads[", i, "] has ", g.numel(),
                      " elements but refs[", i, "] has ", r.numel());
    const int32_t code = checked_dtype_code(g, "grads", i);
    TORCH_CHECK_TYPE(r.scalar_type() == g.scalar_type(), "agem_fast: refs[", i, "] is ",
                     r.scalar_type(), " but grads[", i, "] is ", g.scalar_type());
    table.add(g.data_ptr(), r.const_data_ptr(), r.numel(), code);
  }
  table.end_pairs();
  for (size_t i = 0; i < ref_only.size(); ++i) {
    const at::Tensor& r = ref_only[i];
    TORCH_CHECK_VALUE(r.device() == device, "agem_fast: ref_only[", i, "] is not on ", device);
    check_dense(r, "ref_only", i);
    table.add(nullptr, r.const_data_ptr(), r.numel(), checked_dtype_code(r, "ref_only", i));
  }
  return table;
}

}  // namespace agem_fast

TORCH_LIBRARY(agem_fast, m) {
  m.def(
      "project_(Tensor(a!)[] grads, Tensor[] refs, Tensor[] ref_only, float eps) -> "
      "(Tensor dot, Tensor ref_sq_norm, Tensor coef, Tensor projected)");
  m.def("sums(Tensor[] grads, Tensor[] refs, Tensor[] ref_only) -> Tensor");
  m.def("apply_(Tensor(a!)[] grads, Tensor[] refs, Tensor coef, Tensor projected) -> ()");
}

TORCH_LIBRARY_IMPL(agem_fast, CPU, m) {
  m.impl("project_", &agem_fast::project_cpu);
  m.impl("sums", &agem_fast::sums_cpu);
  m.impl("apply_", &agem_fast::apply_cpu);
}
