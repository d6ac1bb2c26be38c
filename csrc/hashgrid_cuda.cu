// CUDA launcher of the hash-grid kernel body (hashgrid_kernel.h): one thread per (point, level),
// blockIdx.y = level, so the threads in flight read one level's table at a time (as tiny-cuda-nn).
// Positions are float (double for float64); parameters float, half or double; arithmetic in the
// positions' type. The backward adds to the table gradient and the position gradient atomically.
// cuda_common.h first: its half Storage specialisation precedes every use.
#include "cuda_common.h"
#include "hashgrid.h"
#include "hashgrid_kernel.h"

#include <stdexcept>

namespace fastnefes {
namespace {

// Table gradient of the CUDA backward: points of any thread may share entries.
template <typename G>
struct AtomicTableGrad {
  G* grad;
  __device__ bool enabled() const { return grad != nullptr; }
  template <typename A>
  __device__ void add(int64_t e, A v) {
    atomicAdd(grad + e, G(v));
  }
};

template <typename A, typename P, typename O, int kF>
__global__ void forward_kernel(HashGridArgs<A, P> a, O* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.n_points) return;
  const int l = blockIdx.y;
  const GridLevel lv = a.levels[l];
  const Corners<A> c = level_corners<A>(a.x + 3 * i, lv);
  A acc[kF];
  gather<A, P, kF>(a.params, lv, c, kF, acc);
  O* o = out + (i * a.n_levels + l) * kF;
#pragma unroll
  for (int f = 0; f < kF; ++f) store(o, f, acc[f]);
}

template <typename A, typename P, typename O, typename G, int kF>
__global__ void backward_kernel(HashGridArgs<A, P> a, const O* grad_out, G* grad_table, A* grad_x) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.n_points) return;
  const int l = blockIdx.y;
  const GridLevel lv = a.levels[l];
  const Corners<A> c = level_corners<A>(a.x + 3 * i, lv);
  A g[kF];
#pragma unroll
  for (int f = 0; f < kF; ++f) g[f] = A(load(grad_out, (i * a.n_levels + l) * kF + f));
  AtomicTableGrad<G> table{grad_table};
  A dx[3];
  scatter<A, P, kF>(a.params, lv, c, g, kF, table, grad_x != nullptr, dx);
  if (grad_x)
    for (int d = 0; d < 3; ++d) atomicAdd(grad_x + 3 * i + d, dx[d]);
}

template <typename A, typename P>
HashGridArgs<A, P> typed(const HashGridArgs<void, void>& a) {
  return {a.n_points, static_cast<const A*>(a.x), static_cast<const P*>(a.params), a.levels, a.n_levels, a.n_features};
}

dim3 grid_of(const HashGridArgs<void, void>& a) { return dim3(blocks_for(a.n_points), unsigned(a.n_levels)); }

template <typename A, typename P, typename O>
void launch_forward(const HashGridArgs<void, void>& a, void* out, cudaStream_t s) {
  const auto t = typed<A, P>(a);
  O* o = static_cast<O*>(out);
  switch (a.n_features) {
    case 1: forward_kernel<A, P, O, 1><<<grid_of(a), kBlock, 0, s>>>(t, o); break;
    case 2: forward_kernel<A, P, O, 2><<<grid_of(a), kBlock, 0, s>>>(t, o); break;
    case 4: forward_kernel<A, P, O, 4><<<grid_of(a), kBlock, 0, s>>>(t, o); break;
    case 8: forward_kernel<A, P, O, 8><<<grid_of(a), kBlock, 0, s>>>(t, o); break;
    default: throw std::invalid_argument("hash grid CUDA: features per level must be 1, 2, 4 or 8");
  }
}

template <typename A, typename P, typename O, typename G>
void launch_backward(const HashGridArgs<void, void>& a, const void* grad_out, void* grad_table, void* grad_x,
                     cudaStream_t s) {
  const auto t = typed<A, P>(a);
  const O* g = static_cast<const O*>(grad_out);
  G* gt = static_cast<G*>(grad_table);
  A* gx = static_cast<A*>(grad_x);
  switch (a.n_features) {
    case 1: backward_kernel<A, P, O, G, 1><<<grid_of(a), kBlock, 0, s>>>(t, g, gt, gx); break;
    case 2: backward_kernel<A, P, O, G, 2><<<grid_of(a), kBlock, 0, s>>>(t, g, gt, gx); break;
    case 4: backward_kernel<A, P, O, G, 4><<<grid_of(a), kBlock, 0, s>>>(t, g, gt, gx); break;
    case 8: backward_kernel<A, P, O, G, 8><<<grid_of(a), kBlock, 0, s>>>(t, g, gt, gx); break;
    default: throw std::invalid_argument("hash grid CUDA: features per level must be 1, 2, 4 or 8");
  }
}

// The supported dtype triples (x, params, out), as hashgrid.h lists them: calls `fn` with values
// of the x, params, out and table-gradient types, or throws.
template <class Fn>
void dispatch_dtypes(DType x, DType p, DType o, Fn&& fn) {
  if (x == DType::kFloat && p == DType::kFloat && o == DType::kFloat) return fn(float(), float(), float(), float());
  if (x == DType::kFloat && p == DType::kHalf && o == DType::kFloat) return fn(float(), __half(), float(), float());
  if (x == DType::kFloat && p == DType::kHalf && o == DType::kHalf) return fn(float(), __half(), __half(), float());
  if (x == DType::kDouble && p == DType::kDouble && o == DType::kDouble)
    return fn(double(), double(), double(), double());
  throw std::invalid_argument("hash grid CUDA: unsupported (positions, parameters, output) dtypes");
}

}  // namespace

void hashgrid_forward_cuda(DType x_dtype, DType param_dtype, DType out_dtype, const HashGridArgs<void, void>& a,
                           void* out, int device, void* stream) {
  if (a.n_points == 0) return;
  DeviceScope scope(device);
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtypes(x_dtype, param_dtype, out_dtype, [&](auto x, auto p, auto o, auto) {
    launch_forward<decltype(x), decltype(p), decltype(o)>(a, out, s);
  });
  check(cudaGetLastError(), "hash grid forward launch");
}

void hashgrid_backward_cuda(DType x_dtype, DType param_dtype, DType out_dtype, const HashGridArgs<void, void>& a,
                            const void* grad_out, void* grad_table, void* grad_x, int device, void* stream) {
  if (a.n_points == 0) return;
  DeviceScope scope(device);
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtypes(x_dtype, param_dtype, out_dtype, [&](auto x, auto p, auto o, auto g) {
    launch_backward<decltype(x), decltype(p), decltype(o), decltype(g)>(a, grad_out, grad_table, grad_x, s);
  });
  check(cudaGetLastError(), "hash grid backward launch");
}

}  // namespace fastnefes
