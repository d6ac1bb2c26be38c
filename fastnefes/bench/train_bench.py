"""`fastnefes bench train`: time to given validation PSNRs, throughput and memory, per architecture.

Both archs train on the same scene, the same training images and validation views, from the same
seed, through the same Trainer: only ModelConfig.arch (and its ARCH_PRESETS) differ. Validation
is not training time: the clock runs only inside training steps, and a PSNR counts as reached at
the first validation that meets it (validations every `val_interval_s` of training time).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional

import torch

from fastnefes.bench.environment import peak_memory_mb, reset_peak_memory
from fastnefes.data.normalize import compute_normalization
from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError
from fastnefes.train.config import TrainConfig
from fastnefes.train.run import build_model, save_checkpoint, write_config
from fastnefes.train.trainer import Trainer, validate


@dataclass
class TrainBenchConfig:
    archs: tuple[str, ...] = ("hash", "mlp")
    minutes: dict[str, float] = field(default_factory=lambda: {"hash": 5.0, "mlp": 20.0})  # budget per arch
    psnr_targets: tuple[float, ...] = (20.0, 25.0)
    val_views: int = 4
    val_stride: int = 2
    val_interval_s: Optional[float] = None  # default: 1/50 of the arch's budget, at least 2 s and 4x a validation
    stop_when_reached: bool = False  # True: an arch stops once it has reached every target
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields ('model': ModelConfig fields)


def _train_config(arch: str, minutes: float, device: torch.device, cfg: TrainBenchConfig) -> TrainConfig:
    overrides = dict(cfg.overrides)
    model_overrides = overrides.pop("model", {})
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if unknown or not isinstance(model_overrides, dict):
        raise FastnefesError(f"bench train: unknown train config keys {unknown or ['model']}")
    train_cfg = TrainConfig.for_arch(arch, seed=cfg.seed, device=str(device), minutes=minutes, val_every=0,
                                     val_images=0, checkpoint_every=0, log_every=10**9, **overrides)
    for key, value in model_overrides.items():
        if not hasattr(train_cfg.model, key):
            raise FastnefesError(f"bench train: unknown model config key {key!r}")
        setattr(train_cfg.model, key, value)
    return train_cfg


def bench_train_arch(scene: Scene, arch: str, minutes: float, device: torch.device, cfg: TrainBenchConfig,
                     progress: Optional[Callable[[dict], None]] = None, run_dir: Optional[Path] = None) -> dict[str, Any]:
    """Train one arch for `minutes` (or until every target is reached); its figures. With run_dir
    the trained field is saved there as a run (for `fastnefes bench refine`)."""
    train_cfg = _train_config(arch, minutes, device, cfg)
    train_cfg.model.n_images = len(scene.split("train"))
    torch.manual_seed(cfg.seed)
    normalization = compute_normalization(scene)
    model = build_model(train_cfg, normalization).to(device)
    totals = {"rays": 0, "samples": 0}

    def on_step(event: dict) -> None:
        if event["event"] == "step":
            totals["rays"] += event["rays"]
            totals["samples"] += event["samples"]
            if progress is not None:
                progress({**event, "arch": arch})

    trainer = Trainer(scene, train_cfg, model, on_step)
    val_indices = (scene.split("val") or scene.split("test"))[: cfg.val_views]
    if not val_indices:
        raise FastnefesError("bench train: the scene has no val or test views to measure PSNR on")
    interval = cfg.val_interval_s or max(2.0, minutes * 60.0 / 50.0)
    reached: dict[str, Optional[float]] = {f"{t:g}": None for t in cfg.psnr_targets}
    curve: list[dict] = []
    reset_peak_memory(device)
    next_val = interval
    while not trainer.done():
        trainer.run(stop_at_step=trainer.state.step + 1)
        state = trainer.state
        if state.elapsed_s < next_val and not trainer.done():
            continue
        val_start = time.perf_counter()
        psnr = validate(model, scene, val_indices, cfg.val_stride)["psnr"]
        val_s = time.perf_counter() - val_start
        curve.append({"step": state.step, "time_s": round(state.elapsed_s, 3), "psnr": psnr})
        if progress is not None:
            progress({"event": "val", "arch": arch, "psnr": psnr, "step": state.step})
        for key in reached:
            if reached[key] is None and psnr >= float(key):
                reached[key] = state.elapsed_s
        # Validation is not timed but it is waited for: keep it under about a fifth of the run.
        next_val = state.elapsed_s + max(interval, 4.0 * val_s)
        if cfg.stop_when_reached and all(v is not None for v in reached.values()):
            break
    state = trainer.state
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, train_cfg, normalization, {"root": str(scene.root), "format": scene.format,
                                                         "n_train": train_cfg.model.n_images})
        save_checkpoint(run_dir, model, trainer.optimizer, trainer.sampler.generator, state.to_dict(), complete=True)
    secs = max(state.elapsed_s, 1e-9)
    return {"arch": arch, "budget_minutes": minutes, "steps": state.step, "train_time_s": state.elapsed_s,
            "steps_per_s": state.step / secs, "rays_per_s": totals["rays"] / secs,
            "samples_per_s": totals["samples"] / secs, "peak_memory_mb": peak_memory_mb(device),
            "final_psnr": curve[-1]["psnr"] if curve else None,
            "best_psnr": max((c["psnr"] for c in curve), default=None),
            "time_to_psnr_s": reached, "curve": curve}


def time_ratios(hash_row: dict, mlp_row: dict) -> dict[str, dict]:
    """Per target: mlp time / hash time; when only hash got there, a lower bound from mlp's budget."""
    out = {}
    for key, t_hash in hash_row["time_to_psnr_s"].items():
        t_mlp = mlp_row["time_to_psnr_s"].get(key)
        if t_hash is None:
            out[key] = {"ratio": None, "lower_bound": None}
        elif t_mlp is None:
            out[key] = {"ratio": None, "lower_bound": mlp_row["train_time_s"] / t_hash}
        else:
            out[key] = {"ratio": t_mlp / t_hash, "lower_bound": None}
    return out


def bench_train(scene: Scene, device: torch.device, cfg: TrainBenchConfig = TrainBenchConfig(),
                progress: Optional[Callable[[dict], None]] = None, save_runs: Optional[Path] = None) -> dict[str, Any]:
    """Every arch in cfg.archs in turn; {'config', 'archs': {arch: figures}, 'ratios' (both archs)}.
    save_runs: a folder that receives one run directory per arch (save_runs/hash, save_runs/mlp)."""
    rows = {}
    for arch in cfg.archs:
        minutes = cfg.minutes.get(arch)
        if minutes is None or not (minutes > 0 and math.isfinite(minutes)):
            raise FastnefesError(f"bench train: no positive time budget for arch {arch!r}")
        rows[arch] = bench_train_arch(scene, arch, minutes, device, cfg, progress,
                                      Path(save_runs) / arch if save_runs is not None else None)
    out: dict[str, Any] = {"config": asdict(cfg), "archs": rows}
    if "hash" in rows and "mlp" in rows:
        out["ratios"] = time_ratios(rows["hash"], rows["mlp"])
    return out
