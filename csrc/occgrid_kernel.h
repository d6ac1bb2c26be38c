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
// Speed: after an empty sample, the largest empty block around it (a coarser mip) is skipped in
// one go. The skip is decided in double precision and only taken when every skipped sample's
// point lies farther than a bound on T's rounding error from the block's faces and from the next
// finer level's box: the T test could not have found any of them occupied.
#pragma once

#include "kernel_common.h"
#include "occgrid.h"

namespace fastnefes {

FASTNEFES_HD int mip_res(int res, int m) { return (res + (1 << m) - 1) >> m; }

FASTNEFES_HD int64_t mip_cells(const int res[3], int m) {
  return int64_t(mip_res(res[0], m)) * mip_res(res[1], m) * mip_res(res[2], m);
}

// A cell of mip m (>= 1) of one level from its 2 x 2 x 2 children in mip m - 1 (0 = the grid).
FASTNEFES_HD uint8_t mip_cell(const uint8_t* child, const int res[3], int m, int i, int j, int k) {
  const int c0 = mip_res(res[0], m - 1), c1 = mip_res(res[1], m - 1), c2 = mip_res(res[2], m - 1);
  for (int ci = 2 * i; ci < min_of(2 * i + 2, c0); ++ci)
    for (int cj = 2 * j; cj < min_of(2 * j + 2, c1); ++cj)
      for (int ck = 2 * k; ck < min_of(2 * k + 2, c2); ++ck)
        if (child[(int64_t(ci) * c1 + cj) * c2 + ck]) return 1;
  return 0;
}

// The march's step positions t_k (double), the twin's closed form.
struct StepSchedule {
  double near, step, cone, k0, t_k0, growth;

