// Fused volume compositing of packed samples: the launchers' declarations (the arithmetic of one
// ray is in composite_kernel.h, shared by both launchers).
//
// Samples are packed ray after ray; ray r owns samples [ranges[2r], ranges[2r] + ranges[2r+1]).
// Per sample j of a ray: dt_j = t_end_j - t_start_j, alpha_j = 1 - exp(-sigma_j dt_j),
// T_j = exp(-sum_{k<j} sigma_k dt_k), w_j = T_j alpha_j. The ray stops at its first sample with
// T_j < threshold (early termination; threshold 0 disables it). Outputs per ray:
// rgb = sum w c, features = sum w f, depth = sum w (t_start + t_end) / 2, opacity = sum w.
#pragma once

#include <cstdint>

#include "kernel_common.h"

namespace fastnefes {

// T is the storage type of every float array (void in the type-erased CUDA entry points).
template <typename T>
struct CompositeInputs {
  int64_t n_rays;
  const int64_t* ranges;  // [R, 2] (first sample, sample count)
  const T* sigmas;        // [N]
  const T* rgbs;          // [N, 3]
  const T* features;      // [N, D], null when D == 0
  int64_t n_features;     // D
  const T* t_starts;      // [N]
  const T* t_ends;        // [N]
  double threshold;       // transmittance below which a ray stops
};

template <typename T>
struct CompositeOutputs {
  T* rgb;       // [R, 3]
  T* features;  // [R, D], null when D == 0
  T* depth;     // [R]
  T* opacity;   // [R]
};

// Backward: the forward's outputs, the upstream gradients (null = zero) and the input gradients
// to write (null = not needed). Every non-null input gradient is fully written (no pre-zeroing).
template <typename T>
struct CompositeGrads {
  const T* rgb;        // forward outputs [R, 3]
  const T* features;   // [R, D]
  const T* depth;      // [R]
  const T* opacity;    // [R]
  const T* g_rgb;      // upstream gradients, same shapes, nullable
  const T* g_features;
  const T* g_depth;
  const T* g_opacity;
  T* d_sigmas;         // [N] input gradients, nullable
  T* d_rgbs;           // [N, 3]
  T* d_features;       // [N, D]
  T* d_t_starts;       // [N]
  T* d_t_ends;         // [N]
  bool detach_feature_weights;  // features use w.detach(): no gradient from features into sigma / t
};

template <typename T>
void composite_forward_cpu(const CompositeInputs<T>& in, const CompositeOutputs<T>& out, int n_threads);

template <typename T>
void composite_backward_cpu(const CompositeInputs<T>& in, const CompositeGrads<T>& g, int n_threads);

// ray_indices [N] sorted -> ranges [R, 2]. Returns -1 when sorted and in [0, R), else the first
// offending sample index.
int64_t ray_ranges_cpu(const int64_t* ray_indices, int64_t n_samples, int64_t n_rays, int64_t* ranges);

// CUDA entry points, type-erased (composite_cuda.cu; no_cuda.cpp in the CPU-only build, where they
// raise); the kernels accumulate in float (double for float64) on `stream` of `device`.
void composite_forward_cuda(DType dtype, const CompositeInputs<void>& in, const CompositeOutputs<void>& out,
                            int device, void* stream);
void composite_backward_cuda(DType dtype, const CompositeInputs<void>& in, const CompositeGrads<void>& g,
                             int device, void* stream);
void ray_ranges_cuda(const int64_t* ray_indices, int64_t n_samples, int64_t n_rays, int64_t* ranges,
                     int device, void* stream);

}  // namespace fastnefes
