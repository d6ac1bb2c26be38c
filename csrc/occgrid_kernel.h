// The occupancy-grid march of ONE ray, shared by occgrid_cpu.cpp and occgrid_cuda.cu.
//
// Semantics (the pure-torch twin, fastnefes/ops/occgrid/_torch_impl.py, and nerfacc): steps
// t_0 = near, t_{k+1} = t_k + max(t_k * cone, step) (constant until t * cone >= step, then
// geometric; computed in double in closed form as the twin does), cast to T; sample k is
// [t_k, t_{k+1}], kept when the ray hits the outermost box, its midpoint (t_k + t_{k+1}) / 2 lies
// in [max(t_enter, near), min(t_exit, far)) and the point o + d * mid lies in an occupied cell
// of the finest level containing it. Every one of these tests is computed operation by operation
// in T as the twin computes it (so the kept samples are the twin's, bit for bit).
//
// Speed: a sample test costs a few nanoseconds, so empty space is skipped only a block at a time
// and only where the block spans many steps. The skip reads "mips": a block of mip m (2^m x 2^m x
// 2^m cells) is marked free when no occupied cell lies in it or within one cell of it, it keeps
// one cell clear of its level's border (except on the outermost level) and, grown by one cell, it
// keeps clear of the next finer level's box. A sample whose T cell lies in a free block skips to
// the block's exit: the skipped samples' exact points lie within the T rounding bound E of the
// block, their T points within 2 E < one cell of it (skips_sound), so in empty cells of the same
// level. The margin is one cell, not one block, so skips reach up to a surface's neighbour cell.
#pragma once

#include "kernel_common.h"
#include "occgrid.h"

