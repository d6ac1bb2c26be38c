// CUDA fused compositing. A group of G lanes (1, 8 or 32, by feature width) handles one ray:
// every lane walks the ray's samples and recomputes the same transmittance chain (sigma and t are
// broadcast loads; T_{j+1} = T_j exp(-sigma_j dt_j)), lane i owns feature dims i, i+G, ...;
// lane 0 owns rgb / depth / opacity.
// Storage may be half or bfloat16; all arithmetic is in float (double for float64 storage).
// Only CUDA headers are included, so this file compiles with nvcc alone (tests compile-check it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "composite.h"

namespace fastnefes {
namespace {

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(double* p, int64_t i, double v) { p[i] = v; }
__device__ __forceinline__ float exp_neg(float v) { return expf(-v); }
__device__ __forceinline__ double exp_neg(double v) { return exp(-v); }
template <typename A, typename S>
__device__ __forceinline__ A load_or_zero(const S* p, int64_t i) { return p ? A(load(p, i)) : A(0); }

template <typename S> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Feature dims held in registers per lane in the forward; wider features loop over chunks of
// G * kDimsPerLane dims, recomputing the (cheap) transmittance chain per chunk.
constexpr int kDimsPerLane = 8;
constexpr int kBlock = 256;

template <int G>
__device__ __forceinline__ unsigned group_mask() {
  if constexpr (G == 32) {
    return 0xffffffffu;
  } else {
    const unsigned lane_in_warp = threadIdx.x & 31u;
    return ((1u << G) - 1u) << (lane_in_warp / G * G);
  }
}

template <int G, typename A>
__device__ __forceinline__ A group_sum(A v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(group_mask<G>(), v, offset, G);
  return v;
}

template <typename S, int G>
__global__ void forward_kernel(CompositeInputs<S> in, CompositeOutputs<S> out) {
  using A = typename Acc<S>::type;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = tid / G;
  const int lane = int(tid % G);
  if (r >= in.n_rays) return;
  const int64_t first = in.ranges[2 * r], end = first + in.ranges[2 * r + 1];
  const int64_t D = in.n_features;
  const A threshold = A(in.threshold);
  const int64_t chunk = int64_t(G) * kDimsPerLane;
  // At least one pass (rgb / depth / opacity) even without features.
  for (int64_t base = 0; base == 0 || base < D; base += chunk) {
    A feat[kDimsPerLane];
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) feat[i] = A(0);
    A trans = 1, cr = 0, cg = 0, cb = 0, depth = 0, opacity = 0;
    for (int64_t j = first; j < end; ++j) {
      if (trans < threshold) break;
      const A ts = load(in.t_starts, j), te = load(in.t_ends, j);
      const A decay = exp_neg(A(load(in.sigmas, j)) * (te - ts));
      const A w = trans * (A(1) - decay);
      if (base == 0 && lane == 0) {
        cr += w * load(in.rgbs, 3 * j);
        cg += w * load(in.rgbs, 3 * j + 1);
        cb += w * load(in.rgbs, 3 * j + 2);
        depth += w * A(0.5) * (ts + te);
        opacity += w;
      }
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        const int64_t d = base + lane + int64_t(i) * G;
        if (d < D) feat[i] += w * A(load(in.features, j * D + d));
      }
      trans *= decay;
    }
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int64_t d = base + lane + int64_t(i) * G;
      if (d < D) store(out.features, r * D + d, feat[i]);
    }
    if (base == 0 && lane == 0) {
      store(out.rgb, 3 * r, cr);
      store(out.rgb, 3 * r + 1, cg);
      store(out.rgb, 3 * r + 2, cb);
      store(out.depth, r, depth);
      store(out.opacity, r, opacity);
    }
  }
}

