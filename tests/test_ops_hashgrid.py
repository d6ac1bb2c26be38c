"""Hash-grid encoding vs an independent per-point implementation of tiny-cuda-nn's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastnefes.errors import FastnefesError
from fastnefes.ops import HashGridConfig, HashGridEncoding, hash_grid_encode
from fastnefes.ops import backends
from fastnefes.ops.hashgrid import backend_for
from fastnefes.ops.hashgrid._torch_impl import hash_grid_encode_torch

MASK = 0xFFFFFFFF

# 4 levels: res 4 (dense, 64), 8 (dense, 512), 16 and 32 (4096 / 32768 > 1024: hashed).
SMALL = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)
# Non-integer scale, 4 features; level 0 dense with 216 entries (not a divisor of 2^32, so uint32
# wrap-around of out-of-range cells is visible), levels 1-2 hashed.
ODD = HashGridConfig(n_levels=3, n_features_per_level=4, log2_hashmap_size=9, base_resolution=6, per_level_scale=1.5)
# Tiny enough for numerical gradcheck w.r.t. every parameter: res 2 dense (8), res 4 hashed (64 > 32).
TINY = HashGridConfig(n_levels=2, n_features_per_level=2, log2_hashmap_size=5, base_resolution=2, per_level_scale=2.0)


def reference_levels(cfg: HashGridConfig) -> list[tuple[float, int, int, int, bool]]:
    """tcnn's GridEncodingTemplated constructor, written out per level."""
    out, offset = [], 0
    for lvl in range(cfg.n_levels):
        scale = float(np.float32(np.exp2(np.float32(lvl) * np.log2(np.float32(cfg.per_level_scale)))
                                 * np.float32(cfg.base_resolution) - np.float32(1)))
        res = math.ceil(scale) + 1
        size = min(((res**3 + 7) // 8) * 8, 2**cfg.log2_hashmap_size)
        out.append((scale, res, size, offset, size >= res**3))
        offset += size
    return out


def reference_encode(x: torch.Tensor, params: torch.Tensor, cfg: HashGridConfig) -> torch.Tensor:
    """Per point, per level, per corner loop; float64 autograd through the trilinear weights."""
    n_feat = cfg.n_features_per_level
    rows = []
    for i in range(x.shape[0]):
        row = []
        for scale, res, size, offset, dense in reference_levels(cfg):
            pos, cell = [], []
            for d in range(3):
                p32 = float(np.float32(scale * float(np.float32(x[i, d].item())) + 0.5))  # fmaf
                fl = math.floor(p32)
                cell.append(fl)
                pos.append(x[i, d].double() * scale + 0.5 - fl)
            acc = torch.zeros(n_feat, dtype=torch.float64)
            for c in range(8):
                corner = [(cell[d] + ((c >> d) & 1)) & MASK for d in range(3)]
                w = torch.ones((), dtype=torch.float64)
                for d in range(3):
                    w = w * (pos[d] if (c >> d) & 1 else 1 - pos[d])
                if dense:
                    index = ((corner[0] + corner[1] * res + corner[2] * res * res) & MASK) % size
                else:
                    index = ((corner[0] * 1) ^ (corner[1] * 2654435761) ^ (corner[2] * 805459861)) & MASK
                    index %= size
                base = (offset + index) * n_feat
                acc = acc + w * params[base:base + n_feat].double()
            row.append(acc)
        rows.append(torch.cat(row))
    return torch.stack(rows)


def _points(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g)
    # edges: exact 0 and 1, and slightly outside [0, 1] (negative cells wrap as uint32 in tcnn)
    extra = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.5], [-0.07, 0.3, 1.04], [1.2, -0.3, 0.5], [-0.3, -0.25, -0.4]])
    return torch.cat([x, extra])


