// Python bindings of the native kernels. One function per op; each dispatches on the tensors'
// device. The same file serves both builds: the CUDA entry points come from composite_cuda.cu in
// the CUDA build and from no_cuda.cpp (raising) in the CPU-only one. Shapes, dtypes and devices
// are checked here so a bad call raises instead of reading out of bounds.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "composite.h"
#include "hashgrid.h"

namespace fastnefes {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Misuse raises ValueError in Python (TORCH_CHECK_VALUE), as the torch twins do.
void check_float_tensor(const at::Tensor& t, const at::Tensor& like, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
}

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fastnefes native: unsupported dtype ", t);
  }
  return DType::kFloat;
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t && t->defined() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

const void* vptr_or_null(const OptTensor& t) { return t && t->defined() ? t->data_ptr() : nullptr; }
void* vptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

struct CompositeTensors {
  at::Tensor ranges, sigmas, rgbs, t_starts, t_ends;
  OptTensor features;
  int64_t n_features;
};

CompositeTensors check_composite(const at::Tensor& ranges, const at::Tensor& sigmas, const at::Tensor& rgbs,
                                 const OptTensor& features, const at::Tensor& t_starts, const at::Tensor& t_ends) {
  const int64_t n = sigmas.size(0);
  TORCH_CHECK_VALUE(sigmas.dim() == 1 && sigmas.is_contiguous(), "sigmas: expected a contiguous [N] tensor");
  TORCH_CHECK_VALUE(ranges.dim() == 2 && ranges.size(1) == 2 && ranges.scalar_type() == at::kLong && ranges.is_contiguous() &&
                  ranges.device() == sigmas.device(),
              "ranges: expected contiguous int64 [R, 2] on the samples' device");
  check_float_tensor(rgbs, sigmas, "rgbs", {n, 3});
  check_float_tensor(t_starts, sigmas, "t_starts", {n});
  check_float_tensor(t_ends, sigmas, "t_ends", {n});
  int64_t d = 0;
  if (features && features->defined()) {
    TORCH_CHECK_VALUE(features->dim() == 2, "features: expected [N, D]");
    d = features->size(1);
    check_float_tensor(*features, sigmas, "features", {n, d});
  }
  return {ranges, sigmas, rgbs, t_starts, t_ends, d ? features : std::nullopt, d};
}

template <typename T>
CompositeInputs<T> inputs_of(const CompositeTensors& c, double threshold) {
  return {c.ranges.size(0), c.ranges.data_ptr<int64_t>(), static_cast<const T*>(c.sigmas.data_ptr()),
          static_cast<const T*>(c.rgbs.data_ptr()), static_cast<const T*>(vptr_or_null(c.features)), c.n_features,
          static_cast<const T*>(c.t_starts.data_ptr()), static_cast<const T*>(c.t_ends.data_ptr()), threshold};
}

void require_cuda_build(const at::Tensor& t) {
  TORCH_CHECK(!t.is_cuda() || cuda_kernels_built(), "fastnefes native: this build has no CUDA kernels (CPU-only build)");
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), "fastnefes native: unsupported device ", t.device());
}

std::tuple<at::Tensor, OptTensor, at::Tensor, at::Tensor> composite_forward(
    const at::Tensor& ranges, const at::Tensor& sigmas, const at::Tensor& rgbs, const OptTensor& features,
    const at::Tensor& t_starts, const at::Tensor& t_ends, double threshold, int64_t stream) {
  require_cuda_build(sigmas);
  const CompositeTensors c = check_composite(ranges, sigmas, rgbs, features, t_starts, t_ends);
  const int64_t n_rays = ranges.size(0);
  const auto opts = sigmas.options();
  at::Tensor rgb = at::empty({n_rays, 3}, opts), depth = at::empty({n_rays}, opts),
             opacity = at::empty({n_rays}, opts);
  at::Tensor feat = c.n_features ? at::empty({n_rays, c.n_features}, opts) : at::Tensor();
  if (sigmas.is_cuda()) {
    composite_forward_cuda(dtype_code(sigmas.scalar_type()), inputs_of<void>(c, threshold),
                           {rgb.data_ptr(), vptr_or_null(feat), depth.data_ptr(), opacity.data_ptr()},
                           sigmas.get_device(), reinterpret_cast<void*>(stream));
  } else {
    AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "composite_forward_cpu", [&] {
      const auto in = inputs_of<scalar_t>(c, threshold);
      const CompositeOutputs<scalar_t> out{rgb.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(feat),
                                           depth.data_ptr<scalar_t>(), opacity.data_ptr<scalar_t>()};
      const int n_threads = at::get_num_threads();
      pybind11::gil_scoped_release no_gil;
      composite_forward_cpu(in, out, n_threads);
    });
  }
  return {rgb, c.n_features ? OptTensor(feat) : std::nullopt, depth, opacity};
}