  FASTNEFES_HD StepSchedule(double near_, double step_, double cone_)
      : near(near_), step(step_), cone(cone_), k0(0), t_k0(0), growth(1) {
    if (cone > 0) {
      const double t_switch = div_rn(step, cone);
      k0 = max_of(ceil_of(div_rn(sub_rn(t_switch, near), step)), 0.0);
      t_k0 = add_rn(near, mul_rn(k0, step));
      growth = add_rn(1.0, cone);
    }
  }
  FASTNEFES_HD double t(double k) const {
    if (cone <= 0 || k <= k0) return add_rn(near, mul_rn(k, step));
    return mul_rn(t_k0, pow_of(growth, sub_rn(k, k0)));
  }
  // About the k with t_k = t (a start for the exact searches below).
  FASTNEFES_HD double index_estimate(double t) const {
    double k = (cone <= 0 || t <= t_k0) ? (t - near) / step : k0 + log_of(t / t_k0) / log_of(growth);
    k = k == k ? floor_of(k) : 0.0;  // NaN -> 0
    return min_of(max_of(k, 0.0), 4.0e15);
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
    const double m = floor_of((lo + hi) * 0.5);
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

// The twin's occupied_at in T: occupancy of the finest level whose box contains p.
template <typename T>
FASTNEFES_HD bool occupied_at(const MarchArgs<T>& a, const T p[3]) {
  for (int l = 0; l < a.n_levels; ++l) {
    const T* box = a.aabbs + 6 * l;
    T u[3];
    bool inside = true;
    for (int ax = 0; ax < 3; ++ax) {
      u[ax] = div_rn(sub_rn(p[ax], box[ax]), sub_rn(box[ax + 3], box[ax]));
      inside = inside && u[ax] >= T(0) && u[ax] <= T(1);
    }
    if (!inside) continue;
    int64_t ijk[3];
    for (int ax = 0; ax < 3; ++ax)
      ijk[ax] = min_of(max_of(int64_t(mul_rn(u[ax], T(a.res[ax]))), int64_t(0)), int64_t(a.res[ax] - 1));
    return a.binaries[((int64_t(l) * a.res[0] + ijk[0]) * a.res[1] + ijk[1]) * a.res[2] + ijk[2]] != 0;
  }
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
  double o[3], d[3];

  FASTNEFES_HD void at(double t, double p[3]) const {
    for (int ax = 0; ax < 3; ++ax) p[ax] = o[ax] + d[ax] * t;
  }
};

// Entry and exit of the ray through the box [lo - margin, hi + margin] (double).
FASTNEFES_HD void slab64(const Ray64& ray, const double lo[3], const double hi[3], double margin, double* t_in,
                         double* t_out) {
  double t0 = -1e300, t1 = 1e300;
  for (int ax = 0; ax < 3; ++ax) {
    const double a = lo[ax] - margin, b = hi[ax] + margin;
    if (ray.d[ax] == 0) {
      if (ray.o[ax] < a || ray.o[ax] > b) t0 = 1e300;  // parallel and outside: never inside
      continue;
    }
    const double ta = (a - ray.o[ax]) / ray.d[ax], tb = (b - ray.o[ax]) / ray.d[ax];
    t0 = max_of(t0, min_of(ta, tb));
    t1 = min_of(t1, max_of(ta, tb));
  }
  *t_in = t0;
  *t_out = t1;
}

template <typename T>
FASTNEFES_HD void level_box(const MarchArgs<T>& a, int l, double lo[3], double hi[3]) {
  for (int ax = 0; ax < 3; ++ax) {
    lo[ax] = double(a.aabbs[6 * l + ax]);
    hi[ax] = double(a.aabbs[6 * l + 3 + ax]);
  }
}

template <typename T>
FASTNEFES_HD bool block_occupied(const MarchArgs<T>& a, int l, int m, const int cell[3]) {
  if (m == 0) return a.binaries[((int64_t(l) * a.res[0] + cell[0]) * a.res[1] + cell[1]) * a.res[2] + cell[2]] != 0;
  const int r1 = mip_res(a.res[1], m), r2 = mip_res(a.res[2], m);
  const int64_t base = a.mip_offset[m] + int64_t(l) * mip_cells(a.res, m);
  return a.mips[base + (int64_t(cell[0] >> m) * r1 + (cell[1] >> m)) * r2 + (cell[2] >> m)] != 0;
}

// The next step index to test after step k, whose T sample (midpoint `mid`) tested empty.
template <typename T>
FASTNEFES_HD double skip_empty(const MarchArgs<T>& a, const StepSchedule& s, const Ray64& ray, double k, double mid) {
  double p[3], lo[3], hi[3];
  ray.at(mid, p);
  int l = 0;  // the finest level containing p
  for (; l < a.n_levels; ++l) {
    level_box(a, l, lo, hi);
    bool inside = true;
    for (int ax = 0; ax < 3; ++ax) inside = inside && p[ax] >= lo[ax] && p[ax] <= hi[ax];
    if (inside) break;
  }
  if (l == a.n_levels) return k + 1;
  double cell_size[3];
  int cell[3];
  for (int ax = 0; ax < 3; ++ax) {
    cell_size[ax] = (hi[ax] - lo[ax]) / a.res[ax];
    cell[ax] = int(min_of(max_of(floor_of((p[ax] - lo[ax]) / cell_size[ax]), 0.0), double(a.res[ax] - 1)));
  }
  if (block_occupied(a, l, 0, cell)) return k + 1;  // a T rounding away from an occupied cell
  int m = 0;  // the coarsest empty block around p
  while (m < a.n_mips && !block_occupied(a, l, m + 1, cell)) ++m;
  double b_lo[3], b_hi[3], ext = 0, reach = 0;
  for (int ax = 0; ax < 3; ++ax) {
    const int first = (cell[ax] >> m) << m, last = min_of(first + (1 << m), a.res[ax]);
    b_lo[ax] = lo[ax] + first * cell_size[ax];
    b_hi[ax] = lo[ax] + last * cell_size[ax];
    ext = max_of(ext, hi[ax] - lo[ax]);
    reach = max_of(reach, max_of(abs_of(ray.o[ax]), max_of(abs_of(b_lo[ax]), abs_of(b_hi[ax]))));
  }
  double t_exit = 1e300;
  for (int ax = 0; ax < 3; ++ax) {
    if (ray.d[ax] > 0) t_exit = min_of(t_exit, (b_hi[ax] - ray.o[ax]) / ray.d[ax]);
    if (ray.d[ax] < 0) t_exit = min_of(t_exit, (b_lo[ax] - ray.o[ax]) / ray.d[ax]);
  }
  double d_max = 0;
  for (int ax = 0; ax < 3; ++ax) d_max = max_of(d_max, abs_of(ray.d[ax]));
  // A bound on how far T's point and cell arithmetic can put a sample from its exact position
  // (world units; 16x the first-order terms: d * mid and o + ., p - lo, (hi - lo), / and * res).
  const double error =
      16.0 * RoundingOf<T>::eps * (d_max * max_of(abs_of(mid), abs_of(t_exit)) + 2.0 * reach + 5.0 * ext + 1.0);
  double t_limit = t_exit;
  if (l > 0) {  // stay clear of the next finer level's box
    double in_lo[3], in_hi[3], t_in, t_out;
    level_box(a, l - 1, in_lo, in_hi);
    slab64(ray, in_lo, in_hi, error, &t_in, &t_out);
    if (t_in <= t_out && t_out > mid) {
      if (t_in <= mid) return k + 1;
      t_limit = min_of(t_limit, t_in);
    }
  }
  // A skipped sample's exact point lies inside the block by more than the error bound, and before
  // the ray comes within the bound of the finer level's box: T's test finds it in this block.
  auto clear_of_faces = [&](double kk) {
    double q[3];
    ray.at(double(step_mid<T>(s, kk)), q);
    for (int ax = 0; ax < 3; ++ax)
      if (!(q[ax] - b_lo[ax] > error && b_hi[ax] - q[ax] > error)) return false;
    return true;
  };
  if (!(double(step_mid<T>(s, k + 1)) < t_limit && clear_of_faces(k + 1))) return k + 1;
  double k_last = last_step_before<T>(s, t_limit, false);  // midpoint < t_limit
  for (int tries = 0; tries < 2 && k_last > k + 1 && !clear_of_faces(k_last); ++tries) k_last -= 1;
  if (k_last <= k + 1 || !clear_of_faces(k_last)) return k + 2;  // k + 1 alone is clear
  return k_last + 1;  // k + 1 .. k_last: between two clear samples on a straight ray
}

// March ray r; emit(r, t_start, t_end) for each kept sample, in order.
template <typename T, class Emit>
FASTNEFES_HD void march_ray(const MarchArgs<T>& a, int64_t r, Emit& emit) {
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
  const Ray64 ray{{double(o[0]), double(o[1]), double(o[2])}, {double(d[0]), double(d[1]), double(d[2])}};
  double k = last_step_before<T>(s, double(t_lo), false) + 1;  // the first midpoint >= t_lo
  double t_k = s.t(k);
  while (true) {
    const double t_next = s.t(k + 1);
    const T t0 = T(t_k), t1 = T(t_next);
    const T mid = mul_rn(add_rn(t0, t1), T(0.5));
    if (!(mid < t_hi)) break;
    T p[3];
    for (int ax = 0; ax < 3; ++ax) p[ax] = add_rn(o[ax], mul_rn(d[ax], mid));
    if (occupied_at(a, p)) {
      emit(r, t0, t1);
      k += 1;
      t_k = t_next;
      continue;
    }
    const double next = skip_empty(a, s, ray, k, double(mid));
    t_k = next == k + 1 ? t_next : s.t(next);
    k = next;
  }
}

}  // namespace fastnefes