namespace fastnefes {

FASTNEFES_HD int mip_res(int res, int m) { return (res + (1 << m) - 1) >> m; }

FASTNEFES_HD int64_t mip_cells(const int res[3], int m) {
  return int64_t(mip_res(res[0], m)) * mip_res(res[1], m) * mip_res(res[2], m);
}

// A cell of mip m (>= 2) of one level from its 2 x 2 x 2 children in mip m - 1.
FASTNEFES_HD uint8_t mip_cell(const uint8_t* child, const int res[3], int m, int i, int j, int k) {
  const int c0 = mip_res(res[0], m - 1), c1 = mip_res(res[1], m - 1), c2 = mip_res(res[2], m - 1);
  for (int ci = 2 * i; ci < min_of(2 * i + 2, c0); ++ci)
    for (int cj = 2 * j; cj < min_of(2 * j + 2, c1); ++cj)
      for (int ck = 2 * k; ck < min_of(2 * k + 2, c2); ++ck)
        if (child[(int64_t(ci) * c1 + cj) * c2 + ck]) return 1;
  return 0;
}

// Mip 1 of the grid dilated by one cell, in three separable passes, each halving one axis: cell
// (i, j, k) of the output ORs the source cells 2 x - 1 .. 2 x + 2 along kAxis (x: i, j or k),
// clamped to the source's n[kAxis]; the other two indices pass through.
template <int kAxis>
FASTNEFES_HD uint8_t halve_dilated(const uint8_t* src, const int n[3], int i, int j, int k) {
  const int64_t stride = kAxis == 0 ? int64_t(n[1]) * n[2] : kAxis == 1 ? n[2] : 1;
  const int x = kAxis == 0 ? i : kAxis == 1 ? j : k;
  const int64_t base = (int64_t(kAxis == 0 ? 0 : i) * n[1] + (kAxis == 1 ? 0 : j)) * n[2] + (kAxis == 2 ? 0 : k);
  uint8_t v = 0;
  for (int s = max_of(2 * x - 1, 0); s <= min_of(2 * x + 2, n[kAxis] - 1); ++s) v |= src[base + s * stride];
  return v;
}

// The three halve_dilated passes: along k, then j, then i; the last one's output is mip 1.
struct HalvePass {
  int axis, in[3], out[3];
  FASTNEFES_HD int64_t in_cells() const { return int64_t(in[0]) * in[1] * in[2]; }
  FASTNEFES_HD int64_t out_cells() const { return int64_t(out[0]) * out[1] * out[2]; }
};

FASTNEFES_HD HalvePass halve_pass(const int res[3], int pass) {
  HalvePass p;
  p.axis = 2 - pass;
  for (int ax = 0; ax < 3; ++ax) {
    p.in[ax] = ax > p.axis ? mip_res(res[ax], 1) : res[ax];
    p.out[ax] = ax >= p.axis ? mip_res(res[ax], 1) : res[ax];
  }
  return p;
}

// The box of level l - 1 (l >= 1) in level l's cell units: lo[3], hi[3] (for mip_block_busy).
FASTNEFES_HD void finer_box_in_cells(const float* aabbs, int l, const int res[3], double lo[3], double hi[3]) {
  for (int ax = 0; ax < 3; ++ax) {
    const double corner = double(aabbs[6 * l + ax]), size = (double(aabbs[6 * l + 3 + ax]) - corner) / res[ax];
    lo[ax] = (double(aabbs[6 * (l - 1) + ax]) - corner) / size;
    hi[ax] = (double(aabbs[6 * (l - 1) + 3 + ax]) - corner) / size;
  }
}

// A cell of the skip's mip m (>= 1) of level l: 1 (busy) unless the block is free to skip (see
// the file comment). `dilated`: that level's cells of mip m of the grid dilated by one cell;
// finer_lo / finer_hi: finer_box_in_cells of level l (unused for l = 0).
FASTNEFES_HD uint8_t mip_block_busy(const uint8_t* dilated, const int res[3], int m, int l, int n_levels,
                                    const double finer_lo[3], const double finer_hi[3], int i, int j, int k) {
  const int b[3] = {i, j, k};
  for (int ax = 0; ax < 3; ++ax)  // grown by one cell, past the border of a level inside a coarser one
    if (l < n_levels - 1 && (b[ax] == 0 || (b[ax] + 1) << m >= res[ax])) return 1;
  if (l > 0) {  // grown by one cell, against the finer level's box
    bool overlaps = true;
    for (int ax = 0; ax < 3; ++ax)
      overlaps = overlaps && double((b[ax] << m) - 1) < finer_hi[ax] && double(((b[ax] + 1) << m) + 1) > finer_lo[ax];
    if (overlaps) return 1;
  }
  return dilated[(int64_t(i) * mip_res(res[1], m) + j) * mip_res(res[2], m) + k];
}

// The march's step positions t_k (double), the twin's closed form.
struct StepSchedule {
  double near, step, cone, k0, t_k0, growth;
  double inv_step, inv_log_growth;  // for index_estimate only

