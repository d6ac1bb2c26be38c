// What the CUDA launchers (*_cuda.cu, nvcc only) share: half / bfloat16 storage (arithmetic in
// float), error checks and the device scope. Only CUDA headers: the .cu files compile with nvcc
// alone (the tests compile-check them on machines without a GPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernel_common.h"

namespace fastnefes {

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <>
struct Storage<__half> {
  using Compute = float;
  FASTNEFES_HD static float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  FASTNEFES_HD static void store(__half* p, int64_t i, float v) { p[i] = __float2half(v); }
};

template <>
struct Storage<__nv_bfloat16> {
  using Compute = float;
  FASTNEFES_HD static float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  FASTNEFES_HD static void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }
};

// Compute type of a storage type: float for float / half / bfloat16, double for double.
template <typename S>
using AccOf = typename Storage<S>::Compute;

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastnefes ") + what + ": " + cudaGetErrorString(err));
}

// Runs the launch with `device` current and restores the caller's device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

constexpr int kBlock = 256;

inline unsigned blocks_for(int64_t n_threads) { return unsigned((n_threads + kBlock - 1) / kBlock); }

}  // namespace fastnefes
