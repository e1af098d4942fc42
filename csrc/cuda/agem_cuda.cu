// CUDA kernels: two launches per projection for any number of tensors.
//
// Pass 1 (reduce_kernel): every block walks chunks of the tensor table and writes one
// (dot, rr) partial per chunk. The last block to finish (atomic ticket) sums the
// partials in fp64 in an order fixed by chunk index (strided per thread, then a fixed
// tree) and writes dot, rr, coef and the `projected` flag to device memory. No float atomics, so results are bitwise
// reproducible whatever the grid size.
// Pass 2 (update_kernel): reads the flag and returns at once when nothing projects;
// otherwise updates every gradient in place, g <- g - coef * r. Pass 1 walks the chunks
// from the last, pass 2 from the first: pass 2 starts on the data pass 1 left in L2.
//
// Both passes use 16-byte vector accesses where g and r are aligned alike, scalar
// accesses for the head/tail (or the whole chunk when their alignments differ), and
// 64-bit element indices. Nothing is read back to the host, and the only host-to-device
// copy is of the tensor table from pinned memory, so a projection can be captured in a
// CUDA graph.
// Tables of up to 96 entries (512 when built with CUDA 13) can instead travel inside the
// kernels' parameters (as PyTorch's multi-tensor kernels pass their tensor lists): no
// pinned staging buffer and no copy ahead of pass 1. That route is the default
// (AGEM_FAST_CUDA_TABLE=upload turns it off): on an H200 it made every profiled call
// faster, 3-22% (bench/results/gpu-nvidia-h200-20261127-1150/profile.log).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a
// minimal CUDA toolkit may not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../agem_ops.h"

namespace agem_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// A table passed by value. 96 entries are 3,840 bytes, which with the other arguments
// stays under the 4 KB of kernel parameters that every driver accepts. CUDA 12.1 raised
// the limit to 32,764 bytes on sm_70+ with a 12.1+ driver: every GPU and driver a CUDA
// 13 build runs on, so such a build also has a 512-entry size (20,480 bytes).
template <int N>
struct InlineTable {
  TensorEntry e[N];
};
constexpr int kInlineSmall = 96;
#if defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ >= 13
constexpr int kInlineLarge = 512;
#else
constexpr int kInlineLarge = 0;  // none
#endif

// __grid_constant__ (CUDA 11.7+, sm_70+) lets the kernels read a by-value table through a
// pointer; without it each thread would first copy the table into its local memory.
#if (__CUDACC_VER_MAJOR__ > 11 || (__CUDACC_VER_MAJOR__ == 11 && __CUDACC_VER_MINOR__ >= 7)) && \
    (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700)
#define AGEM_GRID_CONSTANT __grid_constant__
#else
#define AGEM_GRID_CONSTANT
#endif