// needs = which input gradients to return: (sigmas, rgbs, features, t_starts, t_ends).
std::vector<OptTensor> composite_backward(const at::Tensor& ranges, const at::Tensor& sigmas, const at::Tensor& rgbs,
                                          const OptTensor& features, const at::Tensor& t_starts,
                                          const at::Tensor& t_ends, double threshold, bool detach_feature_weights,
                                          const at::Tensor& rgb, const OptTensor& feat, const at::Tensor& depth,
                                          const at::Tensor& opacity, const OptTensor& g_rgb, const OptTensor& g_feat,
                                          const OptTensor& g_depth, const OptTensor& g_opacity,
                                          std::vector<bool> needs, int64_t stream) {
  require_cuda_build(sigmas);
  TORCH_CHECK(needs.size() == 5, "needs: expected 5 flags");
  const CompositeTensors c = check_composite(ranges, sigmas, rgbs, features, t_starts, t_ends);
  const int64_t n_rays = ranges.size(0), d = c.n_features;
  check_float_tensor(rgb, sigmas, "rgb", {n_rays, 3});
  check_float_tensor(depth, sigmas, "depth", {n_rays});
  check_float_tensor(opacity, sigmas, "opacity", {n_rays});
  if (d) {
    TORCH_CHECK(feat && feat->defined(), "features output missing");
    check_float_tensor(*feat, sigmas, "features output", {n_rays, d});
  }
  if (g_rgb) check_float_tensor(*g_rgb, sigmas, "grad rgb", {n_rays, 3});
  if (g_depth) check_float_tensor(*g_depth, sigmas, "grad depth", {n_rays});
  if (g_opacity) check_float_tensor(*g_opacity, sigmas, "grad opacity", {n_rays});
  const OptTensor gf = d ? g_feat : std::nullopt;
  if (gf) check_float_tensor(*gf, sigmas, "grad features", {n_rays, d});
  auto make = [&](bool need, const at::Tensor& like) { return need ? at::empty_like(like) : at::Tensor(); };
  at::Tensor d_sigmas = make(needs[0], sigmas), d_rgbs = make(needs[1], rgbs),
             d_features = make(needs[2] && d, d ? *c.features : sigmas), d_ts = make(needs[3], t_starts),
             d_te = make(needs[4], t_ends);
  if (sigmas.is_cuda()) {
    const CompositeGrads<void> g{rgb.data_ptr(),       vptr_or_null(feat),     depth.data_ptr(),
                                 opacity.data_ptr(),   vptr_or_null(g_rgb),    vptr_or_null(gf),
                                 vptr_or_null(g_depth), vptr_or_null(g_opacity), vptr_or_null(d_sigmas),
                                 vptr_or_null(d_rgbs), vptr_or_null(d_features), vptr_or_null(d_ts),
                                 vptr_or_null(d_te),   detach_feature_weights};
    composite_backward_cuda(dtype_code(sigmas.scalar_type()), inputs_of<void>(c, threshold), g,
                            sigmas.get_device(), reinterpret_cast<void*>(stream));
  } else {
    AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "composite_backward_cpu", [&] {
      const auto in = inputs_of<scalar_t>(c, threshold);
      const CompositeGrads<scalar_t> g{
          rgb.data_ptr<scalar_t>(),        ptr_or_null<scalar_t>(feat),      depth.data_ptr<scalar_t>(),
          opacity.data_ptr<scalar_t>(),    ptr_or_null<scalar_t>(g_rgb),     ptr_or_null<scalar_t>(gf),
          ptr_or_null<scalar_t>(g_depth),  ptr_or_null<scalar_t>(g_opacity), ptr_or_null<scalar_t>(d_sigmas),
          ptr_or_null<scalar_t>(d_rgbs),   ptr_or_null<scalar_t>(d_features), ptr_or_null<scalar_t>(d_ts),
          ptr_or_null<scalar_t>(d_te),     detach_feature_weights};
      const int n_threads = at::get_num_threads();
      pybind11::gil_scoped_release no_gil;
      composite_backward_cpu(in, g, n_threads);
    });
  }
  auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
  return {opt(d_sigmas), opt(d_rgbs), opt(d_features), opt(d_ts), opt(d_te)};
}

