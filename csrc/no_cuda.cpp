// The CPU-only build's CUDA entry points: they only raise. The CUDA build links
// composite_cuda.cu instead, so bindings.cpp is the same code in both builds.
#include <stdexcept>

#include "composite.h"

namespace fastnefes {
namespace {

[[noreturn]] void no_cuda() {
  throw std::runtime_error("fastnefes native: this is the CPU-only build (no CUDA kernels compiled)");
}

}  // namespace

bool cuda_kernels_built() { return false; }

void composite_forward_cuda(DType, const CompositeInputs<void>&, const CompositeOutputs<void>&, int, void*) {
  no_cuda();
}
void composite_backward_cuda(DType, const CompositeInputs<void>&, const CompositeGrads<void>&, int, void*) {
  no_cuda();
}
void ray_ranges_cuda(const int64_t*, int64_t, int64_t, int64_t*, int, void*) { no_cuda(); }

}  // namespace fastnefes
