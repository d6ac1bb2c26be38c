// Multiresolution hash-grid encoding on the CPU, tiny-cuda-nn semantics (see
// fastnefes/ops/hashgrid/config.py): per level, p = scale * x + 0.5 rounded once to the storage
// type, cell = floor(p) as uint32, trilinear weights over the 8 corners (bit d = +1 along axis d),
// index = dense ? x + y*res + z*res^2 : x ^ y*2654435761 ^ z*805459861 (uint32), mod level size;
// params[(offset + index) * F + f], output column level * F + f.
#pragma once

#include <cstdint>

namespace fastnefes {

struct GridLevel {
  double scale;  // exactly the float32 scale of the level
  uint32_t resolution;
  uint32_t size;    // entries
  int64_t offset;   // first entry
  bool dense;
};

template <typename T>
struct HashGridArgs {
  int64_t n_points;
  const T* x;       // [N, 3]
  const T* params;  // [n_entries * F]
  const GridLevel* levels;
  int n_levels;
  int n_features;   // F
};

// out [N, L*F], fully written.
template <typename T>
void hashgrid_forward_cpu(const HashGridArgs<T>& a, T* out, int n_threads);

// grad_out [N, L*F]; grad_params [n_entries * F] (nullable, fully written) and grad_x [N, 3]
// (nullable, fully written).
template <typename T>
void hashgrid_backward_cpu(const HashGridArgs<T>& a, const T* grad_out, T* grad_params, T* grad_x, int n_threads);

}  // namespace fastnefes
