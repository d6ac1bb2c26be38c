// Python bindings of the native kernels. One function per op; each dispatches on the tensors'
// device. The same file serves both builds: the CUDA entry points come from the *_cuda.cu
// launchers in the CUDA build and from no_cuda.cpp (raising) in the CPU-only one. Shapes, dtypes and devices
// are checked here so a bad call raises instead of reading out of bounds.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "composite.h"
#include "hashgrid.h"
#include "occgrid.h"

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

// Level list -> uint8 [L * 32] CPU tensor of GridLevel records (moved to the GPU by the caller).
at::Tensor pack_levels(const std::vector<LevelTuple>& levels) {
  TORCH_CHECK_VALUE(!levels.empty(), "hash grid: expected at least one level");
  at::Tensor packed = at::empty({int64_t(levels.size() * sizeof(GridLevel))}, at::kByte);
  auto* out = reinterpret_cast<GridLevel*>(packed.data_ptr<uint8_t>());
  for (const auto& [scale, res, size, offset, dense] : levels) {
    TORCH_CHECK_VALUE(res >= 1 && size >= 1 && size <= (int64_t(1) << 31) && offset >= 0, "hash grid: bad level");
    *out++ = GridLevel{scale, uint32_t(res), uint32_t(size), offset, dense ? 1u : 0u, 0u};
  }
  return packed;
}

struct GridShape {
  int n_levels;
  int64_t n_entries;
};

// levels_host: pack_levels' CPU tensor; levels: the same records on x's device.
GridShape check_grid(const at::Tensor& x, const at::Tensor& params, const at::Tensor& levels_host,
                     const at::Tensor& levels, int64_t f) {
  TORCH_CHECK_VALUE(levels_host.is_cpu() && levels_host.scalar_type() == at::kByte && levels_host.is_contiguous() &&
                        levels_host.numel() > 0 && levels_host.numel() % int64_t(sizeof(GridLevel)) == 0,
                    "hash grid: levels must come from pack_levels");
  TORCH_CHECK_VALUE(levels.device() == x.device() && levels.numel() == levels_host.numel() && levels.is_contiguous(),
                    "hash grid: level records must be on x's device");
  const int n_levels = int(levels_host.numel() / int64_t(sizeof(GridLevel)));
  const GridLevel& last = reinterpret_cast<const GridLevel*>(levels_host.data_ptr<uint8_t>())[n_levels - 1];
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "hash grid: x must be float32/64");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == 3 && x.is_contiguous(), "hash grid: x must be contiguous [N, 3]");
  TORCH_CHECK_VALUE(f >= 1, "hash grid: features per level >= 1");
  const int64_t entries = last.offset + last.size;
  TORCH_CHECK_VALUE(params.device() == x.device() && params.is_contiguous() && params.dim() == 1 &&
                        params.size(0) == entries * f,
                    "hash grid params: expected a contiguous [", entries * f, "] tensor on x's device");
  if (x.is_cpu()) check_float_tensor(params, x, "hash grid params", {entries * f});
  return {n_levels, entries};
}

template <typename X, typename P>
HashGridArgs<X, P> grid_args(const at::Tensor& x, const at::Tensor& params, const at::Tensor& levels,
                             const GridShape& g, int64_t f) {
  return {x.size(0), static_cast<const X*>(x.data_ptr()), static_cast<const P*>(params.data_ptr()),
          reinterpret_cast<const GridLevel*>(levels.data_ptr()), g.n_levels, int(f)};
}

// out_dtype: the output's dtype on CUDA (float32, or float16 for half x and params; float64);
// on CPU x and params share one dtype, the output's.
at::Tensor hashgrid_forward(const at::Tensor& x, const at::Tensor& params, const at::Tensor& levels_host,
                            const at::Tensor& levels, int64_t n_features, at::ScalarType out_dtype, int64_t stream) {
  require_cuda_build(x);
  const GridShape g = check_grid(x, params, levels_host, levels, n_features);
  at::Tensor out = at::empty({x.size(0), int64_t(g.n_levels) * n_features}, x.options().dtype(out_dtype));
  if (x.is_cuda()) {
    hashgrid_forward_cuda(dtype_code(x.scalar_type()), dtype_code(params.scalar_type()), dtype_code(out_dtype),
                          grid_args<void, void>(x, params, levels, g, n_features), out.data_ptr(), x.get_device(),
                          reinterpret_cast<void*>(stream));
    return out;
  }
  TORCH_CHECK_VALUE(out_dtype == x.scalar_type(), "hash grid CPU: output dtype must be x's");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_forward_cpu", [&] {
    const auto a = grid_args<scalar_t, scalar_t>(x, params, levels, g, n_features);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int n_threads = at::get_num_threads();
    pybind11::gil_scoped_release no_gil;
    hashgrid_forward_cpu(a, o, n_threads);
  });
  return out;
}