  FASTNEFES_HD StepSchedule(double near_, double step_, double cone_)
      : near(near_), step(step_), cone(cone_), k0(0), t_k0(0), growth(1), inv_step(1.0 / step_), inv_log_growth(0) {
    if (cone > 0) {
      const double t_switch = div_rn(step, cone);
      k0 = max_of(ceil_of(div_rn(sub_rn(t_switch, near), step)), 0.0);
      t_k0 = add_rn(near, mul_rn(k0, step));
      growth = add_rn(1.0, cone);
      inv_log_growth = 1.0 / log_of(growth);
    }
  }
  FASTNEFES_HD double t(double k) const {
    if (cone <= 0 || k <= k0) return add_rn(near, mul_rn(k, step));
    return mul_rn(t_k0, pow_of(growth, sub_rn(k, k0)));
  }
  // About the k with t_k = t (a start for the exact searches below).
  FASTNEFES_HD double index_estimate(double t) const {
    const double k = (cone <= 0 || t <= t_k0) ? (t - near) * inv_step : k0 + log_of(t / t_k0) * inv_log_growth;
    if (!(k > 0)) return 0;  // and NaN
    return k < 4.0e15 ? double(int64_t(k)) : 4.0e15;  // floor, without a libm call
  }
};

template <typename T>
FASTNEFES_HD T step_mid(const StepSchedule& s, double k) {
  return mul_rn(add_rn(T(s.t(k)), T(s.t(k + 1))), T(0.5));
}

// The largest k >= 0 whose midpoint is < t (inclusive: <= t), or -1 when there is none. Midpoints
// grow with k: a search from the estimate, galloping then bisecting (one or two probes usually).
template <typename T>
FASTNEFES_HD double last_step_before(const StepSchedule& s, double t, bool inclusive) {
  auto below = [&](double k) {
    const double m = double(step_mid<T>(s, k));
    return inclusive ? m <= t : m < t;
  };
  double lo, hi;  // below(lo) (or lo = -1), !below(hi)
  const double e = s.index_estimate(t);
  if (below(e)) {
    lo = e;
    double gap = 1;
    hi = e + gap;
    while (below(hi)) {
      lo = hi;
      gap *= 2;
      if (gap > 4.0e15) return lo;
      hi = lo + gap;
    }
  } else {
    hi = e;
    double gap = 1;
    lo = e - gap;
    while (lo >= 0 && !below(lo)) {
      hi = lo;
      gap *= 2;
      lo = hi - gap;
    }
    if (lo < 0) {
      if (!below(0)) return -1;
      lo = 0;
    }
  }
  while (hi - lo > 1) {
    const double m = double(int64_t((lo + hi) * 0.5));  // floor (0 <= lo < hi)
    (below(m) ? lo : hi) = m;
  }
  return lo;
}

// Slab test of the ray against one box, the twin's ray_aabb_intersect in T.
template <typename T>
FASTNEFES_HD void slab_t(const T o[3], const T d[3], const T* box, T* t_min, T* t_max) {
  for (int ax = 0; ax < 3; ++ax) {
    const T abs_d = d[ax] < T(0) ? -d[ax] : d[ax];
    const T dd = abs_d < T(1e-12) ? T(1e-12) : d[ax];
    const T inv = div_rn(T(1), dd);
    const T t1 = mul_rn(sub_rn(box[ax], o[ax]), inv), t2 = mul_rn(sub_rn(box[ax + 3], o[ax]), inv);
    const T near_ax = min_of(t1, t2), far_ax = max_of(t1, t2);
    *t_min = ax == 0 ? near_ax : max_of(*t_min, near_ax);
    *t_max = ax == 0 ? far_ax : min_of(*t_max, far_ax);
  }
}

// A level's box in double, for the skips: its corner, cell size per axis and smallest cell size.
struct LevelFrame {
  double lo[3], size[3], cell_min;
};

template <typename T>
FASTNEFES_HD LevelFrame level_frame(const MarchArgs<T>& a, int l) {
  LevelFrame f;
  f.cell_min = 1e300;
  for (int ax = 0; ax < 3; ++ax) {
    f.lo[ax] = double(a.aabbs[6 * l + ax]);
    f.size[ax] = (double(a.aabbs[6 * l + 3 + ax]) - f.lo[ax]) / a.res[ax];
    f.cell_min = min_of(f.cell_min, f.size[ax]);
  }
  return f;
}

// What the march derives from the boxes, once per launch (CPU) or thread (CUDA): the level frames,
// and the boxes' extents' reciprocals when x * (1 / e) rounds as the twin's x / e does on every
// box axis: e a power of two (as the unit cube's and the contracted levels' are), both then one
// rounding of the same value; a multiply instead of a divide per axis and level of every sample.
template <typename T>
struct MarchBoxes {
  static constexpr int kLevels = 8;  // deeper grids divide and derive frames on the fly
  T inv[kLevels][3];
  LevelFrame frames[kLevels];
  bool exact;  // all reciprocals exact: march_ray<true> multiplies

