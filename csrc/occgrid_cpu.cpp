// CPU launcher of the occupancy-grid march (occgrid_kernel.h): blocks of rays in parallel
// (OpenMP, dynamic: rays differ a lot in length), each block's samples in its own vector, so the
// march runs once and the parts concatenate in ray order.
#include <algorithm>

#include "occgrid.h"
#include "occgrid_kernel.h"

namespace fastnefes {
namespace {

constexpr int64_t kRaysPerPart = 64;

template <typename T>
struct PartEmit {
  std::vector<MarchSample<T>>* out;
  void operator()(int64_t r, T t0, T t1) { out->push_back({r, t0, t1}); }
};

}  // namespace

// The mips' layout: n_mips, mip_offset[1..n_mips] (when given); returns their cells.
int64_t plan_pyramid(const int res[3], int n_levels, int* n_mips, int64_t* mip_offset) {
  int64_t total = 0;
  int m = 0;
  while (m < kMaxMips && std::max({mip_res(res[0], m), mip_res(res[1], m), mip_res(res[2], m)}) > 1) {
    ++m;
    if (mip_offset) mip_offset[m] = total;
    total += n_levels * mip_cells(res, m);
  }
  *n_mips = m;
  return total;
}

template <typename T>
int64_t occgrid_plan_mips(MarchArgs<T>& a) {
  a.mip_offset[0] = 0;
  return plan_pyramid(a.res, a.n_levels, &a.n_mips, a.mip_offset);
}

template <typename T>
MarchParts<T> occgrid_march_cpu(const MarchArgs<T>& a, int n_threads) {
  MarchParts<T> parts(size_t((a.n_rays + kRaysPerPart - 1) / kRaysPerPart));
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
  for (int64_t part = 0; part < int64_t(parts.size()); ++part) {
    parts[part].reserve(kRaysPerPart * 16);  // typical samples per ray: fewer reallocations
    PartEmit<T> emit{&parts[part]};
    const MarchBoxes<T> boxes(a);
    const int64_t stop = std::min(a.n_rays, (part + 1) * kRaysPerPart);
    for (int64_t r = part * kRaysPerPart; r < stop; ++r) march_ray(a, boxes, r, emit);
  }
  return parts;
}

template <typename T>
int64_t march_parts_size(const MarchParts<T>& parts) {
  int64_t total = 0;
  for (const auto& part : parts) total += int64_t(part.size());
  return total;
}

template <typename T>
void copy_march_parts(const MarchParts<T>& parts, int64_t* ray_indices, T* t_starts, T* t_ends) {
  for (const auto& part : parts)
    for (const auto& sample : part) {
      *ray_indices++ = sample.ray;
      *t_starts++ = sample.t_start;
      *t_ends++ = sample.t_end;
    }
}

MipsScratch mips_scratch_layout(const int res[3], int n_levels) {
  MipsScratch layout;
  layout.pass_offset[0] = plan_pyramid(res, n_levels, &layout.n_mips, nullptr);
  layout.pass_offset[1] = layout.pass_offset[0] + n_levels * halve_pass(res, 0).out_cells();
  layout.pass_offset[2] = 0;
  layout.size = layout.pass_offset[1] + n_levels * halve_pass(res, 1).out_cells();
  return layout;
}

// Serial below a few million cells: a parallel region costs more than that work when the cores
// are shared (each barrier waits for a descheduled thread).
constexpr int64_t kParallelCells = int64_t(1) << 21;

// fn(l, i, j, k, flat) for every cell of n_levels grids of dims d (x-major), rows (l, i) in
// parallel: no division per cell.
template <class Fn>
void for_each_cell(int n_levels, const int d[3], int n_threads, const Fn& fn) {
  const int64_t rows = int64_t(n_levels) * d[0];
#pragma omp parallel for schedule(static) num_threads(n_threads) if (rows * d[1] * d[2] > kParallelCells)
  for (int64_t row = 0; row < rows; ++row) {
    const int l = int(row / d[0]), i = int(row % d[0]);
    for (int j = 0; j < d[1]; ++j)
      for (int k = 0; k < d[2]; ++k) fn(l, i, j, k, (row * d[1] + j) * d[2] + k);
  }
}

void occgrid_mips_cpu(const uint8_t* binaries, const float* aabbs, int n_levels, const int res[3], uint8_t* scratch,
                      uint8_t* mips, int n_threads) {
  const MipsScratch layout = mips_scratch_layout(res, n_levels);
  const int n_mips = layout.n_mips;
  if (n_mips == 0) return;
  const uint8_t* src = binaries;
  for (int pass = 0; pass < 3; ++pass) {
    const HalvePass p = halve_pass(res, pass);
    uint8_t* out = scratch + layout.pass_offset[pass];
    for_each_cell(n_levels, p.out, n_threads, [&](int l, int i, int j, int k, int64_t c) {
      const uint8_t* level = src + l * p.in_cells();
      out[c] = p.axis == 2   ? halve_dilated<2>(level, p.in, i, j, k)
               : p.axis == 1 ? halve_dilated<1>(level, p.in, i, j, k)
                             : halve_dilated<0>(level, p.in, i, j, k);
    });
    src = out;
  }
  std::vector<double> finer(6 * n_levels, 0.0);  // per level: finer_box_in_cells lo, hi
  for (int l = 1; l < n_levels; ++l) finer_box_in_cells(aabbs, l, res, &finer[6 * l], &finer[6 * l + 3]);
  int64_t offset = 0;
  for (int m = 1; m <= n_mips; ++m) {
    const int d[3] = {mip_res(res[0], m), mip_res(res[1], m), mip_res(res[2], m)};
    const int64_t cells = mip_cells(res, m), child_cells = mip_cells(res, m - 1);
    uint8_t* dilated = scratch + offset;
    if (m > 1) {
      const uint8_t* child = dilated - n_levels * child_cells;
      for_each_cell(n_levels, d, n_threads, [&](int l, int i, int j, int k, int64_t c) {
        dilated[c] = mip_cell(child + l * child_cells, res, m, i, j, k);
      });
    }
    for_each_cell(n_levels, d, n_threads, [&](int l, int i, int j, int k, int64_t c) {
      mips[offset + c] = mip_block_busy(dilated + l * cells, res, m, l, n_levels, &finer[6 * l], &finer[6 * l + 3], i,
                                        j, k);
    });
    offset += n_levels * cells;
  }
}

template int64_t occgrid_plan_mips<float>(MarchArgs<float>&);
template int64_t occgrid_plan_mips<double>(MarchArgs<double>&);
template MarchParts<float> occgrid_march_cpu<float>(const MarchArgs<float>&, int);
template MarchParts<double> occgrid_march_cpu<double>(const MarchArgs<double>&, int);
template int64_t march_parts_size<float>(const MarchParts<float>&);
template int64_t march_parts_size<double>(const MarchParts<double>&);
template void copy_march_parts<float>(const MarchParts<float>&, int64_t*, float*, float*);
template void copy_march_parts<double>(const MarchParts<double>&, int64_t*, double*, double*);

}  // namespace fastnefes
