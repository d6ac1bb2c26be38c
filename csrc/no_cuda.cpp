// The CPU-only build's CUDA entry points: they only raise. The CUDA build links the *_cuda.cu
// launchers instead, so bindings.cpp is the same code in both builds.
#include <stdexcept>

#include "composite.h"
#include "hashgrid.h"
#include "occgrid.h"

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
void hashgrid_forward_cuda(DType, DType, DType, const HashGridArgs<void, void>&, void*, int, void*) { no_cuda(); }
void hashgrid_backward_cuda(DType, DType, DType, const HashGridArgs<void, void>&, const void*, void*, void*, int,
                            void*) {
  no_cuda();
}
void occgrid_count_cuda(DType, const MarchArgs<void>&, int64_t*, int, void*) { no_cuda(); }
void occgrid_fill_cuda(DType, const MarchArgs<void>&, const int64_t*, int64_t*, void*, void*, int, void*) {
  no_cuda();
}
void occgrid_mips_cuda(const uint8_t*, const float*, int, const int[3], uint8_t*, uint8_t*, int, void*) { no_cuda(); }

}  // namespace fastnefes
