// Occupancy-grid ray marching (nerfacc's traversal semantics, the pure-torch twin's exact outputs):
// the launchers' declarations. The march of one ray is in occgrid_kernel.h, shared by the CPU and
// CUDA launchers.
#pragma once

#include <cstdint>
#include <vector>

#include "kernel_common.h"

namespace fastnefes {

constexpr int kMaxMips = 20;  // grids up to 2^20 cells per axis

// T: the rays' type (float / double); every position and distance the twin computes in T is
// computed in T here, operation by operation.
template <typename T>
struct MarchArgs {
  int64_t n_rays;
  const T* rays_o;          // [R, 3]
  const T* rays_d;          // [R, 3]
  const T* near;            // [R] march start (the march is anchored here: t_0 = near)
  const T* far;             // [R]
  const uint8_t* binaries;  // [L, res0, res1, res2] 0 / 1, x-major (nerfacc's layout)
  const uint8_t* mips;      // coarser occupancies, mips 1..n_mips (occgrid_mip_offset)
  const T* aabbs;           // [L, 6] nested boxes (level l + 1 contains level l)
  int n_levels;
  int res[3];
  int n_mips;
  int64_t mip_offset[kMaxMips + 1];  // first cell of mip m (m >= 1) in `mips`
  double step;              // render step size
  double cone_angle;        // > 0: steps grow as t * cone_angle once that exceeds step
};

// The skip's mips (occgrid_kernel.h): for m >= 1, blocks of 2^m x 2^m x 2^m cells, ceil(res / 2^m)
// per axis, up to the first mip of one cell; all levels of mip 1, then all of mip 2, ...; a cell
// is 0 when its block is free to skip. occgrid_plan_mips sets n_mips and mip_offset and returns
// the cells of all mips.
template <typename T>
int64_t occgrid_plan_mips(MarchArgs<T>& a);

// The CPU march's packed samples, one part per block of rays (concatenated in ray order).
template <typename T>
struct MarchSample {
  int64_t ray;
  T t_start, t_end;
};

template <typename T>
using MarchParts = std::vector<std::vector<MarchSample<T>>>;

template <typename T>
MarchParts<T> occgrid_march_cpu(const MarchArgs<T>& a, int n_threads);

// Samples in all parts, and the parts concatenated into [N] arrays.
template <typename T>
int64_t march_parts_size(const MarchParts<T>& parts);
template <typename T>
void copy_march_parts(const MarchParts<T>& parts, int64_t* ray_indices, T* t_starts, T* t_ends);

// binaries [L, res^3] and aabbs [L, 6] -> mips [occgrid_plan_mips cells]; scratch: of
// mips_scratch_layout(res, L).size cells (the occupancy pyramid of the grid dilated by one cell,
// and its first level's intermediate passes).

// The scratch's layout, shared by the CPU and CUDA launchers: the dilated pyramid (mips 1..n_mips,
// as in `mips`), then the first two halving passes' outputs; the third pass writes the pyramid's
// mip 1 (pass_offset[2] = 0). size: the scratch's cells.
struct MipsScratch {
  int n_mips;
  int64_t pass_offset[3], size;
};
MipsScratch mips_scratch_layout(const int res[3], int n_levels);
void occgrid_mips_cpu(const uint8_t* binaries, const float* aabbs, int n_levels, const int res[3], uint8_t* scratch,
                      uint8_t* mips, int n_threads);

// The same arguments with the float pointers type-erased (for the CUDA entry points).
template <typename T>
MarchArgs<void> erase_type(const MarchArgs<T>& a) {
  MarchArgs<void> e{a.n_rays, a.rays_o, a.rays_d, a.near, a.far, a.binaries, a.mips, a.aabbs, a.n_levels,
                    {a.res[0], a.res[1], a.res[2]}, a.n_mips, {}, a.step, a.cone_angle};
  for (int m = 0; m <= kMaxMips; ++m) e.mip_offset[m] = a.mip_offset[m];
  return e;
}

// CUDA entry points, type-erased (occgrid_cuda.cu; raising in the CPU-only build): the samples
// are counted per ray, the caller turns counts into offsets (an exclusive cumulative sum), then
// the same march writes them.
void occgrid_count_cuda(DType dtype, const MarchArgs<void>& a, int64_t* counts, int device, void* stream);
void occgrid_fill_cuda(DType dtype, const MarchArgs<void>& a, const int64_t* offsets, int64_t* ray_indices,
                       void* t_starts, void* t_ends, int device, void* stream);
void occgrid_mips_cuda(const uint8_t* binaries, const float* aabbs, int n_levels, const int res[3], uint8_t* scratch,
                       uint8_t* mips, int device, void* stream);

}  // namespace fastnefes