// The table gradient has the params' dtype (float32 for half params on CUDA), grad x x's.
std::tuple<OptTensor, OptTensor> hashgrid_backward(const at::Tensor& x, const at::Tensor& params,
                                                   const at::Tensor& levels_host, const at::Tensor& levels,
                                                   int64_t n_features, const at::Tensor& grad_out, bool need_x,
                                                   bool need_params, int64_t stream) {
  require_cuda_build(x);
  const GridShape g = check_grid(x, params, levels_host, levels, n_features);
  const int64_t width = int64_t(g.n_levels) * n_features;
  TORCH_CHECK_VALUE(grad_out.device() == x.device() && grad_out.is_contiguous() && grad_out.dim() == 2 &&
                        grad_out.size(0) == x.size(0) && grad_out.size(1) == width,
                    "hash grid grad_out: expected a contiguous [", x.size(0), ", ", width, "] tensor");
  if (x.is_cuda()) {
    const auto table_dtype = params.scalar_type() == at::kHalf ? at::kFloat : params.scalar_type();
    at::Tensor gx = need_x ? at::zeros_like(x) : at::Tensor();
    at::Tensor gp = need_params ? at::zeros({params.size(0)}, params.options().dtype(table_dtype)) : at::Tensor();
    hashgrid_backward_cuda(dtype_code(x.scalar_type()), dtype_code(params.scalar_type()),
                           dtype_code(grad_out.scalar_type()), grid_args<void, void>(x, params, levels, g, n_features),
                           grad_out.data_ptr(), vptr_or_null(gp), vptr_or_null(gx), x.get_device(),
                           reinterpret_cast<void*>(stream));
    return {need_x ? OptTensor(gx) : std::nullopt, need_params ? OptTensor(gp) : std::nullopt};
  }
  check_float_tensor(grad_out, x, "hash grid grad_out", {x.size(0), width});
  at::Tensor gx = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor gp = need_params ? at::empty_like(params) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_backward_cpu", [&] {
    const auto a = grid_args<scalar_t, scalar_t>(x, params, levels, g, n_features);
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    scalar_t* gxp = ptr_or_null<scalar_t>(gx);
    scalar_t* gpp = ptr_or_null<scalar_t>(gp);
    const int n_threads = at::get_num_threads();
    pybind11::gil_scoped_release no_gil;
    hashgrid_backward_cpu(a, go, gpp, gxp, n_threads);
  });
  return {need_x ? OptTensor(gx) : std::nullopt, need_params ? OptTensor(gp) : std::nullopt};
}

// ---- occupancy-grid march -------------------------------------------------------------------

template <typename T>
MarchArgs<T> march_grid(const at::Tensor& binaries) {
  TORCH_CHECK_VALUE(binaries.dim() == 4 && binaries.is_contiguous() &&
                        (binaries.scalar_type() == at::kBool || binaries.scalar_type() == at::kByte),
                    "occupancy march: binaries must be a contiguous bool [L, res, res, res] tensor");
  MarchArgs<T> a{};
  a.n_levels = int(binaries.size(0));
  for (int ax = 0; ax < 3; ++ax) a.res[ax] = int(binaries.size(ax + 1));
  TORCH_CHECK_VALUE(a.n_levels >= 1 && a.res[0] >= 1 && a.res[1] >= 1 && a.res[2] >= 1,
                    "occupancy march: empty binaries");
  a.binaries = reinterpret_cast<const uint8_t*>(binaries.data_ptr());
  return a;
}

// binaries [L, r0, r1, r2], aabbs float32 [L, 6] -> the skip's mips, uint8 [n] (occgrid.h), on
// binaries' device.
at::Tensor occgrid_mips(const at::Tensor& binaries, const at::Tensor& aabbs, int64_t stream) {
  require_cuda_build(binaries);
  MarchArgs<float> a = march_grid<float>(binaries);
  TORCH_CHECK_VALUE(aabbs.scalar_type() == at::kFloat && aabbs.is_contiguous() && aabbs.device() == binaries.device() &&
                        aabbs.dim() == 2 && aabbs.size(0) == a.n_levels && aabbs.size(1) == 6,
                    "occupancy mips: aabbs must be a contiguous float32 [L, 6] tensor on binaries' device");
  const int64_t n = occgrid_plan_mips(a);
  at::Tensor mips = at::empty({n}, binaries.options().dtype(at::kByte));
  at::Tensor scratch = at::empty({mips_scratch_layout(a.res, a.n_levels).size}, mips.options());
  if (binaries.is_cuda()) {
    occgrid_mips_cuda(a.binaries, aabbs.data_ptr<float>(), a.n_levels, a.res, scratch.data_ptr<uint8_t>(),
                      mips.data_ptr<uint8_t>(), binaries.get_device(), reinterpret_cast<void*>(stream));
  } else {
    const int n_threads = at::get_num_threads();
    pybind11::gil_scoped_release no_gil;
    occgrid_mips_cpu(a.binaries, aabbs.data_ptr<float>(), a.n_levels, a.res, scratch.data_ptr<uint8_t>(),
                     mips.data_ptr<uint8_t>(), n_threads);
  }
  return mips;
}

