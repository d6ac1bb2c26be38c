"""The run directory: what a training run leaves behind, and loading it back without unpickling.

    RUN/config.json        format version, TrainConfig (with ModelConfig), scene normalisation
    RUN/model.safetensors  every tensor: model weights and buffers (occupancy grid, normalisation),
                           optimiser state and RNG states for --resume; the training progress
                           (step, elapsed time, logged metrics) in its JSON metadata, so one
                           atomic rename makes a checkpoint
    RUN/metrics.json       per-stage losses, validation PSNR, wall time (derived from the above)
    RUN/extractor.pt       distill mode only: the user's TorchScript extractor, copied

Also here: `train` (train or resume into a run directory), `load_run`, and `render_split`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastnefes
from fastnefes.data.normalize import SceneNormalization, compute_normalization
from fastnefes.data.options import DataOptions
from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError
from fastnefes.field.encoder import file_sha256, load_torchscript, probe_extractor
from fastnefes.field.model import FeatureFieldModel
from fastnefes.io import atomic_path, read_json, write_image, write_json
from fastnefes.train.config import STAGES, TrainConfig
from fastnefes.train.trainer import Trainer, TrainState, resolve_device

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
EXTRACTOR_FILE = "extractor.pt"
_META_KEY = "fastnefes"


# ---- configuration -------------------------------------------------------------------------
def configure_distill(config: TrainConfig, extractor_path: str | Path, feature_dim: Optional[int] = None) -> torch.nn.Module:
    """Switch config to distill mode for a TorchScript extractor; returns the loaded module.

    The extractor's channel count becomes the feature dimension (a different explicit
    feature_dim is an error) and its measured output stride the feature stride.
    """
    module = load_torchscript(extractor_path)
    channels, stride = probe_extractor(module, extractor_path)
    if feature_dim is not None and feature_dim != channels:
        raise FastnefesError(f"{extractor_path}: extractor outputs {channels}-d features but --feature-dim is {feature_dim} (omit it or pass {channels})")
    m = config.model
    m.encoder, m.feature_dim, m.encoder_stride = "distill", channels, stride
    m.extractor_path, m.extractor_sha256 = EXTRACTOR_FILE, file_sha256(extractor_path)
    return module


def write_config(run_dir: Path, config: TrainConfig, normalization: SceneNormalization, scene_info: dict[str, Any],
                 data_options: Optional[dict[str, Any]] = None) -> None:
    write_json(run_dir / CONFIG_FILE, {
        "format_version": fastnefes.RUN_FORMAT_VERSION,
        "fastnefes_version": fastnefes.__version__,
        "train": config.to_dict(),
        "normalization": normalization.to_dict(),
        "scene": scene_info,
        "data": data_options or {},
    })


def read_data_options(run_dir: str | Path, data_root: str | Path) -> Optional[DataOptions]:
    """The data options a run was trained with (None for a run without a record); relative
    pose-list paths resolve against data_root, the data folder given now."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None  # load_run reports the missing run
    config = read_json(path)
    record = config.get("data") if isinstance(config, dict) else None
    if not record:
        return None
    return DataOptions.from_record(record, data_root, where=str(path))