def _params(cfg: HashGridConfig, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(cfg.n_params, generator=g) * 2 - 1


def test_default_layout_facts():
    cfg = HashGridConfig()
    # levels 0-2 dense (16^3, 32^3, 64^3 entries), 13 hashed levels of 2^19 entries, 2 features.
    assert cfg.n_params == (16**3 + 32**3 + 64**3 + 13 * 2**19) * 2 == 14229504
    assert cfg.n_output_dims == 32
    lv = cfg.levels()
    assert [l.resolution for l in lv[:4]] == [16, 32, 64, 128]
    assert [l.dense for l in lv[:4]] == [True, True, True, False]
    assert lv[3].offset == 16**3 + 32**3 + 64**3
    assert cfg.to_tcnn() == {"otype": "HashGrid", "n_levels": 16, "n_features_per_level": 2,
                             "log2_hashmap_size": 19, "base_resolution": 16, "per_level_scale": 2.0}
    assert HashGridConfig.from_dict(cfg.to_tcnn()) == cfg


@pytest.mark.parametrize("cfg", [SMALL, ODD, HashGridConfig(per_level_scale=1.38)])
def test_levels_match_reference(cfg):
    got = [tuple(l) for l in cfg.levels()]
    ref = reference_levels(cfg)
    assert [g[1:] for g in got] == [r[1:] for r in ref]
    assert np.allclose([g[0] for g in got], [r[0] for r in ref], rtol=0, atol=0)
    assert cfg.n_params == (ref[-1][3] + ref[-1][2]) * cfg.n_features_per_level


def test_dense_iff_level_fits_table():
    # scale = base - 1, res = base: 80^3 = 512000 fits 2^19 -> dense; 81^3 = 531441 does not -> hashed.
    fits = HashGridConfig(n_levels=1, base_resolution=80).levels()[0]
    over = HashGridConfig(n_levels=1, base_resolution=81).levels()[0]
    assert (fits.resolution, fits.dense, fits.size) == (80, True, 512000)
    assert (over.resolution, over.dense, over.size) == (81, False, 2**19)


def test_output_column_is_level_times_f_plus_f():
    cfg = ODD
    x = _points(6, 1)
    params = torch.zeros(cfg.n_params)
    # one-hot table per (level, feature): column level*F+f must be the only non-zero one
    for lvl, level in enumerate(cfg.levels()):
        for f in range(cfg.n_features_per_level):
            p = params.clone().view(-1, cfg.n_features_per_level)
            p[level.offset:level.offset + level.size, f] = 1.0
            out = hash_grid_encode_torch(x, p.view(-1), cfg)
            col = lvl * cfg.n_features_per_level + f
            assert torch.allclose(out[:, col], torch.ones(len(x)), atol=1e-6)  # weights sum to 1
            others = torch.cat([out[:, :col], out[:, col + 1:]], 1)
            assert others.abs().max() == 0


@pytest.mark.parametrize("cfg", [SMALL, ODD], ids=["small", "odd"])
def test_values_and_gradients_match_reference(cfg):
    x = _points(24, 2)
    params = _params(cfg, 3)
    ref_x = x.double().requires_grad_(True)
    ref_p = params.double().requires_grad_(True)
    ref = reference_encode(ref_x, ref_p, cfg)

    xx = x.clone().requires_grad_(True)
    pp = params.clone().requires_grad_(True)
    out = hash_grid_encode_torch(xx, pp, cfg)
    assert out.dtype == torch.float32 and out.shape == (len(x), cfg.n_output_dims)
    assert torch.allclose(out.double(), ref, atol=2e-5), (out.double() - ref).abs().max()

    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    assert torch.allclose(pp.grad.double(), ref_p.grad, atol=1e-5)
    assert pp.grad.abs().sum() > 0
    # d/dx scales with the finest level's resolution: relative tolerance
    assert torch.allclose(xx.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-3 * ref_x.grad.abs().max().item())


def test_float64_matches_reference_exactly():
    x = _points(10, 5).double()
    params = _params(SMALL, 6).double()
    assert torch.allclose(hash_grid_encode_torch(x, params, SMALL), reference_encode(x, params, SMALL), atol=1e-12)


def _away_from_cells(cfg: HashGridConfig, n: int, seed: int, margin: float = 1e-3) -> torch.Tensor:
    x = torch.rand(4 * n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ok = torch.ones(len(x), dtype=torch.bool)
    for level in cfg.levels():
        frac = torch.frac(x * level.scale + 0.5)
        ok &= ((frac > margin) & (frac < 1 - margin)).all(1)
    return x[ok][:n]


def test_gradcheck_x_and_params():
    x = _away_from_cells(TINY, 5, 7).requires_grad_(True)
    params = _params(TINY, 8).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: hash_grid_encode_torch(a, b, TINY), (x, params))
    x2 = _away_from_cells(SMALL, 4, 9).requires_grad_(True)
    p2 = _params(SMALL, 10).double()
    assert torch.autograd.gradcheck(lambda a: hash_grid_encode_torch(a, p2, SMALL), (x2,))


def test_double_backward():
    x = _away_from_cells(TINY, 3, 11).requires_grad_(True)
    params = _params(TINY, 12).double().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda a, b: hash_grid_encode_torch(a, b, TINY), (x, params))