template <typename T> struct Num;
template <> struct Num<__half> {
  using Acc = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <> struct Num<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Num<float> {
  using Acc = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <> struct Num<double> {
  using Acc = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};

// 16 bytes of T: the unit of every vector load and store.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// How a chunk of n elements splits into a scalar head, 16-byte vectors and a scalar
// tail. Vectors are used only when g (if any) and r share their offset modulo 16 bytes.
struct Split {
  int64_t head;  // scalar elements before the first aligned vector
  int64_t nvec;  // number of 16-byte vectors after the head
};

template <typename T>
__device__ __forceinline__ Split split_chunk(const void* g, const void* r, int64_t n) {
  constexpr int kN = Vec<T>::kN;
  const int64_t mis_r = (reinterpret_cast<uintptr_t>(r) % 16) / sizeof(T);
  if (g != nullptr && (reinterpret_cast<uintptr_t>(g) % 16) / sizeof(T) != mis_r) {
    return {n, 0};  // alignments differ: all scalar
  }
  int64_t head = mis_r == 0 ? 0 : kN - mis_r;
  if (head > n) head = n;
  return {head, (n - head) / kN};
}

// Sums a and b over the block; the totals land in thread 0. Fixed shuffle tree.
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
  __shared__ A sa[kWarps];
  __shared__ A sb[kWarps];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarps ? sa[lane] : A(0);
    b = lane < kWarps ? sb[lane] : A(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
  __syncthreads();  // sa/sb are reused by the next call
}

// <g, r> and <r, r> over one chunk, block-reduced into thread 0 (as doubles).
// g == nullptr: a reference-only entry, only <r, r>.
template <typename T>
__device__ void chunk_sums(const T* g, const T* r, int64_t n, double* dot_out, double* rr_out) {
  using A = typename Num<T>::Acc;
  constexpr int kN = Vec<T>::kN;
  A dot = 0, rr = 0;
  const Split s = split_chunk<T>(g, r, n);
  auto scalar = [&](int64_t i) {
    const A rv = Num<T>::load(r[i]);
    if (g != nullptr) dot += Num<T>::load(g[i]) * rv;
    rr += rv * rv;
  };
  for (int64_t i = threadIdx.x; i < s.head; i += kThreads) scalar(i);
  const Vec<T>* rv = reinterpret_cast<const Vec<T>*>(r + s.head);
  if (g != nullptr) {
    const Vec<T>* gv = reinterpret_cast<const Vec<T>*>(g + s.head);
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < s.nvec; v += kThreads) {
      const Vec<T> gx = gv[v], rx = rv[v];
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const A b = Num<T>::load(rx.v[k]);
        dot += Num<T>::load(gx.v[k]) * b;
        rr += b * b;
      }
    }
  } else {
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < s.nvec; v += kThreads) {
      const Vec<T> rx = rv[v];
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const A b = Num<T>::load(rx.v[k]);
        rr += b * b;
      }
    }
  }
  for (int64_t i = s.head + s.nvec * kN + threadIdx.x; i < n; i += kThreads) scalar(i);
  block_sum2<A>(dot, rr);
  if (threadIdx.x == 0) {
    *dot_out = static_cast<double>(dot);
    *rr_out = static_cast<double>(rr);
  }
}

template <typename T>
__device__ void chunk_update(T* g, const T* r, int64_t n, double coef_d) {
  using A = typename Num<T>::Acc;
  constexpr int kN = Vec<T>::kN;
  const A coef = static_cast<A>(coef_d);
  const Split s = split_chunk<T>(g, r, n);
  auto scalar = [&](int64_t i) {
    g[i] = Num<T>::store(Num<T>::load(g[i]) - coef * Num<T>::load(r[i]));
  };
  for (int64_t i = threadIdx.x; i < s.head; i += kThreads) scalar(i);
  Vec<T>* gv = reinterpret_cast<Vec<T>*>(g + s.head);
  const Vec<T>* rv = reinterpret_cast<const Vec<T>*>(r + s.head);
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < s.nvec; v += kThreads) {
    Vec<T> gx = gv[v];
    const Vec<T> rx = rv[v];
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      gx.v[k] = Num<T>::store(Num<T>::load(gx.v[k]) - coef * Num<T>::load(rx.v[k]));
    }
    gv[v] = gx;
  }
  for (int64_t i = s.head + s.nvec * kN + threadIdx.x; i < n; i += kThreads) scalar(i);
}

template <typename Fn>
__device__ __forceinline__ void dispatch_dtype(int32_t code, Fn&& fn) {
  switch (code) {  // uniform across the block: one entry per chunk
    case kHalf: fn(__half{}); break;
    case kBFloat16: fn(__nv_bfloat16{}); break;
    case kFloat: fn(float{}); break;
    default: fn(double{}); break;
  }
}

