// Multiresolution hash-grid encoding, tiny-cuda-nn semantics (see
// fastnefes/ops/hashgrid/config.py): the launchers' declarations. The arithmetic of one point in
// one level is in hashgrid_kernel.h, shared by the CPU and CUDA launchers.
#pragma once

#include <cstdint>

#include "kernel_common.h"

namespace fastnefes {

// One level, as packed into the uint8 level tensors (pack_levels in bindings.cpp): 32 bytes,
// trivially copyable to the GPU.
struct GridLevel {
  double scale;         // exactly the float32 scale of the level
  uint32_t resolution;  // vertices per axis
  uint32_t size;        // entries
  int64_t offset;       // first entry
  uint32_t dense;       // 1: index x + y*res + z*res^2, 0: hashed
  uint32_t unused;
};
static_assert(sizeof(GridLevel) == 32, "GridLevel is packed into 32-byte records");

// X: position type (float / double), P: parameter storage (float / double; __half on CUDA).
template <typename X, typename P>
struct HashGridArgs {
  int64_t n_points;
  const X* x;               // [N, 3]
  const P* params;          // [n_entries * F]
  const GridLevel* levels;  // [L], on the tensors' device
  int n_levels;
  int n_features;           // F
};

// out [N, L*F], fully written.
template <typename T>
void hashgrid_forward_cpu(const HashGridArgs<T, T>& a, T* out, int n_threads);

// grad_out [N, L*F]; grad_params [n_entries * F] (nullable, fully written) and grad_x [N, 3]
// (nullable, fully written).
template <typename T>
void hashgrid_backward_cpu(const HashGridArgs<T, T>& a, const T* grad_out, T* grad_params, T* grad_x, int n_threads);

// CUDA entry points, type-erased (hashgrid_cuda.cu; raising in the CPU-only build). Supported
// (x, params, out) dtypes: (float, float, float), (float, half, float), (float, half, half),
// (double, double, double). grad_table has the params' dtype (float for half params), grad_x the
// positions'; both are nullable and arrive zeroed (the kernels add to them atomically).
void hashgrid_forward_cuda(DType x_dtype, DType param_dtype, DType out_dtype, const HashGridArgs<void, void>& a,
                           void* out, int device, void* stream);
void hashgrid_backward_cuda(DType x_dtype, DType param_dtype, DType out_dtype, const HashGridArgs<void, void>& a,
                            const void* grad_out, void* grad_table, void* grad_x, int device, void* stream);

}  // namespace fastnefes
