// CUDA launcher of the occupancy-grid march (occgrid_kernel.h): one thread per ray, run twice
// with the same body, first counting each ray's samples, then (after the caller's cumulative
// sum) writing them at the ray's offset, so the output is packed in ray order without sorting.
#include "cuda_common.h"
#include "occgrid.h"
#include "occgrid_kernel.h"

namespace fastnefes {
namespace {

template <typename T>
struct CountEmit {
  int64_t n = 0;
  __device__ void operator()(int64_t, T, T) { ++n; }
};

template <typename T>
struct FillEmit {
  int64_t at;
  int64_t* rays;
  T* t0;
  T* t1;
  __device__ void operator()(int64_t r, T a, T b) {
    rays[at] = r;
    t0[at] = a;
    t1[at] = b;
    ++at;
  }
};

template <typename T>
MarchArgs<T> typed(const MarchArgs<void>& e) {
  MarchArgs<T> a{e.n_rays, static_cast<const T*>(e.rays_o), static_cast<const T*>(e.rays_d),
                 static_cast<const T*>(e.near), static_cast<const T*>(e.far), e.binaries, e.mips,
                 static_cast<const T*>(e.aabbs), e.n_levels, {e.res[0], e.res[1], e.res[2]}, e.n_mips, {},
                 e.step, e.cone_angle};
  for (int m = 0; m <= kMaxMips; ++m) a.mip_offset[m] = e.mip_offset[m];
  return a;
}

template <typename T>
__global__ void count_kernel(MarchArgs<T> a, int64_t* counts) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= a.n_rays) return;
  CountEmit<T> emit;
  march_ray(a, MarchBoxes<T>(a), r, emit);
  counts[r] = emit.n;
}

template <typename T>
__global__ void fill_kernel(MarchArgs<T> a, const int64_t* offsets, int64_t* rays, T* t0, T* t1) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= a.n_rays) return;
  FillEmit<T> emit{offsets[r], rays, t0, t1};
  march_ray(a, MarchBoxes<T>(a), r, emit);
}

template <int kAxis>
__global__ void halve_dilated_kernel(const uint8_t* src, uint8_t* out, int n_levels, HalvePass p) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n_levels * p.out_cells()) return;
  const int64_t l = c / p.out_cells(), i = c % p.out_cells();
  out[c] = halve_dilated<kAxis>(src + l * p.in_cells(), p.in, int(i / (int64_t(p.out[1]) * p.out[2])),
                                int(i / p.out[2] % p.out[1]), int(i % p.out[2]));
}

__global__ void mip_kernel(const uint8_t* child, uint8_t* mip, int n_levels, int m, int res0, int res1, int res2) {
  const int res[3] = {res0, res1, res2};
  const int64_t cells = mip_cells(res, m);
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n_levels * cells) return;
  const int r1 = mip_res(res1, m), r2 = mip_res(res2, m);
  const int64_t l = c / cells, i = c % cells;
  mip[c] = mip_cell(child + l * mip_cells(res, m - 1), res, m, int(i / (int64_t(r1) * r2)), int(i / r2 % r1),
                    int(i % r2));
}

__global__ void mip_busy_kernel(const uint8_t* dilated, const float* aabbs, uint8_t* mip, int n_levels, int m,
                                int res0, int res1, int res2) {
  const int res[3] = {res0, res1, res2};
  const int64_t cells = mip_cells(res, m);
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n_levels * cells) return;
  const int r1 = mip_res(res1, m), r2 = mip_res(res2, m);
  const int64_t l = c / cells, i = c % cells;
  double finer[6] = {0, 0, 0, 0, 0, 0};
  if (l > 0) finer_box_in_cells(aabbs, int(l), res, finer, finer + 3);
  mip[c] = mip_block_busy(dilated + l * cells, res, m, int(l), n_levels, finer, finer + 3, int(i / (int64_t(r1) * r2)),
                          int(i / r2 % r1), int(i % r2));
}

}  // namespace

void occgrid_count_cuda(DType dtype, const MarchArgs<void>& a, int64_t* counts, int device, void* stream) {
  if (a.n_rays == 0) return;
  DeviceScope scope(device);
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == DType::kDouble)
    count_kernel<double><<<blocks_for(a.n_rays), kBlock, 0, s>>>(typed<double>(a), counts);
  else
    count_kernel<float><<<blocks_for(a.n_rays), kBlock, 0, s>>>(typed<float>(a), counts);
  check(cudaGetLastError(), "occupancy march (count) launch");
}

void occgrid_fill_cuda(DType dtype, const MarchArgs<void>& a, const int64_t* offsets, int64_t* ray_indices,
                       void* t_starts, void* t_ends, int device, void* stream) {
  if (a.n_rays == 0) return;
  DeviceScope scope(device);
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == DType::kDouble)
    fill_kernel<double><<<blocks_for(a.n_rays), kBlock, 0, s>>>(typed<double>(a), offsets, ray_indices,
                                                                 static_cast<double*>(t_starts),
                                                                 static_cast<double*>(t_ends));
  else
    fill_kernel<float><<<blocks_for(a.n_rays), kBlock, 0, s>>>(typed<float>(a), offsets, ray_indices,
                                                               static_cast<float*>(t_starts),
                                                               static_cast<float*>(t_ends));
  check(cudaGetLastError(), "occupancy march (fill) launch");
}

void occgrid_mips_cuda(const uint8_t* binaries, const float* aabbs, int n_levels, const int res[3], uint8_t* scratch,
                       uint8_t* mips, int device, void* stream) {
  DeviceScope scope(device);
  auto s = static_cast<cudaStream_t>(stream);
  const MipsScratch layout = mips_scratch_layout(res, n_levels);
  const int n_mips = layout.n_mips;
  if (n_mips == 0) return;
  const uint8_t* src = binaries;
  for (int pass = 0; pass < 3; ++pass) {
    const HalvePass p = halve_pass(res, pass);
    const auto kernel = p.axis == 2 ? halve_dilated_kernel<2> : p.axis == 1 ? halve_dilated_kernel<1> : halve_dilated_kernel<0>;
    uint8_t* out = scratch + layout.pass_offset[pass];
    kernel<<<blocks_for(n_levels * p.out_cells()), kBlock, 0, s>>>(src, out, n_levels, p);
    src = out;
  }
  int64_t offset = 0;
  for (int m = 1; m <= n_mips; ++m) {
    const int64_t cells = n_levels * mip_cells(res, m);
    if (m > 1)
      mip_kernel<<<blocks_for(cells), kBlock, 0, s>>>(scratch + offset - n_levels * mip_cells(res, m - 1),
                                                      scratch + offset, n_levels, m, res[0], res[1], res[2]);
    mip_busy_kernel<<<blocks_for(cells), kBlock, 0, s>>>(scratch + offset, aabbs, mips + offset, n_levels, m, res[0],
                                                         res[1], res[2]);
    offset += cells;
  }
  check(cudaGetLastError(), "occupancy mips launch");
}

}  // namespace fastnefes
