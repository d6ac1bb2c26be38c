// CPU fused compositing: rays in parallel (OpenMP), one sequential pass per ray forward and one
// backward. The backward needs no stored per-sample transmittance: it recomputes T_j on the way
// (T_{j+1} = T_j exp(-sigma_j dt_j), one exp per sample, the same products as the forward) and
// gets the suffix sums sum_{k>j} w_k g_k as (total from the forward outputs) - (prefix).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "composite.h"

namespace fastnefes {
namespace {

// Rays differ in sample counts: dynamic chunks keep both cores busy.
constexpr int64_t kRayChunk = 16;

template <typename T>
inline T zero_if_null(const T* p, int64_t i) {
  return p ? p[i] : T(0);
}

}  // namespace

template <typename T>
void composite_forward_cpu(const CompositeInputs<T>& in, const CompositeOutputs<T>& out, int n_threads) {
  const int64_t D = in.n_features;
  const T threshold = T(in.threshold);
#pragma omp parallel for schedule(dynamic, kRayChunk) num_threads(n_threads)
  for (int64_t r = 0; r < in.n_rays; ++r) {
    const int64_t first = in.ranges[2 * r], count = in.ranges[2 * r + 1];
    T* feat = D ? out.features + r * D : nullptr;
    if (D) std::fill(feat, feat + D, T(0));
    T trans = 1, cr = 0, cg = 0, cb = 0, depth = 0, opacity = 0;
    for (int64_t j = first; j < first + count; ++j) {
      if (trans < threshold) break;
      const T dt = in.t_ends[j] - in.t_starts[j];
      const T decay = std::exp(-(in.sigmas[j] * dt));
      const T w = trans * (T(1) - decay);
      const T* c = in.rgbs + 3 * j;
      cr += w * c[0];
      cg += w * c[1];
      cb += w * c[2];
      depth += w * T(0.5) * (in.t_starts[j] + in.t_ends[j]);
      opacity += w;
      if (D) {
        const T* f = in.features + j * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) feat[d] += w * f[d];
      }
      trans *= decay;
    }
    out.rgb[3 * r] = cr;
    out.rgb[3 * r + 1] = cg;
    out.rgb[3 * r + 2] = cb;
    out.depth[r] = depth;
    out.opacity[r] = opacity;
  }
}

// dL/d(sigma_j dt_j) = g_j T_{j+1} - sum_{k>j} w_k g_k, with g_j = dL/dw_j; the sum over a whole
// ray is the dot of the upstream gradients with the forward outputs.
template <typename T>
void composite_backward_cpu(const CompositeInputs<T>& in, const CompositeGrads<T>& g, int n_threads) {
  const int64_t D = in.n_features;
  const T threshold = T(in.threshold);
  const bool feat_in_weight_grad = D && g.g_features && !g.detach_feature_weights;
  const bool need_tau_grad = g.d_sigmas || g.d_t_starts || g.d_t_ends;
#pragma omp parallel for schedule(dynamic, kRayChunk) num_threads(n_threads)
  for (int64_t r = 0; r < in.n_rays; ++r) {
    const int64_t first = in.ranges[2 * r], count = in.ranges[2 * r + 1];
    const T gr = zero_if_null(g.g_rgb, 3 * r), gg = zero_if_null(g.g_rgb, 3 * r + 1),
            gb = zero_if_null(g.g_rgb, 3 * r + 2);
    const T gd = zero_if_null(g.g_depth, r), go = zero_if_null(g.g_opacity, r);
    const T* gf = g.g_features ? g.g_features + r * D : nullptr;
    T total = gr * g.rgb[3 * r] + gg * g.rgb[3 * r + 1] + gb * g.rgb[3 * r + 2] + gd * g.depth[r] +
              go * g.opacity[r];
    if (feat_in_weight_grad) {
      const T* fo = g.features + r * D;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += gf[d] * fo[d];
      total += dot;
    }
    T trans = 1, prefix = 0;
    int64_t j = first;
    for (; j < first + count; ++j) {
      if (trans < threshold) break;
      const T dt = in.t_ends[j] - in.t_starts[j];
      const T decay = std::exp(-(in.sigmas[j] * dt));
      const T w = trans * (T(1) - decay);  // the forward's exact expressions
      const T trans_next = trans * decay;
      const T* c = in.rgbs + 3 * j;
      const T mid = T(0.5) * (in.t_starts[j] + in.t_ends[j]);
      T dl_dw = gr * c[0] + gg * c[1] + gb * c[2] + gd * mid + go;
      if (D && g.d_features) {
        T* df = g.d_features + j * D;
        if (gf) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) df[d] = w * gf[d];
        } else {
          std::fill(df, df + D, T(0));
        }
      }
      if (feat_in_weight_grad) {
        const T* f = in.features + j * D;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += gf[d] * f[d];
        dl_dw += dot;
      }
      if (g.d_rgbs) {
        g.d_rgbs[3 * j] = w * gr;
        g.d_rgbs[3 * j + 1] = w * gg;
        g.d_rgbs[3 * j + 2] = w * gb;
      }
      if (need_tau_grad) {
        prefix += w * dl_dw;
        const T dl_dsd = dl_dw * trans_next - (total - prefix);
        if (g.d_sigmas) g.d_sigmas[j] = dl_dsd * dt;
        const T dl_ddt = dl_dsd * in.sigmas[j];
        const T dl_dmid = T(0.5) * w * gd;
        if (g.d_t_starts) g.d_t_starts[j] = dl_dmid - dl_ddt;
        if (g.d_t_ends) g.d_t_ends[j] = dl_dmid + dl_ddt;
      }
      trans = trans_next;
    }
    // Samples behind the termination point contribute nothing.
    const int64_t end = first + count, n_rest = end - j;
    if (n_rest > 0) {
      if (g.d_sigmas) std::fill(g.d_sigmas + j, g.d_sigmas + end, T(0));
      if (g.d_t_starts) std::fill(g.d_t_starts + j, g.d_t_starts + end, T(0));
      if (g.d_t_ends) std::fill(g.d_t_ends + j, g.d_t_ends + end, T(0));
      if (g.d_rgbs) std::fill(g.d_rgbs + 3 * j, g.d_rgbs + 3 * end, T(0));
      if (D && g.d_features) std::fill(g.d_features + j * D, g.d_features + end * D, T(0));
    }
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