// ray_indices [N] int64 sorted -> ranges [R, 2] (first sample, count). The CPU path rejects
// unsorted or out-of-range ids; the CUDA path ignores out-of-range ids and trusts the order.
at::Tensor ray_ranges(const at::Tensor& ray_indices, int64_t n_rays, int64_t stream) {
  require_cuda_build(ray_indices);
  TORCH_CHECK_VALUE(ray_indices.dim() == 1 && ray_indices.scalar_type() == at::kLong && ray_indices.is_contiguous(),
                    "ray_indices: expected a contiguous int64 [N] tensor");
  TORCH_CHECK_VALUE(n_rays >= 0, "n_rays: expected >= 0, got ", n_rays);
  at::Tensor ranges = at::empty({n_rays, 2}, ray_indices.options());
  if (ray_indices.is_cuda()) {
    ray_ranges_cuda(ray_indices.data_ptr<int64_t>(), ray_indices.size(0), n_rays, ranges.data_ptr<int64_t>(),
                    ray_indices.get_device(), reinterpret_cast<void*>(stream));
  } else {
    const int64_t bad = ray_ranges_cpu(ray_indices.data_ptr<int64_t>(), ray_indices.size(0), n_rays,
                                       ranges.data_ptr<int64_t>());
    TORCH_CHECK_VALUE(bad < 0, "ray_indices[", bad, "] = ", bad < 0 ? 0 : ray_indices.data_ptr<int64_t>()[bad],
                      ": expected sorted ray indices in [0, ", n_rays, ")");
  }
  return ranges;
}

using LevelTuple = std::tuple<double, int64_t, int64_t, int64_t, bool>;  // scale, resolution, size, offset, dense

std::vector<GridLevel> grid_levels(const std::vector<LevelTuple>& levels) {
  TORCH_CHECK(!levels.empty(), "hash grid: expected at least one level");
  std::vector<GridLevel> out;
  for (const auto& [scale, res, size, offset, dense] : levels) {
    TORCH_CHECK(res >= 1 && size >= 1 && size <= (int64_t(1) << 31) && offset >= 0, "hash grid: bad level");
    out.push_back({scale, uint32_t(res), uint32_t(size), offset, dense});
  }
  return out;
}

void check_grid(const at::Tensor& x, const at::Tensor& params, const std::vector<GridLevel>& levels, int64_t f) {
  TORCH_CHECK(x.is_cpu(), "hash grid native: CPU tensors only (CUDA uses tcnn or torch)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "hash grid: x must be float32/64");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 3 && x.is_contiguous(), "hash grid: x must be contiguous [N, 3]");
  TORCH_CHECK(f >= 1, "hash grid: features per level >= 1");
  const int64_t entries = levels.back().offset + levels.back().size;
  check_float_tensor(params, x, "hash grid params", {entries * f});
}

template <typename T>
HashGridArgs<T> grid_args(const at::Tensor& x, const at::Tensor& params, const std::vector<GridLevel>& levels,
                          int64_t f) {
  return {x.size(0), x.data_ptr<T>(), params.data_ptr<T>(), levels.data(), int(levels.size()), int(f)};
}

at::Tensor hashgrid_forward(const at::Tensor& x, const at::Tensor& params, const std::vector<LevelTuple>& level_list,
                            int64_t n_features) {
  const auto levels = grid_levels(level_list);
  check_grid(x, params, levels, n_features);
  at::Tensor out = at::empty({x.size(0), int64_t(levels.size()) * n_features}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_forward_cpu", [&] {
    const auto a = grid_args<scalar_t>(x, params, levels, n_features);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int n_threads = at::get_num_threads();
    pybind11::gil_scoped_release no_gil;
    hashgrid_forward_cpu(a, o, n_threads);
  });
  return out;
}

std::tuple<OptTensor, OptTensor> hashgrid_backward(const at::Tensor& x, const at::Tensor& params,
                                                   const std::vector<LevelTuple>& level_list, int64_t n_features,
                                                   const at::Tensor& grad_out, bool need_x, bool need_params) {
  const auto levels = grid_levels(level_list);
  check_grid(x, params, levels, n_features);
  check_float_tensor(grad_out, x, "hash grid grad_out", {x.size(0), int64_t(levels.size()) * n_features});
  at::Tensor gx = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor gp = need_params ? at::empty_like(params) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_backward_cpu", [&] {
    const auto a = grid_args<scalar_t>(x, params, levels, n_features);
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    scalar_t* gxp = ptr_or_null<scalar_t>(gx);
    scalar_t* gpp = ptr_or_null<scalar_t>(gp);
    const int n_threads = at::get_num_threads();
    pybind11::gil_scoped_release no_gil;
    hashgrid_backward_cpu(a, g, gpp, gxp, n_threads);
  });
  return {need_x ? OptTensor(gx) : std::nullopt, need_params ? OptTensor(gp) : std::nullopt};
}

}  // namespace
}  // namespace fastnefes

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fastnefes;
  m.doc() = "fastnefes native kernels: fused compositing (CPU/CUDA) and the CPU hash grid";
  m.attr("with_cuda") = cuda_kernels_built();
  m.def("composite_forward", &composite_forward, "fused compositing forward");
  m.def("composite_backward", &composite_backward, "fused compositing backward");
  m.def("ray_ranges", &ray_ranges, "sorted ray indices -> [R, 2] (first sample, count)");
  m.def("hashgrid_forward", &hashgrid_forward, "hash-grid encoding forward (CPU)");
  m.def("hashgrid_backward", &hashgrid_backward, "hash-grid encoding backward (CPU)");
}
