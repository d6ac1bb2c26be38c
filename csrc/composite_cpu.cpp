// CPU launcher of the compositing kernel body (composite_kernel.h): rays in parallel (OpenMP),
// one lane per ray holding all feature dims, so the feature loops are SIMD loops over rows.
#include <algorithm>
#include <cstring>

#include "composite.h"
#include "composite_kernel.h"

namespace fastnefes {
namespace {

// Rays differ in sample counts: dynamic chunks keep both cores busy.
constexpr int64_t kRayChunk = 16;

// One lane owning every feature dim (see the Lanes policy in composite_kernel.h).
template <typename T>
struct SerialLanes {
  T* row = nullptr;

  int64_t chunk(int64_t D) const { return D > 0 ? D : 1; }
  bool lead() const { return true; }
  void begin(T* out_row, int64_t, int64_t D) {
    row = out_row;
    std::fill(row, row + D, T(0));
  }
  void add(T w, const T* f, int64_t, int64_t D) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) row[d] += w * f[d];
  }
  void finish(T*, int64_t, int64_t) {}
  T sum(T v) const { return v; }
  T dot(const T* a, const T* b, int64_t D) const {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
    return s;
  }
  void scaled(T* dst, T w, const T* src, int64_t D) const {
    if (!src) {
      std::fill(dst, dst + D, T(0));
      return;
    }
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = w * src[d];
  }
  void zero_rows(T* dst, int64_t from, int64_t to, int64_t D) const {
    if (to > from) std::fill(dst + from * D, dst + to * D, T(0));
  }
};

}  // namespace

template <typename T>
void composite_forward_cpu(const CompositeInputs<T>& in, const CompositeOutputs<T>& out, int n_threads) {
#pragma omp parallel for schedule(dynamic, kRayChunk) num_threads(n_threads)
  for (int64_t r = 0; r < in.n_rays; ++r) {
    SerialLanes<T> lanes;
    composite_forward_ray<T>(in, out, r, lanes);
  }
}

template <typename T>
void composite_backward_cpu(const CompositeInputs<T>& in, const CompositeGrads<T>& g, int n_threads) {
#pragma omp parallel for schedule(dynamic, kRayChunk) num_threads(n_threads)
  for (int64_t r = 0; r < in.n_rays; ++r) {
    SerialLanes<T> lanes;
    composite_backward_ray<T>(in, g, r, lanes);
  }
}

int64_t ray_ranges_cpu(const int64_t* ray_indices, int64_t n_samples, int64_t n_rays, int64_t* ranges) {
  std::memset(ranges, 0, sizeof(int64_t) * 2 * n_rays);
  for (int64_t i = 0; i < n_samples; ++i) {
    const int64_t r = ray_indices[i];
    if (r < 0 || r >= n_rays || (i > 0 && r < ray_indices[i - 1])) return i;
    if (i == 0 || r != ray_indices[i - 1]) ranges[2 * r] = i;
    ranges[2 * r + 1] += 1;
  }
  return -1;
}

template void composite_forward_cpu<float>(const CompositeInputs<float>&, const CompositeOutputs<float>&, int);
template void composite_forward_cpu<double>(const CompositeInputs<double>&, const CompositeOutputs<double>&, int);
template void composite_backward_cpu<float>(const CompositeInputs<float>&, const CompositeGrads<float>&, int);
template void composite_backward_cpu<double>(const CompositeInputs<double>&, const CompositeGrads<double>&, int);

}  // namespace fastnefes
