// What every kernel-body header shares: the host/device function qualifier, storage <-> compute
// conversions, and rounding-exact arithmetic.
//
// A kernel body (composite_kernel.h, hashgrid_kernel.h, occgrid_kernel.h) is a set of
// FASTNEFES_HD inline functions compiled twice: by the host compiler for the OpenMP launchers
// (*_cpu.cpp) and by nvcc for the CUDA launchers (*_cuda.cu). Only the launchers differ.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTNEFES_HD __host__ __device__ __forceinline__
#else
#define FASTNEFES_HD inline
#endif

namespace fastnefes {

// Storage type S -> values of compute type. float / double here; the CUDA launchers specialise
// it for __half and __nv_bfloat16 (cuda_common.h), whose arithmetic is done in float.
template <typename S>
struct Storage {
  using Compute = S;
  FASTNEFES_HD static Compute load(const S* p, int64_t i) { return p[i]; }
  FASTNEFES_HD static void store(S* p, int64_t i, Compute v) { p[i] = v; }
};

template <typename S>
FASTNEFES_HD typename Storage<S>::Compute load(const S* p, int64_t i) {
  return Storage<S>::load(p, i);
}

template <typename S, typename A>
FASTNEFES_HD void store(S* p, int64_t i, A v) {
  Storage<S>::store(p, i, typename Storage<S>::Compute(v));
}

template <typename A, typename S>
FASTNEFES_HD A load_or_zero(const S* p, int64_t i) {
  return p ? A(load(p, i)) : A(0);
}

FASTNEFES_HD float exp_neg(float v) {
#if defined(__CUDA_ARCH__)
  return expf(-v);
#else
  return std::exp(-v);
#endif
}

FASTNEFES_HD double exp_neg(double v) {
#if defined(__CUDA_ARCH__)
  return exp(-v);
#else
  return std::exp(-v);
#endif
}

// Each operation rounded on its own, never fused into an FMA: where a kernel must reproduce the
// pure-torch twin bit for bit (the occupancy march decides cells from float positions), it uses
// these. The host build already has -ffp-contract=off; nvcc contracts unless told not to.
FASTNEFES_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTNEFES_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTNEFES_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTNEFES_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FASTNEFES_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTNEFES_HD double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTNEFES_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTNEFES_HD double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

FASTNEFES_HD float floor_of(float v) {
#if defined(__CUDA_ARCH__)
  return floorf(v);
#else
  return std::floor(v);
#endif
}
FASTNEFES_HD double floor_of(double v) {
#if defined(__CUDA_ARCH__)
  return floor(v);
#else
  return std::floor(v);
#endif
}

FASTNEFES_HD double ceil_of(double v) {
#if defined(__CUDA_ARCH__)
  return ceil(v);
#else
  return std::ceil(v);
#endif
}
FASTNEFES_HD double pow_of(double base, double exponent) {
#if defined(__CUDA_ARCH__)
  return pow(base, exponent);
#else
  return std::pow(base, exponent);
#endif
}
FASTNEFES_HD double log_of(double v) {
#if defined(__CUDA_ARCH__)
  return log(v);
#else
  return std::log(v);
#endif
}
FASTNEFES_HD double frexp_of(double v) {  // the mantissa in [0.5, 1) (0 for 0)
  int exponent;
#if defined(__CUDA_ARCH__)
  return frexp(v, &exponent);
#else
  return std::frexp(v, &exponent);
#endif
}
FASTNEFES_HD double abs_of(double v) { return v < 0 ? -v : v; }

template <typename T>
FASTNEFES_HD T min_of(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
FASTNEFES_HD T max_of(T a, T b) {
  return a < b ? b : a;
}

// Type-erased dtype codes of the CUDA entry points (their files include no torch headers).
enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// True in the build that compiled the *_cuda.cu launchers, false in the CPU-only build.
bool cuda_kernels_built();

}  // namespace fastnefes