  FASTNEFES_HD explicit MarchBoxes(const MarchArgs<T>& a) : exact(a.n_levels <= kLevels) {
    for (int l = 0; l < min_of(a.n_levels, kLevels); ++l) {
      frames[l] = level_frame(a, l);
      for (int ax = 0; ax < 3; ++ax) {
        const T e = sub_rn(a.aabbs[6 * l + 3 + ax], a.aabbs[6 * l + ax]);
        inv[l][ax] = T(1) / e;
        exact = exact && frexp_of(double(e)) == 0.5 && double(e) >= 0x1p-60 && double(e) <= 0x1p60;
      }
    }
  }
  FASTNEFES_HD LevelFrame frame(const MarchArgs<T>& a, int l) const {
    return l < kLevels ? frames[l] : level_frame(a, l);
  }
};

// The twin's occupied_at in T: occupancy of the finest level whose box contains p; that level and
// cell in *level / cell (level -1 when no box contains p).
template <bool kScaled, typename T>
FASTNEFES_HD bool occupied_at(const MarchArgs<T>& a, const MarchBoxes<T>& boxes, const T p[3], int* level,
                              int cell[3]) {
  for (int l = 0; l < a.n_levels; ++l) {
    const T* box = a.aabbs + 6 * l;
    T u[3];
    bool inside = true;
    for (int ax = 0; ax < 3; ++ax) {
      u[ax] = kScaled ? mul_rn(sub_rn(p[ax], box[ax]), boxes.inv[l][ax])
                      : div_rn(sub_rn(p[ax], box[ax]), sub_rn(box[ax + 3], box[ax]));
      inside = inside && u[ax] >= T(0) && u[ax] <= T(1);
    }
    if (!inside) continue;
    for (int ax = 0; ax < 3; ++ax)
      cell[ax] = int(min_of(max_of(int64_t(mul_rn(u[ax], T(a.res[ax]))), int64_t(0)), int64_t(a.res[ax] - 1)));
    *level = l;
    return a.binaries[((int64_t(l) * a.res[0] + cell[0]) * a.res[1] + cell[1]) * a.res[2] + cell[2]] != 0;
  }
  *level = -1;
  return false;
}

template <typename T>
struct RoundingOf {
  static constexpr double eps = 1.1920928955078125e-07;  // float
};
template <>
struct RoundingOf<double> {
  static constexpr double eps = 2.220446049250313e-16;
};

// The ray in double, for the skip decisions.
struct Ray64 {
  double o[3], d[3], inv_d[3];
};

// Free (skippable) at mip m >= 1: the dilated mip's cell of the block holding fine cell `cell`.
template <typename T>
FASTNEFES_HD bool block_free(const MarchArgs<T>& a, int l, int m, const int cell[3]) {
  const int r1 = mip_res(a.res[1], m), r2 = mip_res(a.res[2], m);
  const int64_t base = a.mip_offset[m] + int64_t(l) * mip_cells(a.res, m);
  return a.mips[base + (int64_t(cell[0] >> m) * r1 + (cell[1] >> m)) * r2 + (cell[2] >> m)] == 0;
}

// Steps a skip must span to repay its arithmetic (a sample test is a few nanoseconds).
constexpr double kMinSkipSteps = 8;

// The next step index to test after the empty step k (midpoint `mid`), whose T point fell in
// `cell` of `level`.
template <typename T>
FASTNEFES_HD double skip_empty(const MarchArgs<T>& a, const MarchBoxes<T>& boxes, const StepSchedule& s,
                               const Ray64& ray, double k, double mid, int level, const int cell[3]) {
  if (a.n_mips < 1) return k + 1;
  const LevelFrame f = boxes.frame(a, level);
  // The smallest mip whose blocks span kMinSkipSteps steps, then the coarsest free block.
  const double span = kMinSkipSteps * max_of(s.step, s.cone * mid);
  int m = 1;
  while (m < a.n_mips && double(1 << m) * f.cell_min < span) ++m;
  if (double(1 << m) * f.cell_min < span || !block_free(a, level, m, cell)) return k + 1;
  while (m < a.n_mips && block_free(a, level, m + 1, cell)) ++m;
  double t_exit = 1e300;
  for (int ax = 0; ax < 3; ++ax) {
    const int first = (cell[ax] >> m) << m, last = min_of(first + (1 << m), a.res[ax]);
    if (ray.d[ax] > 0) t_exit = min_of(t_exit, (f.lo[ax] + last * f.size[ax] - ray.o[ax]) * ray.inv_d[ax]);
    if (ray.d[ax] < 0) t_exit = min_of(t_exit, (f.lo[ax] + first * f.size[ax] - ray.o[ax]) * ray.inv_d[ax]);
  }
  const double k_last = last_step_before<T>(s, t_exit, true);  // the last midpoint inside the block
  return k_last > k ? k_last + 1 : k + 1;
}

// Whether skips are sound on this ray: twice a bound on how far T's point and cell arithmetic can
// put a sample (world units; 16x the first-order terms: d * mid and o + ., p - lo, hi - lo, / and
// * res) must stay under the free blocks' margin (one cell of the finest level).
template <typename T>
FASTNEFES_HD bool skips_sound(const MarchArgs<T>& a, const Ray64& ray, double t_far) {
  double reach = 0, ext = 0, cell_min = 1e300;
  for (int ax = 0; ax < 3; ++ax) {
    reach = max_of(reach, abs_of(ray.o[ax]) + abs_of(ray.d[ax]) * t_far);
    const T* outer = a.aabbs + 6 * (a.n_levels - 1);
    ext = max_of(ext, double(outer[ax + 3]) - double(outer[ax]));
    cell_min = min_of(cell_min, (double(a.aabbs[ax + 3]) - double(a.aabbs[ax])) / a.res[ax]);
  }
  const double error = 16.0 * RoundingOf<T>::eps * (3.0 * reach + 5.0 * ext + 1.0);
  return error < cell_min;
}

// March ray r; emit(r, t_start, t_end) for each kept sample, in order. boxes: MarchBoxes(a),
// built once per launch or thread; kScaled: boxes.exact.
template <bool kScaled, typename T, class Emit>
FASTNEFES_HD void march_ray(const MarchArgs<T>& a, const MarchBoxes<T>& boxes, int64_t r, Emit& emit) {
  T o[3], d[3];
  for (int ax = 0; ax < 3; ++ax) {
    o[ax] = a.rays_o[3 * r + ax];
    d[ax] = a.rays_d[3 * r + ax];
  }
  T t_min, t_max;
  slab_t(o, d, a.aabbs + 6 * (a.n_levels - 1), &t_min, &t_max);
  if (!(t_max > t_min && t_max > T(0))) return;
  const T t_lo = max_of(t_min, a.near[r]), t_hi = min_of(t_max, a.far[r]);
  if (!(t_lo < t_hi)) return;
  const StepSchedule s(double(a.near[r]), a.step, a.cone_angle);
  Ray64 ray;
  for (int ax = 0; ax < 3; ++ax) {
    ray.o[ax] = double(o[ax]);
    ray.d[ax] = double(d[ax]);
    ray.inv_d[ax] = ray.d[ax] != 0 ? 1.0 / ray.d[ax] : 0.0;
  }
  const bool skips = skips_sound(a, ray, abs_of(double(t_hi)));
  double k = last_step_before<T>(s, double(t_lo), false) + 1;  // the first midpoint >= t_lo
  double t_k = s.t(k);
  while (true) {
    const double t_next = s.t(k + 1);
    const T t0 = T(t_k), t1 = T(t_next);
    const T mid = mul_rn(add_rn(t0, t1), T(0.5));
    if (!(mid < t_hi)) break;
    T p[3];
    for (int ax = 0; ax < 3; ++ax) p[ax] = add_rn(o[ax], mul_rn(d[ax], mid));
    int level, cell[3];
    if (occupied_at<kScaled>(a, boxes, p, &level, cell)) {
      emit(r, t0, t1);
    } else if (skips && level >= 0) {
      const double next = skip_empty(a, boxes, s, ray, k, double(mid), level, cell);
      if (next > k + 1) {
        k = next;
        t_k = s.t(k);
        continue;
      }
    }
    k += 1;
    t_k = t_next;
  }
}

// march_ray with the multiply where it is exact.
template <typename T, class Emit>
FASTNEFES_HD void march_ray(const MarchArgs<T>& a, const MarchBoxes<T>& boxes, int64_t r, Emit& emit) {
  if (boxes.exact)
    march_ray<true>(a, boxes, r, emit);
  else
    march_ray<false>(a, boxes, r, emit);
}

}  // namespace fastnefes
