// CUDA launcher of the compositing kernel body (composite_kernel.h). A group of G lanes (1, 8 or
// 32, by feature width) handles one ray: every lane walks the ray's samples and recomputes the
// same transmittance chain (sigma and t are broadcast loads), lane i owns feature dims i, i+G, ...;
// lane 0 owns rgb / depth / opacity. Storage may be half or bfloat16; all arithmetic is in float
// (double for float64 storage).
// cuda_common.h first: its half / bfloat16 Storage specialisations precede every use.
#include "cuda_common.h"
#include "composite.h"
#include "composite_kernel.h"

namespace fastnefes {
namespace {

// Feature dims held in registers per lane in the forward; wider features loop over chunks of
// G * kDimsPerLane dims, recomputing the (cheap) transmittance chain per chunk.
constexpr int kDimsPerLane = 8;

template <int G>
__device__ __forceinline__ unsigned group_mask() {
  if constexpr (G == 32) {
    return 0xffffffffu;
  } else {
    const unsigned lane_in_warp = threadIdx.x & 31u;
    return ((1u << G) - 1u) << (lane_in_warp / G * G);
  }
}

// G lanes of a warp per ray (see the Lanes policy in composite_kernel.h).
template <typename A, typename S, int G>
struct WarpLanes {
  int lane;
  A feat[kDimsPerLane];

  __device__ int64_t chunk(int64_t) const { return int64_t(G) * kDimsPerLane; }
  __device__ bool lead() const { return lane == 0; }
  __device__ void begin(S*, int64_t, int64_t) {
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) feat[i] = A(0);
  }
  __device__ void add(A w, const S* f, int64_t base, int64_t D) {
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int64_t d = base + lane + int64_t(i) * G;
      if (d < D) feat[i] += w * A(load(f, d));
    }
  }
  __device__ void finish(S* row, int64_t base, int64_t D) const {
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int64_t d = base + lane + int64_t(i) * G;
      if (d < D) store(row, d, feat[i]);
    }
  }
  __device__ A sum(A v) const {
#pragma unroll
    for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(group_mask<G>(), v, offset, G);
    return v;
  }
  __device__ A dot(const S* a, const S* b, int64_t D) const {
    A s = 0;
    for (int64_t d = lane; d < D; d += G) s += A(load(a, d)) * A(load(b, d));
    return s;
  }
  __device__ void scaled(S* dst, A w, const S* src, int64_t D) const {
    for (int64_t d = lane; d < D; d += G) store(dst, d, src ? w * A(load(src, d)) : A(0));
  }
  __device__ void zero_rows(S* dst, int64_t from, int64_t to, int64_t D) const {
    for (int64_t k = from; k < to; ++k)
      for (int64_t d = lane; d < D; d += G) store(dst, k * D + d, A(0));
  }
};

template <typename S, int G>
__global__ void forward_kernel(CompositeInputs<S> in, CompositeOutputs<S> out) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = tid / G;
  if (r >= in.n_rays) return;
  WarpLanes<AccOf<S>, S, G> lanes{int(tid % G)};
  composite_forward_ray<AccOf<S>>(in, out, r, lanes);
}

template <typename S, int G>
__global__ void backward_kernel(CompositeInputs<S> in, CompositeGrads<S> g) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = tid / G;
  if (r >= in.n_rays) return;
  WarpLanes<AccOf<S>, S, G> lanes{int(tid % G)};
  composite_backward_ray<AccOf<S>>(in, g, r, lanes);
}

// ranges[2r] = first sample of ray r, ranges[2r+1] = one past its last (turned into a count
// below); ids outside [0, R) are ignored. Unsorted ids give wrong (but in-bounds) ranges.
__global__ void ray_bounds_kernel(const int64_t* ids, int64_t n, int64_t n_rays, int64_t* ranges) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t r = ids[i];
  if (r < 0 || r >= n_rays) return;
  if (i == 0 || ids[i - 1] != r) ranges[2 * r] = i;
  if (i == n - 1 || ids[i + 1] != r) ranges[2 * r + 1] = i + 1;
}

__global__ void ends_to_counts_kernel(int64_t n_rays, int64_t* ranges) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < n_rays) ranges[2 * r + 1] = ranges[2 * r + 1] > ranges[2 * r] ? ranges[2 * r + 1] - ranges[2 * r] : 0;
}

template <typename S>
CompositeInputs<S> typed(const CompositeInputs<void>& in) {
  return {in.n_rays, in.ranges, static_cast<const S*>(in.sigmas), static_cast<const S*>(in.rgbs),
          static_cast<const S*>(in.features), in.n_features, static_cast<const S*>(in.t_starts),
          static_cast<const S*>(in.t_ends), in.threshold};
}

