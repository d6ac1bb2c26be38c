// The hash-grid kernel body: one point in one level, forward (gather) and backward (scatter to the
// table, derivative w.r.t. the position), shared by hashgrid_cpu.cpp and hashgrid_cuda.cu.
//
// Per level: p = scale * x + 0.5 rounded once to the compute type (tcnn's fmaf(scale, x, 0.5f):
// the product of a float and the float scale is exact in double), cell = floor(p) as uint32,
// trilinear weights over the 8 corners (bit d = +1 along axis d), index = dense ? x + y*res +
// z*res^2 : x ^ y*2654435761 ^ z*805459861 (uint32), mod level size;
// params[(offset + index) * F + f], output column level * F + f.
#pragma once

#include "hashgrid.h"
#include "kernel_common.h"

namespace fastnefes {

constexpr uint32_t kPrimeY = 2654435761u, kPrimeZ = 805459861u;

// The 8 corners of one point in one level: table entries (level-relative) and trilinear factors.
template <typename A>
struct Corners {
  uint32_t index[8];
  A weight[8];
  A frac[3];
};

template <typename A>
FASTNEFES_HD Corners<A> level_corners(const A* x, const GridLevel& lv) {
  Corners<A> c;
  uint32_t cell[3];
  for (int d = 0; d < 3; ++d) {
    const A pos = A(add_rn(mul_rn(double(x[d]), lv.scale), 0.5));
    // floor by truncation where int64 holds it exactly (libm's floor is a call without SSE4.1)
    int64_t i = (pos > A(-2147483648.0) && pos < A(2147483648.0)) ? int64_t(pos) : int64_t(floor_of(pos));
    if (A(i) > pos) --i;
    c.frac[d] = pos - A(i);
    cell[d] = uint32_t(i);
  }
  // Each axis' two corner terms of the index (uint32 arithmetic: (c + 1) * m = c * m + m), combined
  // by + (dense) or ^ (hashed); then the weights as products of the axes' factors.
  const uint32_t res = lv.resolution;
  const uint32_t my = lv.dense ? res : kPrimeY, mz = lv.dense ? res * res : kPrimeZ;
  const uint32_t ty0 = cell[1] * my, tz0 = cell[2] * mz;
  const uint32_t tx[2] = {cell[0], cell[0] + 1}, ty[2] = {ty0, ty0 + my}, tz[2] = {tz0, tz0 + mz};
  const A wx[2] = {A(1) - c.frac[0], c.frac[0]}, wy[2] = {A(1) - c.frac[1], c.frac[1]},
          wz[2] = {A(1) - c.frac[2], c.frac[2]};
  // index mod size: a mask for power-of-two (hashed) levels, a rarely taken modulo for dense ones
  // (a dense index exceeds the size only on the far faces of the unit cube).
  const bool pow2 = (lv.size & (lv.size - 1)) == 0;
  for (int k = 0; k < 8; ++k) {
    const int i = k & 1, j = (k >> 1) & 1, l = k >> 2;
    const uint32_t idx = lv.dense ? tx[i] + ty[j] + tz[l] : tx[i] ^ ty[j] ^ tz[l];
    c.index[k] = pow2 ? idx & (lv.size - 1) : (idx < lv.size ? idx : idx % lv.size);
    c.weight[k] = wx[i] * wy[j] * wz[l];
  }
  return c;
}

// kF: features per level as a compile-time constant (0 = F at run time). o [F] is fully written.
template <typename A, typename P, int kF>
FASTNEFES_HD void gather(const P* params, const GridLevel& lv, const Corners<A>& c, int F, A* o) {
  const int nf = kF ? kF : F;
  for (int f = 0; f < nf; ++f) o[f] = 0;
  for (int k = 0; k < 8; ++k) {
    const P* v = params + (lv.offset + c.index[k]) * nf;
    for (int f = 0; f < nf; ++f) o[f] += c.weight[k] * A(load(v, f));
  }
}

// Backward of one point in one level, upstream gradient g [F]: table.add(entry, value) for each
// corner's features when table.enabled(); with need_x, dx [3] = dL/dx of this level.
template <typename A, typename P, int kF, class TableGrad>
FASTNEFES_HD void scatter(const P* params, const GridLevel& lv, const Corners<A>& c, const A* g, int F,
                          TableGrad& table, bool need_x, A* dx) {
  const int nf = kF ? kF : F;
  A dl_dw[8];
  for (int k = 0; k < 8; ++k) {
    const int64_t e = (lv.offset + c.index[k]) * nf;
    if (table.enabled())
      for (int f = 0; f < nf; ++f) table.add(e + f, c.weight[k] * g[f]);
    if (need_x) {
      A s = 0;
      for (int f = 0; f < nf; ++f) s += A(load(params, e + f)) * g[f];
      dl_dw[k] = s;
    }
  }
  if (!need_x) return;
  for (int d = 0; d < 3; ++d) {
    // d w_k / d frac_d: the other two axes' factors (in axis order), signed by bit d.
    const int lo = d == 0 ? 1 : 0, hi = d == 2 ? 1 : 2;
    A s = 0;
    for (int k = 0; k < 8; ++k) {
      const A f_lo = ((k >> lo) & 1) ? c.frac[lo] : A(1) - c.frac[lo];
      const A f_hi = ((k >> hi) & 1) ? c.frac[hi] : A(1) - c.frac[hi];
      const A term = dl_dw[k] * (f_lo * f_hi);
      s += ((k >> d) & 1) ? term : -term;
    }
    dx[d] = s * A(lv.scale);
  }
}

}  // namespace fastnefes