def read_config(run_dir: Path) -> tuple[TrainConfig, SceneNormalization, dict[str, Any]]:
    """(TrainConfig, normalisation, scene info) of a run; FastnefesError for a missing / foreign one."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise FastnefesError(f"{run_dir}: run directory not found")
    data = read_json(path)
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != fastnefes.RUN_FORMAT_VERSION:
        raise FastnefesError(f"{path}: run format version {version!r}, this fastnefes {fastnefes.__version__} reads "
                             f"version {fastnefes.RUN_FORMAT_VERSION} (retrain with this version)")
    try:
        return (TrainConfig.from_dict(data["train"]), SceneNormalization.from_dict(data["normalization"]),
                dict(data.get("scene", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise FastnefesError(f"{path}: malformed run config ({type(exc).__name__}: {exc})") from None


def build_model(config: TrainConfig, normalization: SceneNormalization, extractor: Optional[torch.nn.Module] = None,
                run_dir: Optional[Path] = None) -> FeatureFieldModel:
    """A fresh model for the config (distill: the given extractor, else the run's extractor.pt)."""
    if config.model.encoder == "distill" and extractor is None:
        if run_dir is None:
            raise FastnefesError("distill mode needs the extractor (--extractor PATH.pt)")
        path = Path(run_dir) / EXTRACTOR_FILE
        extractor = load_torchscript(path)
        if config.model.extractor_sha256 and file_sha256(path) != config.model.extractor_sha256:
            raise FastnefesError(f"{path}: extractor differs from the one this run was trained with (sha256 mismatch)")
    return FeatureFieldModel(config.model, normalization, extractor)


def copy_extractor(run_dir: Path, source: str | Path) -> None:
    with atomic_path(Path(run_dir) / EXTRACTOR_FILE) as tmp:
        shutil.copyfile(source, tmp)


# ---- checkpoints ---------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, model: FeatureFieldModel, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, progress: dict[str, Any], complete: bool = False) -> None:
    """Atomically write model.safetensors: weights, optimiser state, RNG states, progress metadata."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.sampler"] = generator.get_state()
    if torch.cuda.is_available() and model.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(model.device)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])} for g in opt["param_groups"]]
    meta = {"format_version": fastnefes.RUN_FORMAT_VERSION, "complete": complete, "progress": progress,
            "optimizer_groups": groups}
    tensors = {k: v.cpu() for k, v in tensors.items()}
    with atomic_path(Path(run_dir) / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})


def read_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of RUN/model.safetensors; FastnefesError if missing or corrupt."""
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise FastnefesError(f"{path}: file not found (no trained weights in this run directory)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated / garbled files
        raise FastnefesError(f"{path}: corrupt or unreadable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if meta.get("format_version") != fastnefes.RUN_FORMAT_VERSION:
        raise FastnefesError(f"{path}: run format version {meta.get('format_version')!r}, expected {fastnefes.RUN_FORMAT_VERSION}")
    return tensors, meta


def load_model_tensors(model: FeatureFieldModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise FastnefesError(f"{path}: weights do not match the run's config ({first})") from None


def restore_training(run_dir: Path, model: FeatureFieldModel, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator) -> tuple[dict[str, Any], bool]:
    """Load a checkpoint into live training objects -> (progress dict, complete)."""
    tensors, meta = read_checkpoint(run_dir)
    load_model_tensors(model, tensors, Path(run_dir) / WEIGHTS_FILE)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value if name == "step" else value.to(model.device)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.sampler"])
    if "rng.cuda" in tensors and model.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], model.device)
    return meta["progress"], bool(meta.get("complete"))


def load_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[FeatureFieldModel, TrainConfig]:
    """The trained model of a run directory (eval mode, on device) and its config. Never unpickles."""
    run_dir = Path(path)
    config, normalization, _ = read_config(run_dir)
    tensors, _ = read_checkpoint(run_dir)
    model = build_model(config, normalization, run_dir=run_dir)
    load_model_tensors(model, tensors, run_dir / WEIGHTS_FILE)
    return model.to(device).eval(), config


# ---- training into a run directory ------------------------------------------------------------
def metrics_summary(state: TrainState, config: TrainConfig) -> dict[str, Any]:
    """metrics.json: per stage its steps and mean losses over its last fifth of logged steps,
    validation results, training wall time."""
    stages = []
    for k, name in enumerate(STAGES):
        tail = [h for h in state.history if h["stage"] == k]
        tail = tail[-max(1, len(tail) // 5):]
        means = {key: sum(h[key] for h in tail if key in h) / sum(key in h for h in tail)
                 for key in ("loss", "rgb", "feature", "fusion", "match", "psnr") if any(key in h for h in tail)}
        stages.append({"name": name, "steps": state.stage_steps[k], **means})
    return {"format_version": fastnefes.RUN_FORMAT_VERSION, "steps": state.step, "wall_time_s": state.elapsed_s,
            "stages": stages, "val": state.val, "history": state.history,
            "budget": {"steps": config.steps, "minutes": config.minutes}, "keypoint_depths": state.keypoint_depths}


def train(scene: Scene, config: TrainConfig, run_dir: Optional[str | Path] = None, *, resume: bool = False,
          extractor: Optional[torch.nn.Module] = None, extractor_path: Optional[str | Path] = None,
          progress: Optional[Callable[[dict], None]] = None, stop_at_step: Optional[int] = None,
          data_options: Optional[DataOptions] = None,
          budget_start: Optional[float] = None) -> tuple[FeatureFieldModel, dict[str, Any]]:
    """Train (or resume) a feature field; returns (model in eval mode, metrics).

    run_dir: where config.json / model.safetensors / metrics.json go (None: nothing is written).
    resume: continue from run_dir's checkpoint with its saved config (`config` is ignored).
    extractor / extractor_path: distill mode (see configure_distill); the file is copied in.
    stop_at_step: stop after this many steps, as an interrupted run would.
    data_options: how `scene` was loaded, recorded so later commands on the run load it alike.
    budget_start: time.perf_counter() when a time budget (config.minutes) began, so loading and
        setup count against it (default: the budget starts with the first step).
    progress: called with {'event': 'step' | 'val' | 'checkpoint' | 'done', ...}.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume:
        if run_dir is None:
            raise FastnefesError("--resume needs the run directory (--out RUN)")
        config, normalization, _ = read_config(run_dir)
    else:
        if run_dir is not None and (run_dir / WEIGHTS_FILE).exists():
            raise FastnefesError(f"{run_dir}: already holds a trained run (use --resume to continue it, or another --out)")
        normalization = compute_normalization(scene)
        config.model.resolve_space(normalization.space)  # "auto" -> what the data calls for
        if config.model.grid_from_pixels:
            from fastnefes.field.resolution import pixel_footprint_cells

            train_idx = scene.split("train") or list(range(len(scene)))
            config.model.resolve_grid(pixel_footprint_cells(scene.K, scene.c2w, normalization.center,
                                                            normalization.scale, train_idx))
    device = resolve_device(config.device)
    config.model.n_images = len(scene.split("train"))
    torch.manual_seed(config.seed)
    model = build_model(config, normalization, extractor, run_dir if resume else None).to(device)
    trainer = Trainer(scene, config, model, progress)
    if resume:
        saved, complete = restore_training(run_dir, model, trainer.optimizer, trainer.sampler.generator)
        trainer.state = TrainState(**saved)
        model.occupancy.culling.load_state_dict(trainer.state.culling)
        if complete:
            return model.eval(), metrics_summary(trainer.state, config)
    elif run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if extractor_path is not None:
            copy_extractor(run_dir, extractor_path)
        write_config(run_dir, config, normalization, {"root": str(scene.root), "format": scene.format,
                                                      "n_train": config.model.n_images},
                     (data_options or DataOptions()).to_record(scene.root, scene.format))

    def checkpoint() -> None:
        trainer.state.culling = model.occupancy.culling.state_dict()
        save_checkpoint(run_dir, model, trainer.optimizer, trainer.sampler.generator, trainer.state.to_dict(),
                        complete=trainer.done())
        write_json(run_dir / METRICS_FILE, metrics_summary(trainer.state, config))
        if progress is not None:
            progress({"event": "checkpoint", "step": trainer.state.step})

    if budget_start is not None and not resume:
        trainer.state.elapsed_s += time.perf_counter() - budget_start
    trainer.run(stop_at_step, checkpoint if run_dir is not None else None)
    if run_dir is not None:
        trainer.check_weights()
        checkpoint()
    if progress is not None:
        progress({"event": "done", "step": trainer.state.step})
    return model.eval(), metrics_summary(trainer.state, config)


# ---- rendering a split of a run ---------------------------------------------------------------
def render_split(run: str | Path, scene: Scene, split: str, out_dir: str | Path, device: str = "auto",
                 limit: Optional[int] = None, sheet_rows: int = 8,
                 progress: Optional[Callable[[int, int, float], None]] = None) -> dict[str, Any]:
    """Render a split through a run: per image <name>_rgb.png, _depth.png, _features.png (PCA
    colours shared by all images), contact_sheet.png (GT | render | depth | features rows),
    and render.json with per-image and mean PSNR (static colour; and with ACT) and SSIM."""
    from fastnefes.render import FeaturePCA, colorize_depth, contact_sheet
    from fastnefes.train.losses import ssim
    from fastnefes.train.trainer import evaluate_views

    model, _ = load_run(run, resolve_device(device))
    indices = scene.split(split)[:limit] if limit else scene.split(split)
    if not indices:
        raise FastnefesError(f"{scene.root}: split {split!r} has no images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    views = []
    for view in evaluate_views(model, scene, indices):
        views.append(view)
        if progress:
            progress(len(views), len(indices), view["psnr"])  # done, total, the last view's PSNR
    pca = FeaturePCA(torch.cat([v["features"].reshape(-1, v["features"].shape[-1]) for v in views[:8]]))
    per_image, rows = [], []
    for view in views:
        to8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
        rgb, depth, feats = to8(view["rgb"]), colorize_depth(view["depth"]), pca(view["features"])
        stem = _flat_name(view["name"])
        for suffix, img in (("rgb", rgb), ("depth", depth), ("features", feats)):
            write_image(out_dir / f"{stem}_{suffix}.png", img.numpy())
        score = float(ssim(view["rgb"].permute(2, 0, 1)[None], view["gt"].permute(2, 0, 1)[None])[0])
        per_image.append({"name": view["name"], "psnr": view["psnr"], "psnr_act": view.get("psnr_act"), "ssim": score})
        if len(rows) < sheet_rows:
            rows.append([to8(view["gt"]), rgb, depth, feats])
    write_image(out_dir / "contact_sheet.png", contact_sheet(rows).numpy())
    n = len(per_image)
    summary = {"images": n, "psnr": sum(p["psnr"] for p in per_image) / n,
               "psnr_act": (sum(p["psnr_act"] for p in per_image) / n) if per_image[0]["psnr_act"] is not None else None,
               "ssim": sum(p["ssim"] for p in per_image) / n}
    result = {"run": str(run), "split": split, "data_options": scene.load_options, "summary": summary,
              "images": per_image}
    write_json(out_dir / "render.json", result)
    return result


def _flat_name(name: str) -> str:
    """Image name -> a flat file stem ('seq-1/000001.png' -> 'seq-1__000001')."""
    stem = name.rsplit(".", 1)[0].replace("/", "__")
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)