template <typename S>
CompositeOutputs<S> typed(const CompositeOutputs<void>& o) {
  return {static_cast<S*>(o.rgb), static_cast<S*>(o.features), static_cast<S*>(o.depth), static_cast<S*>(o.opacity)};
}

template <typename S>
CompositeGrads<S> typed(const CompositeGrads<void>& g) {
  return {static_cast<const S*>(g.rgb),        static_cast<const S*>(g.features), static_cast<const S*>(g.depth),
          static_cast<const S*>(g.opacity),    static_cast<const S*>(g.g_rgb),    static_cast<const S*>(g.g_features),
          static_cast<const S*>(g.g_depth),    static_cast<const S*>(g.g_opacity), static_cast<S*>(g.d_sigmas),
          static_cast<S*>(g.d_rgbs),           static_cast<S*>(g.d_features),     static_cast<S*>(g.d_t_starts),
          static_cast<S*>(g.d_t_ends),         g.detach_feature_weights};
}

// Lanes per ray: enough for the feature width, at most a warp.
int group_size(int64_t n_features) { return n_features <= 4 ? 1 : n_features <= 64 ? 8 : 32; }

template <int G>
dim3 grid_for(int64_t n_rays) {
  return dim3(unsigned((n_rays * G + kBlock - 1) / kBlock));
}

template <typename S>
void launch_forward(const CompositeInputs<void>& in, const CompositeOutputs<void>& out, cudaStream_t stream) {
  const auto ti = typed<S>(in);
  const auto to = typed<S>(out);
  switch (group_size(in.n_features)) {
    case 1: forward_kernel<S, 1><<<grid_for<1>(in.n_rays), kBlock, 0, stream>>>(ti, to); break;
    case 8: forward_kernel<S, 8><<<grid_for<8>(in.n_rays), kBlock, 0, stream>>>(ti, to); break;
    default: forward_kernel<S, 32><<<grid_for<32>(in.n_rays), kBlock, 0, stream>>>(ti, to); break;
  }
}

template <typename S>
void launch_backward(const CompositeInputs<void>& in, const CompositeGrads<void>& g, cudaStream_t stream) {
  const auto ti = typed<S>(in);
  const auto tg = typed<S>(g);
  switch (group_size(in.n_features)) {
    case 1: backward_kernel<S, 1><<<grid_for<1>(in.n_rays), kBlock, 0, stream>>>(ti, tg); break;
    case 8: backward_kernel<S, 8><<<grid_for<8>(in.n_rays), kBlock, 0, stream>>>(ti, tg); break;
    default: backward_kernel<S, 32><<<grid_for<32>(in.n_rays), kBlock, 0, stream>>>(ti, tg); break;
  }
}

}  // namespace

// The CUDA build links the *_cuda.cu launchers (the CPU-only build links no_cuda.cpp instead).
bool cuda_kernels_built() { return true; }

void composite_forward_cuda(DType dtype, const CompositeInputs<void>& in, const CompositeOutputs<void>& out,
                            int device, void* stream) {
  if (in.n_rays == 0) return;
  DeviceScope scope(device);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat: launch_forward<float>(in, out, s); break;
    case DType::kDouble: launch_forward<double>(in, out, s); break;
    case DType::kHalf: launch_forward<__half>(in, out, s); break;
    case DType::kBFloat16: launch_forward<__nv_bfloat16>(in, out, s); break;
  }
  check(cudaGetLastError(), "composite forward launch");
}

void composite_backward_cuda(DType dtype, const CompositeInputs<void>& in, const CompositeGrads<void>& g,
                             int device, void* stream) {
  if (in.n_rays == 0) return;
  DeviceScope scope(device);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat: launch_backward<float>(in, g, s); break;
    case DType::kDouble: launch_backward<double>(in, g, s); break;
    case DType::kHalf: launch_backward<__half>(in, g, s); break;
    case DType::kBFloat16: launch_backward<__nv_bfloat16>(in, g, s); break;
  }
  check(cudaGetLastError(), "composite backward launch");
}

void ray_ranges_cuda(const int64_t* ray_indices, int64_t n_samples, int64_t n_rays, int64_t* ranges, int device,
                     void* stream) {
  if (n_rays == 0) return;
  DeviceScope scope(device);
  auto s = static_cast<cudaStream_t>(stream);
  check(cudaMemsetAsync(ranges, 0, sizeof(int64_t) * 2 * n_rays, s), "cudaMemsetAsync");
  if (n_samples > 0)
    ray_bounds_kernel<<<unsigned((n_samples + kBlock - 1) / kBlock), kBlock, 0, s>>>(ray_indices, n_samples, n_rays, ranges);
  ends_to_counts_kernel<<<unsigned((n_rays + kBlock - 1) / kBlock), kBlock, 0, s>>>(n_rays, ranges);
  check(cudaGetLastError(), "ray ranges launch");
}

}  // namespace fastnefes
