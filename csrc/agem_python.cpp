// The Python module of the extension: build information and the eager fast path of
// agem_fast.project_. (The ops themselves live in torch.ops.agem_fast; CMake builds
// for C++ users leave this file out.)
//
// Why a fast path: planning a call in Python costs microseconds per parameter, which
// on a GPU is more than the kernels take for a whole ResNet. project_plain does the
// plain, valid case in C++ with no Python object per tensor, and declines (returns
// None, having written nothing) on anything else, so the Python planner keeps sole
// charge of errors, odd layouts, tensor subclasses and torch.compile.
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "agem_ops.h"

namespace agem_fast {
namespace {

// Whether this build has kernels for t's device.
bool has_kernels(const at::Tensor& t) {
#ifdef AGEM_FAST_WITH_CUDA
  return t.is_cpu() || t.is_cuda();
#else
  return t.is_cpu();
#endif
}

// A tensor the kernels take as flat memory with no staging: dense (non-overlapping,
// no gaps; contiguous, channels_last, ...), a supported dtype, no lazy negation, and no
// Python subclass dispatch (e.g. DTensor), on a device this build has kernels for.
bool plain(const at::Tensor& t) {
  return t.layout() == at::kStrided && has_kernels(t) && t.has_storage() && !t.is_nested() &&
         !t.is_neg() && !t.unsafeGetTensorImpl()->is_python_dispatch() &&
         dtype_code(t.scalar_type()) >= 0 && t.is_non_overlapping_and_dense();
}

// Whether g and r, both dense, hold their elements in the same memory order: both
// contiguous (any shapes), or one shape and one set of strides (size-1 dims aside).
bool same_order(const at::Tensor& g, const at::Tensor& r) {
  if (g.is_contiguous() && r.is_contiguous()) return true;
  if (g.sizes() != r.sizes()) return false;
  for (int64_t d = 0; d < g.dim(); ++d) {
    if (g.size(d) != 1 && g.stride(d) != r.stride(d)) return false;
  }
  return true;
}

// The device all tensors must share: the first one seen sets it.
bool same_device(std::optional<at::Device>& device, const at::Tensor& t) {
  if (!device) device = t.device();
  return t.device() == *device;
}

// The bytes [lo, hi) of a dense tensor's elements.
struct Span {
  uintptr_t lo, hi;
};

// Whether a written gradient shares memory with another one, or with what must not change
// while pass 2 runs (a reference that is not exactly its own gradient, a gradient that has
// no reference): the result would then depend on the order of the writes.
// All spans are of dense tensors, so overlapping spans do share elements (the planner
// raises with the indices).
bool any_shared_memory(std::vector<Span>& grads, const std::vector<Span>& refs) {
  auto by_lo = [](const Span& a, const Span& b) { return a.lo < b.lo; };
  std::sort(grads.begin(), grads.end(), by_lo);
  for (size_t k = 1; k < grads.size(); ++k) {
    if (grads[k].lo < grads[k - 1].hi) return true;
  }
  // Disjoint and sorted by lo, so sorted by hi too: the first gradient ending after r
  // begins is the only candidate that can start before r ends.
  for (const Span& r : refs) {
    auto it = std::partition_point(grads.begin(), grads.end(),
                                   [&](const Span& g) { return g.hi <= r.lo; });
    if (it != grads.end() && it->lo < r.hi) return true;
  }
  return false;
}

// params: a list of tensors. refs: a list aligned with params (tensors or None), or a
// 1-D tensor in Avalanche's flat layout. Returns (dot, rr, coef, projected) or None.
py::object project_plain(const py::list& params, const py::object& refs, double eps) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  const bool flat_form = THPVariable_Check(refs.ptr());
  at::Tensor flat;
  if (flat_form) {
    flat = THPVariable_Unpack(refs.ptr());
    if (flat.dim() != 1 || !plain(flat) || !flat.is_contiguous()) return py::none();
  } else if (!PyList_Check(refs.ptr()) || PyList_GET_SIZE(refs.ptr()) != n) {
    return py::none();
  }