def test_module_init_forward_and_backend(monkeypatch):
    enc = HashGridEncoding(SMALL.to_tcnn())
    assert enc.cfg == SMALL and enc.n_output_dims == 8
    assert enc.params.shape == (SMALL.n_params,) and enc.params.abs().max() <= 1e-4
    assert enc.params.std() > 1e-5  # actually random, not zeros
    out = enc(torch.rand(7, 3))
    assert out.shape == (7, 8) and out.dtype == torch.float32
    assert enc(torch.rand(0, 3)).shape == (0, 8)
    monkeypatch.setenv("FASTNEFES_HASHGRID_BACKEND", "torch")
    assert enc.backend == "torch"


def test_config_errors():
    with pytest.raises(FastnefesError, match="n_features_per_level"):
        HashGridConfig(n_features_per_level=3)
    with pytest.raises(FastnefesError, match="unknown keys"):
        HashGridConfig.from_dict({"n_levels": 4, "levels": 3})
    with pytest.raises(ValueError, match=r"params must be"):
        hash_grid_encode_torch(torch.rand(2, 3), torch.zeros(5), SMALL)


def test_tcnn_probe_refuses_cpu():
    from fastnefes.ops.hashgrid import _tcnn

    assert _tcnn._probe("cpu") is not None
    assert backends.resolve("hashgrid", "cpu") != "tcnn"


def test_dispatched_backend_matches_torch():
    """Whatever backend hash_grid_encode picks on CPU (native when built) equals the torch twin."""
    x = _points(300, 13).requires_grad_(True)
    params = _params(SMALL, 14).requires_grad_(True)
    out = hash_grid_encode(x, params, SMALL)
    gx, gp = torch.autograd.grad(out.square().sum(), (x, params))
    x2, p2 = x.detach().clone().requires_grad_(True), params.detach().clone().requires_grad_(True)
    ref = hash_grid_encode_torch(x2, p2, SMALL)
    rx, rp = torch.autograd.grad(ref.square().sum(), (x2, p2))
    assert torch.allclose(out, ref, atol=1e-5), backend_for("cpu")
    assert torch.allclose(gp, rp, atol=1e-4) and torch.allclose(gx, rx, rtol=1e-4, atol=1e-3)


def _tcnn_available() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    from fastnefes.ops.hashgrid import _tcnn

    return _tcnn._probe("cuda")


@pytest.mark.skipif(_tcnn_available() is not None, reason=f"tcnn backend unavailable: {_tcnn_available()}")
def test_tcnn_matches_torch_to_fp16():
    from fastnefes.ops.hashgrid._tcnn import hash_grid_encode_tcnn

    cfg = HashGridConfig(n_levels=8, log2_hashmap_size=15)
    x = torch.rand(5000, 3, device="cuda").requires_grad_(True)
    params = (torch.rand(cfg.n_params, device="cuda") * 2 - 1).requires_grad_(True)
    out = hash_grid_encode_tcnn(x, params, cfg)
    ref = hash_grid_encode_torch(x, params.half().float(), cfg)
    assert torch.allclose(out, ref, atol=5e-3)
    g = torch.autograd.grad(out.sum(), params)[0]
    r = torch.autograd.grad(ref.sum(), params)[0]
    assert torch.allclose(g, r, atol=5e-2)