// -> ray_indices [N] int64 (sorted), t_starts [N], t_ends [N] (the rays' dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> occgrid_march(
    const at::Tensor& rays_o, const at::Tensor& rays_d, const at::Tensor& near, const at::Tensor& far,
    const at::Tensor& binaries, const at::Tensor& mips, const at::Tensor& aabbs, double step, double cone_angle,
    int64_t stream) {
  require_cuda_build(rays_o);
  TORCH_CHECK_VALUE(rays_o.scalar_type() == at::kFloat || rays_o.scalar_type() == at::kDouble,
                    "occupancy march: rays must be float32/64");
  TORCH_CHECK_VALUE(rays_o.dim() == 2 && rays_o.size(1) == 3 && rays_o.is_contiguous(),
                    "occupancy march: rays_o must be contiguous [R, 3]");
  const int64_t n_rays = rays_o.size(0);
  check_float_tensor(rays_d, rays_o, "rays_d", {n_rays, 3});
  check_float_tensor(near, rays_o, "near", {n_rays});
  check_float_tensor(far, rays_o, "far", {n_rays});
  TORCH_CHECK_VALUE(step > 0 && cone_angle >= 0, "occupancy march: expected step > 0 and cone_angle >= 0");
  TORCH_CHECK_VALUE(binaries.device() == rays_o.device() && mips.device() == rays_o.device(),
                    "occupancy march: grid and rays on different devices");
  at::Tensor ray_indices, t_starts, t_ends;
  AT_DISPATCH_FLOATING_TYPES(rays_o.scalar_type(), "occgrid_march", [&] {
    MarchArgs<scalar_t> a = march_grid<scalar_t>(binaries);
    check_float_tensor(aabbs, rays_o, "aabbs", {a.n_levels, 6});
    const int64_t n_mip_cells = occgrid_plan_mips(a);
    TORCH_CHECK_VALUE(mips.scalar_type() == at::kByte && mips.is_contiguous() && mips.numel() == n_mip_cells,
                      "occupancy march: mips must come from occgrid_mips of these binaries");
    a.n_rays = n_rays;
    a.rays_o = rays_o.data_ptr<scalar_t>();
    a.rays_d = rays_d.data_ptr<scalar_t>();
    a.near = near.data_ptr<scalar_t>();
    a.far = far.data_ptr<scalar_t>();
    a.mips = mips.data_ptr<uint8_t>();
    a.aabbs = aabbs.data_ptr<scalar_t>();
    a.step = step;
    a.cone_angle = cone_angle;
    const auto long_opts = rays_o.options().dtype(at::kLong);
    if (rays_o.is_cuda()) {
      void* s = reinterpret_cast<void*>(stream);
      const int device = rays_o.get_device();
      at::Tensor counts = at::empty({n_rays}, long_opts);
      occgrid_count_cuda(dtype_code(rays_o.scalar_type()), erase_type(a), counts.data_ptr<int64_t>(), device, s);
      at::Tensor ends = at::cumsum(counts, 0);
      const int64_t total = n_rays ? ends[n_rays - 1].item<int64_t>() : 0;  // synchronises
      at::Tensor offsets = ends - counts;
      ray_indices = at::empty({total}, long_opts);
      t_starts = at::empty({total}, rays_o.options());
      t_ends = at::empty({total}, rays_o.options());
      if (total)
        occgrid_fill_cuda(dtype_code(rays_o.scalar_type()), erase_type(a), offsets.data_ptr<int64_t>(),
                          ray_indices.data_ptr<int64_t>(), t_starts.data_ptr(), t_ends.data_ptr(), device, s);
      return;
    }
    MarchParts<scalar_t> parts;
    {
      const int n_threads = at::get_num_threads();
      pybind11::gil_scoped_release no_gil;
      parts = occgrid_march_cpu(a, n_threads);
    }
    const int64_t total = march_parts_size(parts);
    ray_indices = at::empty({total}, long_opts);
    t_starts = at::empty({total}, rays_o.options());
    t_ends = at::empty({total}, rays_o.options());
    copy_march_parts(parts, ray_indices.data_ptr<int64_t>(), t_starts.data_ptr<scalar_t>(), t_ends.data_ptr<scalar_t>());
  });
  return {ray_indices, t_starts, t_ends};
}

}  // namespace
}  // namespace fastnefes

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fastnefes;
  m.doc() = "fastnefes native kernels: fused compositing, hash-grid encoding, occupancy-grid march (CPU / CUDA)";
  m.attr("with_cuda") = cuda_kernels_built();
  m.def("composite_forward", &composite_forward, "fused compositing forward");
  m.def("composite_backward", &composite_backward, "fused compositing backward");
  m.def("ray_ranges", &ray_ranges, "sorted ray indices -> [R, 2] (first sample, count)");
  m.def("pack_levels", &pack_levels, "hash-grid level list -> packed uint8 records");
  m.def("hashgrid_forward", &hashgrid_forward, "hash-grid encoding forward");
  m.def("hashgrid_backward", &hashgrid_backward, "hash-grid encoding backward");
  m.def("occgrid_mips", &occgrid_mips, "the march's skip mips of binaries [L, r0, r1, r2] in boxes aabbs [L, 6]");
  m.def("occgrid_march", &occgrid_march, "occupancy-grid march -> (ray_indices, t_starts, t_ends)");
}