  const bool inference_mode = c10::InferenceMode::is_enabled();
  std::optional<at::Device> device;
  const char* flat_base = nullptr;
  int64_t flat_offset = 0;
  if (flat_form) {
    device = flat.device();
    flat_base = static_cast<const char*>(flat.const_data_ptr());
  }
  // A parameter listed twice is refused. One whose gradient is written shows up as two
  // gradients sharing memory (any_shared_memory below); the others are kept here and
  // compared by address (a sorted vector: no allocation per tensor, unlike a hash set).
  std::vector<const c10::TensorImpl*> seen;
  std::vector<c10::TensorImpl*> grads;  // updated in place: their version counters are bumped
  grads.reserve(n);
  // The memory of every tensor read or written, owned: the kernels run without the GIL,
  // when another thread could drop the caller's last reference to one of them. Storages,
  // not tensors: copying a tensor owned only by its Python object (a list's entry) increfs
  // that object through the GIL state API, about 200 instructions with the release; a
  // storage rarely has a Python object, and costs an atomic increment.
  std::vector<c10::Storage> held;
  held.reserve(flat_form ? n : 2 * n);
  struct RefOnly { const void* r; int64_t numel; at::ScalarType dtype; };
  std::vector<RefOnly> ref_only;
  Table table;
  table.entries.reserve(n);
  std::vector<Span> grad_spans, ref_spans;  // written, and read, memory (non-empty tensors)
  grad_spans.reserve(n);
  ref_spans.reserve(n);

  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p_obj = PyList_GET_ITEM(params.ptr(), i);
    if (!THPVariable_Check(p_obj)) return py::none();
    const at::Tensor& p = THPVariable_Unpack(p_obj);
    if (p.unsafeGetTensorImpl()->is_python_dispatch()) return py::none();
    const at::Tensor& g = p.grad();

