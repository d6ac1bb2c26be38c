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

template <typename T>
int64_t occgrid_plan_mips(MarchArgs<T>& a) {
  int64_t total = 0;
  int m = 0;
  while (m < kMaxMips && std::max({mip_res(a.res[0], m), mip_res(a.res[1], m), mip_res(a.res[2], m)}) > 1) {
    ++m;
    a.mip_offset[m] = total;
    total += a.n_levels * mip_cells(a.res, m);
  }
  a.n_mips = m;
  a.mip_offset[0] = 0;
  return total;
}

template <typename T>
MarchParts<T> occgrid_march_cpu(const MarchArgs<T>& a, int n_threads) {
  MarchParts<T> parts(size_t((a.n_rays + kRaysPerPart - 1) / kRaysPerPart));
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
  for (int64_t part = 0; part < int64_t(parts.size()); ++part) {
    PartEmit<T> emit{&parts[part]};
    const int64_t stop = std::min(a.n_rays, (part + 1) * kRaysPerPart);
    for (int64_t r = part * kRaysPerPart; r < stop; ++r) march_ray(a, r, emit);
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

void occgrid_mips_cpu(const uint8_t* binaries, const float* aabbs, int n_levels, const int res[3], uint8_t* plain,
                      uint8_t* mips, int n_threads) {
  int64_t offset = 0;
  for (int m = 1; m < kMaxMips && std::max({mip_res(res[0], m - 1), mip_res(res[1], m - 1), mip_res(res[2], m - 1)}) > 1;
       ++m) {
    const int r1 = mip_res(res[1], m), r2 = mip_res(res[2], m);
    const int64_t cells = mip_cells(res, m), child_cells = mip_cells(res, m - 1);
    const uint8_t* child = m == 1 ? binaries : plain + offset - n_levels * child_cells;
    // Serial below a few million cells: a parallel region costs more than that work when the
    // cores are shared (each barrier waits for a descheduled thread).
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_levels * cells > (int64_t(1) << 22))
    for (int64_t c = 0; c < n_levels * cells; ++c) {
      const int64_t l = c / cells, i = c % cells;
      plain[offset + c] = mip_cell(child + l * child_cells, res, m, int(i / (int64_t(r1) * r2)), int(i / r2 % r1),
                                   int(i % r2));
    }
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_levels * cells > (int64_t(1) << 20))
    for (int64_t c = 0; c < n_levels * cells; ++c) {
      const int64_t l = c / cells, i = c % cells;
      mips[offset + c] = dilated_mip_cell(plain + offset + l * cells, res, m, int(l), n_levels, aabbs,
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
