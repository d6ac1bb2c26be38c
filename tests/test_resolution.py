"""The hash grid's finest level sized from the cameras (fastnefes.field.resolution)."""

import numpy as np
import pytest

from fastnefes.field.model import ModelConfig
from fastnefes.field.resolution import per_level_scale_for, pixel_footprint_cells


def _cameras(focal: float, distances: list[float]) -> tuple[np.ndarray, np.ndarray]:
    K = np.stack([np.array([[focal, 0, 50], [0, focal, 40], [0, 0, 1.0]])] * len(distances))
    c2w = np.stack([np.eye(4)] * len(distances))
    c2w[:, 2, 3] = -np.asarray(distances)  # on the z axis, looking at the origin
    return K, c2w


def test_footprint_is_focal_over_distance_in_cube_units():
    K, c2w = _cameras(100.0, [1.0, 2.0, 3.0])
    # a pixel at distance 2 covers 2 / 100 world units = 0.005 of a cube 4 units across (scale 0.25)
    assert pixel_footprint_cells(K, c2w, np.zeros(3), 0.25) == pytest.approx(200.0)
    assert pixel_footprint_cells(K, c2w, np.zeros(3), 0.25, indices=[0]) == pytest.approx(400.0)


def test_per_level_scale_reaches_the_finest_resolution_within_its_bounds():
    assert 16 * per_level_scale_for(1000.0, 16, 8, floor=1.2) ** 7 == pytest.approx(1000.0)
    assert per_level_scale_for(100.0, 16, 8, floor=1.6) == 1.6  # never coarser than configured
    assert per_level_scale_for(1e6, 16, 8, floor=1.6) == 2.0  # at most instant-ngp's factor
    assert per_level_scale_for(10.0, 16, 1, floor=1.6) == 1.6


def test_resolve_grid_raises_the_scale_once_and_records_it():
    cfg = ModelConfig(grid_from_pixels=True)
    cfg.resolve_grid(1000.0)
    scale = cfg.grid["per_level_scale"]
    assert cfg.grid["base_resolution"] * scale ** (cfg.grid["n_levels"] - 1) == pytest.approx(1000.0)
    assert not cfg.grid_from_pixels
    cfg.resolve_grid(10000.0)  # resolved: a saved config trains and loads as it says
    assert cfg.grid["per_level_scale"] == scale
    off = ModelConfig()
    off.resolve_grid(1000.0)
    assert off.grid == ModelConfig().grid


def test_a_partial_grid_keeps_the_models_other_grid_defaults():
    from fastnefes.errors import FastnefesError
    from fastnefes.train.config import TrainConfig, train_config

    cfg = TrainConfig(model={"grid": {"log2_hashmap_size": 19}, "grid_from_pixels": True}).model
    assert cfg.grid == {**ModelConfig().grid, "log2_hashmap_size": 19}
    # as train --config gives it, over the preset's model
    over = train_config(overrides={"model": {"grid": {"n_levels": 12}, "grid_from_pixels": True}}).model
    assert over.grid == {**ModelConfig().grid, "n_levels": 12} and over.grid_from_pixels
    with pytest.raises(FastnefesError, match="model config: space='nowhere'"):
        train_config(overrides={"model": {"space": "nowhere"}})
    cfg.resolve_grid(1000.0)  # needs every key
    assert cfg.grid["base_resolution"] * cfg.grid["per_level_scale"] ** (cfg.grid["n_levels"] - 1) == pytest.approx(1000.0)
    with pytest.raises(FastnefesError, match="unknown keys"):
        ModelConfig(grid={"levels": 4})
    with pytest.raises(FastnefesError, match="grid=4, expected a JSON object"):
        ModelConfig(grid=4)