    // The reference: a slice of the flat tensor (by pointer: no view is made), or the
    // list's entry (undefined for None).
    const void* r = nullptr;
    int64_t r_numel = 0;
    at::ScalarType r_dtype;
    bool r_order_ok = true;  // r's memory order is g's
    if (flat_form) {
      r_order_ok = !g.defined() || g.is_contiguous();  // the slice is row-major
      r_numel = p.numel();
      if (r_numel > flat.numel() - flat_offset) return py::none();
      r = flat_base + flat_offset * flat.element_size();
      r_dtype = flat.scalar_type();
      flat_offset += r_numel;
    } else if (PyObject* r_obj = PyList_GET_ITEM(refs.ptr(), i); r_obj != Py_None) {
      if (!THPVariable_Check(r_obj)) return py::none();
      const at::Tensor& rt = THPVariable_Unpack(r_obj);
      if (!plain(rt) || !same_device(device, rt)) return py::none();
      held.push_back(rt.storage());
      r = rt.const_data_ptr();  // read only: no copy-on-write materialisation
      r_numel = rt.numel();
      r_dtype = rt.scalar_type();
      r_order_ok = !g.defined() || same_order(g, rt);
    } else {  // no reference: the gradient is neither counted nor changed
      if (g.defined() && !(plain(g) && same_device(device, g))) return py::none();
      seen.push_back(p.unsafeGetTensorImpl());
      if (g.defined() && g.numel()) {  // met again as a written gradient: listed twice
        const uintptr_t g_lo = reinterpret_cast<uintptr_t>(g.data_ptr());
        ref_spans.push_back({g_lo, g_lo + static_cast<uintptr_t>(g.nbytes())});
      }
      continue;
    }
    const uintptr_t r_lo = reinterpret_cast<uintptr_t>(r);
    const uintptr_t r_bytes = static_cast<uintptr_t>(r_numel) * c10::elementSize(r_dtype);
    if (!g.defined()) {  // reference-only: counts in ||r||^2
      if (r_numel != p.numel()) return py::none();
      ref_only.push_back({r, r_numel, r_dtype});  // read in pass 1 only: never a hazard
      seen.push_back(p.unsafeGetTensorImpl());
      continue;
    }
    if (!plain(g) || g.scalar_type() != r_dtype || g.numel() != r_numel || !r_order_ok ||
        !same_device(device, g) || (g.is_inference() && !inference_mode)) {
      return py::none();  // an inference grad outside inference mode: the planner raises
    }
    table.add(g.data_ptr(), r, r_numel, dtype_code(r_dtype));
    grads.push_back(g.unsafeGetTensorImpl());
    held.push_back(g.storage());
    if (r_bytes) {
      const uintptr_t g_lo = reinterpret_cast<uintptr_t>(g.data_ptr());
      grad_spans.push_back({g_lo, g_lo + r_bytes});
      // r exactly g (same bytes, same order: checked above) is harmless: each element is
      // read before it is written. A flat reference is one span, added below.
      if (r_lo != g_lo && !flat_form) ref_spans.push_back({r_lo, r_lo + r_bytes});
    } else {
      seen.push_back(p.unsafeGetTensorImpl());
    }
  }
  if (flat_form && flat_offset != flat.numel()) return py::none();
  std::sort(seen.begin(), seen.end());
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) return py::none();  // listed twice
  if (!device) return py::none();  // no tensor at all: the planner answers
  if (flat_form && flat.numel()) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(flat_base);
    ref_spans.push_back({lo, lo + static_cast<uintptr_t>(flat.nbytes())});
  }
  if (any_shared_memory(grad_spans, ref_spans)) return py::none();  // the planner raises
  table.end_pairs();
  for (const RefOnly& e : ref_only) table.add(nullptr, e.r, e.numel, dtype_code(e.dtype));

  // What an in-place op does: autograd can then tell a saved gradient was modified. Done
  // here, while the GIL keeps every gradient's tensor alive.
  for (c10::TensorImpl* g : grads) {
    if (!g->is_inference()) g->bump_version();
  }
  ProjectResult result;
  {
    py::gil_scoped_release no_gil;  // every tensor passed plain(): the device has kernels
#ifdef AGEM_FAST_WITH_CUDA
    result = device->is_cuda() ? project_table_cuda(table, *device, eps)
                               : project_table_cpu(table, eps);
#else
    result = project_table_cpu(table, eps);
#endif
  }
  auto& [dot, rr, coef, projected] = result;
  return py::make_tuple(dot, rr, coef, projected);
}

}  // namespace
}  // namespace agem_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "agem_fast C++/CUDA kernels (ops live in torch.ops.agem_fast)";
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef AGEM_FAST_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = pybind11::cast(agem_fast::cuda_archs());
#else
    info["cuda"] = false;
#endif
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["chunk_elems"] = agem_fast::kChunkElems;
    info["cpu_isa"] = agem_fast::cpu_isa();
    return info;
  });
  m.def("_force_cpu_baseline", &agem_fast::force_cpu_baseline, py::arg("baseline"),
        "tests only: run the CPU kernels' baseline (SSE2) copies even where AVX2 is there");
#ifdef AGEM_FAST_WITH_CUDA
  m.def("_cuda_table_route", &agem_fast::cuda_table_route,
        "how the CUDA kernels get the tensor table: 'upload' or 'inline'");
  m.def("_set_cuda_table_route", &agem_fast::set_cuda_table_route, py::arg("route"),
        "tests and benchmarks: 'upload' or 'inline' (AGEM_FAST_CUDA_TABLE sets the first value)");
  m.def("_cuda_inline_table_sizes", &agem_fast::cuda_inline_table_sizes,
        "the table sizes (entries) the 'inline' route can take; larger tables are uploaded");
#endif
  m.def("project_plain", &agem_fast::project_plain, py::arg("params"), py::arg("refs"),
        py::arg("eps"),
        "project_ for plain valid inputs, all in C++; None (nothing written) otherwise");
}