__device__ __forceinline__ void
reduce_body(const TensorEntry* __restrict__ table, int64_t n_entries, int64_t n_chunks,
            double2* __restrict__ partials, unsigned int* ticket, double* dot_out,
            double* rr_out, double* coef_out, bool* flag, double eps) {
  // Last chunk first, so that the chunks pass 2 starts with (the first ones) are the
  // last ones read here: the likeliest to be still in L2.
  for (int64_t i = blockIdx.x; i < n_chunks; i += gridDim.x) {
    const int64_t c = n_chunks - 1 - i;
    const TensorEntry e = table[find_entry(table, n_entries, c)];
    const ChunkRange cr = chunk_range(e, c);
    double dot = 0.0, rr = 0.0;
    dispatch_dtype(e.dtype, [&](auto tag) {
      using T = decltype(tag);
      const T* g = e.g != nullptr ? static_cast<const T*>(e.g) + cr.begin : nullptr;
      chunk_sums<T>(g, static_cast<const T*>(e.r) + cr.begin, cr.end - cr.begin, &dot, &rr);
    });
    if (threadIdx.x == 0) partials[c] = make_double2(dot, rr);
  }

  // Last block in: every other block's partials are visible once its ticket is taken.
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    __threadfence();
    is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  double dot = 0.0, rr = 0.0;
  for (int64_t c = threadIdx.x; c < n_chunks; c += kThreads) {
    const double2 p = __ldcg(&partials[c]);  // L2, never a stale L1 line
    dot += p.x;
    rr += p.y;
  }
  block_sum2<double>(dot, rr);
  if (threadIdx.x == 0) {
    double coef;
    *flag = decide(dot, rr, eps, &coef);
    *dot_out = dot;
    *rr_out = rr;
    *coef_out = coef;
    *ticket = 0u;  // ready for reuse of this workspace
  }
}

__global__ void __launch_bounds__(kThreads)
reduce_kernel(const TensorEntry* __restrict__ table, int64_t n_entries, int64_t n_chunks,
              double2* __restrict__ partials, unsigned int* ticket, double* dot_out,
              double* rr_out, double* coef_out, bool* flag, double eps) {
  reduce_body(table, n_entries, n_chunks, partials, ticket, dot_out, rr_out, coef_out, flag, eps);
}

template <int N>
__global__ void __launch_bounds__(kThreads)
reduce_kernel_inline(const AGEM_GRID_CONSTANT InlineTable<N> table, int64_t n_entries, int64_t n_chunks,
                     double2* __restrict__ partials, unsigned int* ticket, double* dot_out,
                     double* rr_out, double* coef_out, bool* flag, double eps) {
  reduce_body(table.e, n_entries, n_chunks, partials, ticket, dot_out, rr_out, coef_out, flag, eps);
}

__device__ __forceinline__ void
update_body(const TensorEntry* __restrict__ table, int64_t n_entries, int64_t n_pair_chunks,
            const double* coef, const bool* flag) {
  if (!*flag) return;  // not projecting: nothing more is read or written
  const double c_d = *coef;
  for (int64_t c = blockIdx.x; c < n_pair_chunks; c += gridDim.x) {
    const TensorEntry e = table[find_entry(table, n_entries, c)];
    const ChunkRange cr = chunk_range(e, c);
    dispatch_dtype(e.dtype, [&](auto tag) {
      using T = decltype(tag);
      chunk_update<T>(static_cast<T*>(e.g) + cr.begin, static_cast<const T*>(e.r) + cr.begin,
                      cr.end - cr.begin, c_d);
    });
  }
}

__global__ void __launch_bounds__(kThreads)
update_kernel(const TensorEntry* __restrict__ table, int64_t n_entries, int64_t n_pair_chunks,
              const double* coef, const bool* flag) {
  update_body(table, n_entries, n_pair_chunks, coef, flag);
}

