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
    const BoxScales<T> scales(a);
    const int64_t stop = std::min(a.n_rays, (part + 1) * kRaysPerPart);
    for (int64_t r = part * kRaysPerPart; r < stop; ++r) march_ray(a, scales, r, emit);
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

int64_t occgrid_mips_scratch(const int res[3], int n_levels) {
  int n_mips;
  return plan_pyramid(res, n_levels, &n_mips, nullptr) +
         n_levels * (halve_pass(res, 0).out_cells() + halve_pass(res, 1).out_cells());
}

void occgrid_mips_cpu(const uint8_t* binaries, const float* aabbs, int n_levels, const int res[3], uint8_t* scratch,
                      uint8_t* mips, int n_threads) {
  // Serial below a few million cells: a parallel region costs more than that work when the
  // cores are shared (each barrier waits for a descheduled thread).
  constexpr int64_t kParallelCells = int64_t(1) << 21;
  int n_mips;
  uint8_t* pass_out[3];  // the passes' outputs: two temporaries, then mip 1 of the dilated pyramid
  pass_out[0] = scratch + plan_pyramid(res, n_levels, &n_mips, nullptr);
  pass_out[1] = pass_out[0] + n_levels * halve_pass(res, 0).out_cells();
  pass_out[2] = scratch;
  if (n_mips == 0) return;
  const uint8_t* src = binaries;
  for (int pass = 0; pass < 3; ++pass) {
    const HalvePass p = halve_pass(res, pass);
    const int64_t n = n_levels * p.out_cells();
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n > kParallelCells)
    for (int64_t c = 0; c < n; ++c) {
      const int64_t l = c / p.out_cells(), i = c % p.out_cells();
      pass_out[pass][c] = halve_dilated(src + l * p.in_cells(), p.in, p.axis, int(i / (int64_t(p.out[1]) * p.out[2])),
                                        int(i / p.out[2] % p.out[1]), int(i % p.out[2]));
    }
    src = pass_out[pass];
  }
  int64_t offset = 0;
  for (int m = 1; m <= n_mips; ++m) {
    const int r1 = mip_res(res[1], m), r2 = mip_res(res[2], m);
    const int64_t cells = mip_cells(res, m), child_cells = mip_cells(res, m - 1);
    if (m > 1) {
      const uint8_t* child = scratch + offset - n_levels * child_cells;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_levels * cells > kParallelCells)
      for (int64_t c = 0; c < n_levels * cells; ++c) {
        const int64_t l = c / cells, i = c % cells;
        scratch[offset + c] = mip_cell(child + l * child_cells, res, m, int(i / (int64_t(r1) * r2)), int(i / r2 % r1),
                                       int(i % r2));
      }
    }
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_levels * cells > kParallelCells)
    for (int64_t c = 0; c < n_levels * cells; ++c) {
      const int64_t l = c / cells, i = c % cells;
      mips[offset + c] = mip_block_busy(scratch + offset + l * cells, res, m, int(l), n_levels, aabbs,
                                        int(i / (int64_t(r1) * r2)), int(i / r2 % r1), int(i % r2));
    }
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
