// The compositing kernel body: forward and backward of ONE ray, shared by the OpenMP launcher
// (composite_cpu.cpp) and the CUDA launcher (composite_cuda.cu).
//
// Per sample j of a ray: dt_j = t_end_j - t_start_j, alpha_j = 1 - exp(-sigma_j dt_j),
// T_{j+1} = T_j exp(-sigma_j dt_j), w_j = T_j alpha_j; the ray stops at its first sample with
// T_j < threshold. The backward recomputes T_j on the way (the forward's exact expressions) and
// gets the suffix sums sum_{k>j} w_k g_k as (total from the forward outputs) - (prefix):
//     dL/d(sigma_j dt_j) = g_j T_{j+1} - sum_{k>j} w_k g_k,   g_j = dL/dw_j.
//
// A = compute type, S = storage type. The feature dimensions of a ray are split over "lanes" by
// a Lanes policy, the only thing the launchers supply:
//   chunk(D)                 feature dims handled per pass over the ray's samples (>= 1)
//   lead()                   true on the lane that owns rgb / depth / opacity / per-sample scalars
//   begin(row, base, D)      start accumulating the lane's dims of [base, base + chunk) of `row`
//   add(w, f_row, base, D)   accumulate w * f_row[d] over those dims
//   finish(row, base, D)     write the accumulated dims to `row`
//   sum(v)                   sum of v over the lanes of the ray (identity for one lane)
//   dot(a, b, D)             this lane's share of sum_d a[d] b[d]
//   scaled(dst, w, src, D)   dst[d] = w * src[d] (0 when src is null) over the lane's dims
//   zero_rows(dst, j0, j1, D) dst[j * D + d] = 0 for j in [j0, j1), the lane's dims
// The CPU launcher uses one lane holding all dims (SIMD loops); CUDA uses G lanes of a warp, lane
// i owning dims i, i + G, ... (registers in the forward, shuffles for sum).
#pragma once

#include "composite.h"
#include "kernel_common.h"

namespace fastnefes {

template <typename A, typename S, class Lanes>
FASTNEFES_HD void composite_forward_ray(const CompositeInputs<S>& in, const CompositeOutputs<S>& out, int64_t r,
                                        Lanes& lanes) {
  const int64_t first = in.ranges[2 * r], end = first + in.ranges[2 * r + 1];
  const int64_t D = in.n_features;
  const A threshold = A(in.threshold);
  // At least one pass (rgb / depth / opacity) even without features.
  for (int64_t base = 0; base == 0 || base < D; base += lanes.chunk(D)) {
    const bool lead = base == 0 && lanes.lead();
    if (D) lanes.begin(out.features + r * D, base, D);
    A trans = 1, cr = 0, cg = 0, cb = 0, depth = 0, opacity = 0;
    for (int64_t j = first; j < end; ++j) {
      if (trans < threshold) break;
      const A ts = load(in.t_starts, j), te = load(in.t_ends, j);
      const A decay = exp_neg(A(load(in.sigmas, j)) * (te - ts));
      const A w = trans * (A(1) - decay);
      if (lead) {
        cr += w * A(load(in.rgbs, 3 * j));
        cg += w * A(load(in.rgbs, 3 * j + 1));
        cb += w * A(load(in.rgbs, 3 * j + 2));
        depth += w * A(0.5) * (ts + te);
        opacity += w;
      }
      if (D) lanes.add(w, in.features + j * D, base, D);
      trans *= decay;
    }
    if (D) lanes.finish(out.features + r * D, base, D);
    if (lead) {
      store(out.rgb, 3 * r, cr);
      store(out.rgb, 3 * r + 1, cg);
      store(out.rgb, 3 * r + 2, cb);
      store(out.depth, r, depth);
      store(out.opacity, r, opacity);
    }
  }
}

template <typename A, typename S, class Lanes>
FASTNEFES_HD void composite_backward_ray(const CompositeInputs<S>& in, const CompositeGrads<S>& g, int64_t r,
                                         Lanes& lanes) {
  const int64_t first = in.ranges[2 * r], end = first + in.ranges[2 * r + 1];
  const int64_t D = in.n_features;
  const A threshold = A(in.threshold);
  const bool lead = lanes.lead();
  const bool feat_in_weight_grad = D && g.g_features && !g.detach_feature_weights;
  const bool need_tau_grad = g.d_sigmas || g.d_t_starts || g.d_t_ends;
  const A gr = load_or_zero<A>(g.g_rgb, 3 * r), gg = load_or_zero<A>(g.g_rgb, 3 * r + 1),
          gb = load_or_zero<A>(g.g_rgb, 3 * r + 2);
  const A gd = load_or_zero<A>(g.g_depth, r), go = load_or_zero<A>(g.g_opacity, r);
  const S* gf = g.g_features ? g.g_features + r * D : nullptr;
  A total = gr * A(load(g.rgb, 3 * r)) + gg * A(load(g.rgb, 3 * r + 1)) + gb * A(load(g.rgb, 3 * r + 2)) +
            gd * A(load(g.depth, r)) + go * A(load(g.opacity, r));
  if (feat_in_weight_grad) total += lanes.sum(lanes.dot(gf, g.features + r * D, D));
  A trans = 1, prefix = 0;
  int64_t j = first;
  for (; j < end; ++j) {
    if (trans < threshold) break;
    const A ts = load(in.t_starts, j), te = load(in.t_ends, j), sigma = load(in.sigmas, j);
    const A dt = te - ts;
    const A decay = exp_neg(sigma * dt);
    const A w = trans * (A(1) - decay);  // the forward's exact expressions
    const A trans_next = trans * decay;
    if (D && g.d_features) lanes.scaled(g.d_features + j * D, w, gf, D);
    A feat_dot = 0;
    if (feat_in_weight_grad) feat_dot = lanes.sum(lanes.dot(gf, in.features + j * D, D));
    if (lead) {
      const A mid = A(0.5) * (ts + te);
      const A dl_dw = gr * A(load(in.rgbs, 3 * j)) + gg * A(load(in.rgbs, 3 * j + 1)) +
                      gb * A(load(in.rgbs, 3 * j + 2)) + gd * mid + go + feat_dot;
      if (g.d_rgbs) {
        store(g.d_rgbs, 3 * j, w * gr);
        store(g.d_rgbs, 3 * j + 1, w * gg);
        store(g.d_rgbs, 3 * j + 2, w * gb);
      }
      if (need_tau_grad) {
        prefix += w * dl_dw;
        const A dl_dsd = dl_dw * trans_next - (total - prefix);
        if (g.d_sigmas) store(g.d_sigmas, j, dl_dsd * dt);
        const A dl_ddt = dl_dsd * sigma, dl_dmid = A(0.5) * w * gd;
        if (g.d_t_starts) store(g.d_t_starts, j, dl_dmid - dl_ddt);
        if (g.d_t_ends) store(g.d_t_ends, j, dl_dmid + dl_ddt);
      }
    }
    trans = trans_next;
  }
  // Samples behind the termination point contribute nothing.
  if (D && g.d_features) lanes.zero_rows(g.d_features, j, end, D);
  if (lead) {
    for (int64_t k = j; k < end; ++k) {
      if (g.d_sigmas) store(g.d_sigmas, k, A(0));
      if (g.d_t_starts) store(g.d_t_starts, k, A(0));
      if (g.d_t_ends) store(g.d_t_ends, k, A(0));
      if (g.d_rgbs)
        for (int c = 0; c < 3; ++c) store(g.d_rgbs, 3 * k + c, A(0));
    }
  }
}

}  // namespace fastnefes