// dL/d(sigma_j dt_j) = g_j T_{j+1} - (total - prefix_j): see composite_cpu.cpp.
template <typename S, int G>
__global__ void backward_kernel(CompositeInputs<S> in, CompositeGrads<S> g) {
  using A = typename Acc<S>::type;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = tid / G;
  const int lane = int(tid % G);
  if (r >= in.n_rays) return;
  const int64_t first = in.ranges[2 * r], end = first + in.ranges[2 * r + 1];
  const int64_t D = in.n_features;
  const A threshold = A(in.threshold);
  const bool feat_in_weight_grad = D && g.g_features && !g.detach_feature_weights;
  const A gr = load_or_zero<A>(g.g_rgb, 3 * r), gg = load_or_zero<A>(g.g_rgb, 3 * r + 1),
          gb = load_or_zero<A>(g.g_rgb, 3 * r + 2);
  const A gd = load_or_zero<A>(g.g_depth, r), go = load_or_zero<A>(g.g_opacity, r);
  A total = gr * A(load(g.rgb, 3 * r)) + gg * A(load(g.rgb, 3 * r + 1)) + gb * A(load(g.rgb, 3 * r + 2)) +
            gd * A(load(g.depth, r)) + go * A(load(g.opacity, r));
  if (feat_in_weight_grad) {
    A dot = 0;
    for (int64_t d = lane; d < D; d += G) dot += A(load(g.g_features, r * D + d)) * A(load(g.features, r * D + d));
    total += group_sum<G>(dot);
  }
  A trans = 1, prefix = 0;
  int64_t j = first;
  for (; j < end; ++j) {
    if (trans < threshold) break;
    const A ts = load(in.t_starts, j), te = load(in.t_ends, j), sigma = load(in.sigmas, j);
    const A dt = te - ts;
    const A decay = exp_neg(sigma * dt);
    const A w = trans * (A(1) - decay);
    A feat_dot = 0;
    if (g.d_features || feat_in_weight_grad) {
      for (int64_t d = lane; d < D; d += G) {
        const A gf = load_or_zero<A>(g.g_features, r * D + d);
        if (g.d_features) store(g.d_features, j * D + d, w * gf);
        if (feat_in_weight_grad) feat_dot += gf * A(load(in.features, j * D + d));
      }
    }
    if (feat_in_weight_grad) feat_dot = group_sum<G>(feat_dot);
    if (lane == 0) {
      const A mid = A(0.5) * (ts + te);
      const A dl_dw = gr * A(load(in.rgbs, 3 * j)) + gg * A(load(in.rgbs, 3 * j + 1)) +
                      gb * A(load(in.rgbs, 3 * j + 2)) + gd * mid + go + feat_dot;
      if (g.d_rgbs) {
        store(g.d_rgbs, 3 * j, w * gr);
        store(g.d_rgbs, 3 * j + 1, w * gg);
        store(g.d_rgbs, 3 * j + 2, w * gb);
      }
      prefix += w * dl_dw;
      const A dl_dsd = dl_dw * (trans * decay) - (total - prefix);
      if (g.d_sigmas) store(g.d_sigmas, j, dl_dsd * dt);
      const A dl_ddt = dl_dsd * sigma, dl_dmid = A(0.5) * w * gd;
      if (g.d_t_starts) store(g.d_t_starts, j, dl_dmid - dl_ddt);
      if (g.d_t_ends) store(g.d_t_ends, j, dl_dmid + dl_ddt);
    }
    trans *= decay;
  }
  // Samples behind the termination point contribute nothing.
  for (int64_t k = j; k < end; ++k) {
    for (int64_t d = lane; d < D; d += G)
      if (g.d_features) store(g.d_features, k * D + d, A(0));
    if (lane == 0) {
      if (g.d_sigmas) store(g.d_sigmas, k, A(0));
      if (g.d_t_starts) store(g.d_t_starts, k, A(0));
      if (g.d_t_ends) store(g.d_t_ends, k, A(0));
      if (g.d_rgbs)
        for (int c = 0; c < 3; ++c) store(g.d_rgbs, 3 * k + c, A(0));
    }
  }
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

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastnefes ") + what + ": " + cudaGetErrorString(err));
}

// Runs the launch with `device` current and restores the caller's device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

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