// At least 4 blocks per SM (at most 64 registers): left free, ptxas gave this kernel 32
// registers and an 8-byte spill on sm_80 (5 spilled too; 6 exceeds sm_75's 1024 threads).
template <int N>
__global__ void __launch_bounds__(kThreads, 4)
update_kernel_inline(const AGEM_GRID_CONSTANT InlineTable<N> table, int64_t n_entries,
                     int64_t n_pair_chunks, const double* coef, const bool* flag) {
  update_body(table.e, n_entries, n_pair_chunks, coef, flag);
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Blocks for `chunks` chunks: at most one wave of resident blocks (occupancy of this
// kernel on this device, queried once), at least one block.
int64_t grid_for(int64_t chunks, int device, const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int64_t> resident;
  int64_t wave = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = resident.find({device, kernel});
    if (it == resident.end()) {
      int sms = 0, per_sm = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
      it = resident.emplace(std::make_pair(device, kernel), int64_t(sms) * std::max(per_sm, 1)).first;
    }
    wave = it->second;
  }
  return std::max<int64_t>(1, std::min<int64_t>(chunks, wave));
}

template <typename Kernel>
int64_t grid_for(int64_t chunks, int device, Kernel* kernel) {
  return grid_for(chunks, device, reinterpret_cast<const void*>(kernel));
}

// Pinned tables copied during graph capture must outlive the graph (its memcpy node
// re-reads them at every replay), so they are kept for the life of the process: one
// small block per captured call (40 bytes per tensor), so a program that re-records its
// graphs again and again keeps growing it (the inline route keeps nothing). Deliberately
// never destroyed: freeing pinned blocks at process exit could outlive the host allocator.
std::mutex captured_mutex;
std::vector<at::Tensor>* const captured_tables = new std::vector<at::Tensor>();

}  // namespace

namespace {

// How the table reaches the kernels: when it fits an InlineTable size, inside the kernels'
// parameters (kInline, the default), else copied up from pinned memory (kUpload, also
// chosen for every table by AGEM_FAST_CUDA_TABLE=upload). Read once
// from AGEM_FAST_CUDA_TABLE; tests and benchmarks switch it with set_cuda_table_route.
enum Route : int { kRouteUnset = -1, kUpload = 0, kInline = 1 };
std::atomic<int> route{kRouteUnset};

int parse_route(const std::string& name, const char* what) {
  if (name == "upload") return kUpload;
  TORCH_CHECK_VALUE(name == "inline", "agem_fast: ", what, " must be 'upload' or 'inline', got '", name, "'");
  return kInline;
}

int current_route() {
  int r = route.load(std::memory_order_relaxed);
  if (r == kRouteUnset) {
    const char* env = std::getenv("AGEM_FAST_CUDA_TABLE");
    std::string name = env != nullptr ? env : "";  // stripped and lower-cased, as AGEM_FAST_BACKEND
    const char* space = " \t\n\r\f\v";
    const size_t first = name.find_first_not_of(space);
    name = first == std::string::npos ? "" : name.substr(first, name.find_last_not_of(space) - first + 1);
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    r = name.empty() ? kInline : parse_route(name, "AGEM_FAST_CUDA_TABLE");
    int expected = kRouteUnset;
    route.compare_exchange_strong(expected, r);
    r = route.load(std::memory_order_relaxed);
  }
  return r;
}

// What the kernels of one call need: the table (on the device, or inline), and for
// pass 1 a workspace [ticket | per-chunk partials] whose ticket starts at zero.
struct DeviceTable {
  at::Tensor workspace;
  const TensorEntry* entries = nullptr;  // the table on the device (upload route)
  int inline_size = 0;                   // else the InlineTable size the kernels take
  int64_t n_entries = 0;
  unsigned int* ticket = nullptr;
  double2* partials = nullptr;
};

// The upload route: table and zeroed ticket go up in one copy from pinned memory
// (stream-ordered, no host sync), in a workspace [table | ticket | partials]; the
// partials are written by pass 1 before being read.
void upload(const Table& table, const at::Device& device, DeviceTable* dt) {
  const int64_t table_bytes = dt->n_entries * static_cast<int64_t>(sizeof(TensorEntry));
  const int64_t ticket_off = round_up(table_bytes, 16);
  const int64_t partials_off = ticket_off + 16;
  const int64_t total_bytes = partials_off + table.total_chunks * static_cast<int64_t>(sizeof(double2));

  at::Tensor host = at::empty({partials_off}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memset(host.data_ptr(), 0, partials_off);
  if (table_bytes > 0) std::memcpy(host.data_ptr(), table.entries.data(), table_bytes);
  at::Tensor ws = at::empty({total_bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  ws.narrow(0, 0, partials_off).copy_(host, /*non_blocking=*/true);

  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()), &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    std::lock_guard<std::mutex> lock(captured_mutex);
    captured_tables->push_back(host);
  }
  uint8_t* base = ws.data_ptr<uint8_t>();
  dt->workspace = ws;
  dt->entries = reinterpret_cast<const TensorEntry*>(base);
  dt->ticket = reinterpret_cast<unsigned int*>(base + ticket_off);
  dt->partials = reinterpret_cast<double2*>(base + partials_off);
}

// The table for this call's kernels; `with_partials`: pass 1 runs (not apply_ alone).
DeviceTable prepare(const Table& table, const at::Device& device, bool with_partials) {
  DeviceTable dt;
  dt.n_entries = static_cast<int64_t>(table.entries.size());
  dt.inline_size = current_route() != kInline ? 0
                   : dt.n_entries <= kInlineSmall ? kInlineSmall
                   : dt.n_entries <= kInlineLarge ? kInlineLarge : 0;
  if (dt.inline_size == 0) {
    upload(table, device, &dt);
    return dt;
  }
  if (with_partials) {  // [ticket (16 bytes) | partials], the ticket zeroed on the stream
    const int64_t bytes = 16 + table.total_chunks * static_cast<int64_t>(sizeof(double2));
    dt.workspace = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
    uint8_t* base = dt.workspace.data_ptr<uint8_t>();
    C10_CUDA_CHECK(cudaMemsetAsync(base, 0, sizeof(unsigned int),
                                   c10::cuda::getCurrentCUDAStream(device.index())));
    dt.ticket = reinterpret_cast<unsigned int*>(base);
    dt.partials = reinterpret_cast<double2*>(base + 16);
  }
  return dt;
}

// Calls fn with the table as an InlineTable of `size` entries (the unused ones zeroed).
template <int N, typename Fn>
void with_inline_table_of(const Table& table, Fn&& fn) {
  InlineTable<N> t;
  const size_t n = table.entries.size();
  if (n > 0) std::memcpy(t.e, table.entries.data(), n * sizeof(TensorEntry));
  std::memset(t.e + n, 0, (N - n) * sizeof(TensorEntry));
  fn(t);
}

template <typename Fn>
void with_inline_table(const Table& table, int size, Fn&& fn) {
  if (size == kInlineSmall) return with_inline_table_of<kInlineSmall>(table, fn);
#if defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ >= 13
  if (size == kInlineLarge) return with_inline_table_of<kInlineLarge>(table, fn);
#endif
  TORCH_CHECK(false, "agem_fast: no inline table of ", size, " entries");
}

// Pass 1 into *dot, *rr, *coef and *flag.
void launch_reduce(const Table& table, const DeviceTable& dt, const at::Device& device,
                   double* dot, double* rr, double* coef, bool* flag, double eps) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  if (dt.inline_size == 0) {
    reduce_kernel<<<grid_for(table.total_chunks, device.index(), reduce_kernel), kThreads, 0, stream>>>(
        dt.entries, dt.n_entries, table.total_chunks, dt.partials, dt.ticket, dot, rr, coef, flag, eps);
  } else {
    with_inline_table(table, dt.inline_size, [&](const auto& t) {
      constexpr int N = sizeof(t.e) / sizeof(TensorEntry);
      reduce_kernel_inline<N><<<grid_for(table.total_chunks, device.index(), reduce_kernel_inline<N>), kThreads,
                                 0, stream>>>(t, dt.n_entries, table.total_chunks, dt.partials, dt.ticket, dot,
                                              rr, coef, flag, eps);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pass 2, gated on the device-side flag.
void launch_update(const Table& table, const DeviceTable& dt, const at::Device& device,
                   const double* coef, const bool* flag) {
  if (table.pair_chunks == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  if (dt.inline_size == 0) {
    update_kernel<<<grid_for(table.pair_chunks, device.index(), update_kernel), kThreads, 0, stream>>>(
        dt.entries, dt.n_entries, table.pair_chunks, coef, flag);
  } else {
    with_inline_table(table, dt.inline_size, [&](const auto& t) {
      constexpr int N = sizeof(t.e) / sizeof(TensorEntry);
      update_kernel_inline<N><<<grid_for(table.pair_chunks, device.index(), update_kernel_inline<N>), kThreads,
                                 0, stream>>>(t, dt.n_entries, table.pair_chunks, coef, flag);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor new_f64(const at::Device& device) {
  return at::empty({}, at::TensorOptions().dtype(at::kDouble).device(device));
}

at::Tensor new_flag(const at::Device& device) {
  return at::empty({}, at::TensorOptions().dtype(at::kBool).device(device));
}

}  // namespace

const char* cuda_table_route() { return current_route() == kInline ? "inline" : "upload"; }

std::vector<int64_t> cuda_inline_table_sizes() {
  std::vector<int64_t> sizes{kInlineSmall};
  if (kInlineLarge > 0) sizes.push_back(kInlineLarge);
  return sizes;
}

std::vector<std::string> cuda_archs() {
  std::vector<std::string> names;
  for (int arch : {__CUDA_ARCH_LIST__}) {  // nvcc's list of virtual architectures: 750, 800, ...
    names.push_back(std::to_string(arch / 100) + "." + std::to_string(arch % 100 / 10));
  }
  return names;
}

void set_cuda_table_route(const std::string& name) {
  route.store(parse_route(name, "the CUDA table route"), std::memory_order_relaxed);
}

ProjectResult project_table_cuda(const Table& table, const at::Device& device, double eps) {
  const c10::cuda::CUDAGuard guard(device);
  const DeviceTable dt = prepare(table, device, /*with_partials=*/true);
  // Separate tensors: the op's schema promises outputs that alias nothing.
  at::Tensor dot = new_f64(device), rr = new_f64(device), coef = new_f64(device);
  at::Tensor flag = new_flag(device);
  launch_reduce(table, dt, device, dot.data_ptr<double>(), rr.data_ptr<double>(),
                coef.data_ptr<double>(), flag.data_ptr<bool>(), eps);
  launch_update(table, dt, device, coef.data_ptr<double>(), flag.data_ptr<bool>());
  return {dot, rr, coef, flag};
}

ProjectResult project_cuda(at::TensorList grads, at::TensorList refs, at::TensorList ref_only,
                           double eps) {
  const Table table = build_table(grads, refs, ref_only);
  return project_table_cuda(table, op_device(grads, ref_only), eps);
}

at::Tensor sums_cuda(at::TensorList grads, at::TensorList refs, at::TensorList ref_only) {
  const Table table = build_table(grads, refs, ref_only);
  const at::Device device = op_device(grads, ref_only);
  const c10::cuda::CUDAGuard guard(device);
  const DeviceTable dt = prepare(table, device, /*with_partials=*/true);
  at::Tensor sums = at::empty({2}, at::TensorOptions().dtype(at::kDouble).device(device));
  at::Tensor coef = new_f64(device), flag = new_flag(device);  // decided by the caller instead
  double* out = sums.data_ptr<double>();
  launch_reduce(table, dt, device, out, out + 1, coef.data_ptr<double>(), flag.data_ptr<bool>(), 0.0);
  return sums;
}

void apply_cuda(at::TensorList grads, at::TensorList refs, const at::Tensor& coef,
                const at::Tensor& projected) {
  check_decision(coef, projected, at::kCUDA);
  if (grads.empty()) return;
  const Table table = build_table(grads, refs, {});
  const at::Device device = op_device(grads, {});
  TORCH_CHECK_VALUE(coef.device() == device && projected.device() == device,
                    "agem_fast: coef and projected must be on ", device);
  if (table.pair_chunks == 0) return;  // only empty tensors: nothing to stage or launch
  const c10::cuda::CUDAGuard guard(device);
  const DeviceTable dt = prepare(table, device, /*with_partials=*/false);
  launch_update(table, dt, device, coef.data_ptr<double>(), projected.data_ptr<bool>());
}

}  // namespace agem_fast

TORCH_LIBRARY_IMPL(agem_fast, CUDA, m) {
  m.impl("project_", &agem_fast::project_cuda);
  m.impl("sums", &agem_fast::sums_cuda);
  m.impl("apply_", &agem_fast::apply_cuda);
}
