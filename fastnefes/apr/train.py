"""Training the built-in APR on a scene's training images (optionally plus novel views).

Augmentations are the ones a pose regressor tolerates: photometric (exposure, white balance,
gamma, contrast, saturation, blur, noise) and an exact geometric one, a rotation of the camera
about its centre by up to `aug_rot_deg` (the image is warped by the homography K R K^-1 and the
label rotated by R, so image and pose stay consistent; only the borders the original camera did
not see are filled in). No flips or free crops: they change the pose.

Novel views (LENS / DFNet style) come from a callable `novel_views(n, rng) -> (images uint8
[n, H, W, 3], c2w [n, 4, 4])` or `(images, c2w, K [n, 3, 3])`; without K the views are taken
to have the first training image's intrinsics scaled to their size. The callable should render
at poses near and between the training poses (`sample_novel_poses` draws such poses): far from
them a field renders garbage and the regressor learns it. Any image size works (views are resized
to the APR input); rendering at about the APR input size (e.g. 80x60) is enough.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastnefes.apr.io import scene_fingerprint
from fastnefes.apr.model import APR, APRConfig, input_hw_for, prepare_images
from fastnefes.data.scene import Scene
from fastnefes.errors import FastnefesError
from fastnefes.geometry import pose_errors, so3_exp, so3_log

NovelViews = Callable[[int, np.random.Generator], tuple]


# ----------------------------------------------------------------------------- augmentation
def random_rotations(n: int, max_deg: float, gen: torch.Generator) -> torch.Tensor:
    """n rotations [n, 3, 3] about uniform axes with angles uniform in [0, max_deg]."""
    axes = F.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    angles = torch.rand(n, generator=gen) * math.radians(max_deg)
    return so3_exp(axes * angles[:, None])


def rotate_cameras(images: torch.Tensor, K: torch.Tensor, R_delta: torch.Tensor, border: str = "reflection") -> torch.Tensor:
    """Views of cameras rotated by R_delta about their centres (c2w_new = c2w @ [R_delta, 0]).

    images [B, 3, H, W], K [B, 3, 3] at that size, R_delta [B, 3, 3] -> [B, 3, H, W]. Output pixel
    x' samples the input at K R_delta K^-1 x'; what the input does not see is filled by `border`
    ("reflection", "zeros" or "border", as grid_sample's padding modes).
    """
    B, _, H, W = images.shape
    ys = torch.arange(H, dtype=images.dtype) + 0.5
    xs = torch.arange(W, dtype=images.dtype) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pix = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(1, -1, 3)  # [1, HW, 3]
    H_mat = K @ R_delta @ torch.linalg.inv(K)  # [B, 3, 3]
    src = pix @ H_mat.transpose(1, 2)
    src = src[..., :2] / src[..., 2:].clamp_min(1e-6)
    grid = torch.stack([src[..., 0] / W * 2 - 1, src[..., 1] / H * 2 - 1], -1).reshape(B, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=border, align_corners=False)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma [B] (0 = unchanged). [B, C, H, W] -> same."""
    B, C, H, W = images.shape
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    k = (k / k.sum(-1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, 2r+1]
    out = F.pad(images.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k[:, None, :, None], groups=B * C)
    out = F.conv2d(out, k[:, None, None, :], groups=B * C)
    return out.reshape(B, C, H, W)


def photometric(images: torch.Tensor, cfg: APRConfig, gen: torch.Generator) -> torch.Tensor:
    """Exposure, white balance, gamma, contrast, saturation, blur and noise. [B, 3, H, W] in [0, 1]."""
    B = images.shape[0]

    def u(*shape: int) -> torch.Tensor:  # uniform in [-1, 1]
        return torch.rand(*shape, generator=gen) * 2 - 1

    gain = torch.exp(cfg.aug_exposure * u(B, 1) + cfg.aug_white_balance * u(B, 3))
    x = (images * gain[:, :, None, None]).clamp(0, 1)
    x = x.clamp_min(1e-6) ** torch.exp(cfg.aug_gamma * u(B))[:, None, None, None]
    grey = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
    x = grey + (x - grey) * (1 + cfg.aug_saturation * u(B))[:, None, None, None]
    mean = grey.mean((2, 3), keepdim=True)
    x = mean + (x - mean) * (1 + cfg.aug_contrast * u(B))[:, None, None, None]
    blur = torch.rand(B, generator=gen) < cfg.aug_blur_prob
    if bool(blur.any()):
        sigma = torch.where(blur, 0.3 + 0.9 * torch.rand(B, generator=gen), torch.zeros(B))
        x = gaussian_blur(x, sigma)
    noise = cfg.aug_noise * torch.rand(B, 1, 1, 1, generator=gen)
    return (x + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def augment(images: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor, cfg: APRConfig, gen: torch.Generator):
    """Augment a batch: images [B, 3, H, W] in [0, 1], K [B, 3, 3], c2w [B, 4, 4] -> (images, c2w)."""
    if cfg.aug_rot_deg > 0:
        R_delta = random_rotations(images.shape[0], cfg.aug_rot_deg, gen)
        images = rotate_cameras(images, K, R_delta, cfg.aug_border)
        c2w = c2w.clone()
        c2w[:, :3, :3] = c2w[:, :3, :3] @ R_delta
    return photometric(images, cfg, gen), c2w


# ----------------------------------------------------------------------------- novel poses
def sample_novel_poses(
    c2w_train: np.ndarray, n: int, rng: np.random.Generator, neighbours: int = 16,
    jitter_trans: float = 0.25, jitter_rot_deg: float = 3.0,
) -> np.ndarray:
    """n poses [n, 4, 4] near and between training poses [N, 4, 4].

    Each is an interpolation (centre lerp, rotation slerp, uniform weight) between a random
    training pose and one of its `neighbours` nearest, plus Gaussian jitter: `jitter_trans`
    times the median nearest-neighbour distance, `jitter_rot_deg` degrees.
    """
    c2w_train = np.asarray(c2w_train, dtype=np.float64)
    centres = c2w_train[:, :3, 3]
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    k = max(1, min(neighbours, len(centres) - 1))
    nearest = np.argsort(dist, axis=1)[:, :k]
    step = float(np.median(dist.min(1))) if len(centres) > 1 else 0.0
    i = rng.integers(0, len(centres), size=n)
    j = nearest[i, rng.integers(0, k, size=n)] if len(centres) > 1 else i
    lam = rng.uniform(0, 1, size=n)
    Ri, Rj = c2w_train[i, :3, :3], c2w_train[j, :3, :3]
    R = Ri @ so3_exp(so3_log(np.swapaxes(Ri, 1, 2) @ Rj) * lam[:, None])
    R = R @ so3_exp(rng.normal(size=(n, 3)) * math.radians(jitter_rot_deg) / math.sqrt(3))
    out = np.tile(np.eye(4), (n, 1, 1))
    out[:, :3, :3] = R
    out[:, :3, 3] = (1 - lam[:, None]) * centres[i] + lam[:, None] * centres[j]
    out[:, :3, 3] += rng.normal(size=(n, 3)) * jitter_trans * step / math.sqrt(3)
    return out


# ----------------------------------------------------------------------------- data
def _scaled_K(K: np.ndarray, from_hw, to_hw) -> np.ndarray:
    """Intrinsics [..., 3, 3] for an image resized from (H, W) to (h, w) (pixel-centre convention)."""
    S = np.diag([to_hw[1] / from_hw[1], to_hw[0] / from_hw[0], 1.0])
    return S @ np.asarray(K, dtype=np.float64)


def _view_set(images: np.ndarray | list, K: np.ndarray, c2w: np.ndarray, hw: tuple[int, int]):
    """(uint8 [N, 3, h, w], K float32 [N, 3, 3] at hw, c2w float32 [N, 4, 4])."""
    src_hw = [im.shape[:2] for im in images]
    x = (prepare_images(images, hw) * 255).round().to(torch.uint8)
    Ks = np.stack([_scaled_K(k, s, hw) for k, s in zip(K, src_hw)])
    return x, torch.as_tensor(Ks, dtype=torch.float32), torch.as_tensor(np.asarray(c2w), dtype=torch.float32)


def _novel_pool(novel_views: NovelViews, n: int, rng: np.random.Generator, K0: np.ndarray, hw0, hw):
    out = novel_views(n, rng)
    images, c2w = np.asarray(out[0]), np.asarray(out[1], dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or c2w.shape != (len(images), 4, 4):
        raise FastnefesError(
            f"novel views: expected uint8 [n, H, W, 3] images and [n, 4, 4] poses, got {images.dtype} "
            f"{list(images.shape)} and {list(c2w.shape)}"
        )
    K = np.asarray(out[2], dtype=np.float64) if len(out) > 2 else np.stack([_scaled_K(K0, hw0, images.shape[1:3])] * len(images))
    return _view_set(list(images), K, c2w, hw)


# ----------------------------------------------------------------------------- evaluation
def predict_split(apr: APR, scene: Scene, split: str) -> tuple[list[int], np.ndarray]:
    """(indices, predicted camera-to-world [n, 4, 4]) for a split of the scene."""
    idx = scene.split(split)
    if not idx:
        return idx, np.zeros((0, 4, 4))
    return idx, apr.predict(np.stack([scene.image(i) for i in idx]))


def error_summary(c2w_est: np.ndarray, c2w_gt: np.ndarray) -> dict:
    """Median / mean / 90th-percentile translation and rotation errors of [n, 4, 4] poses."""
    t, r = pose_errors(c2w_est, c2w_gt)
    q = lambda a, f: float(f(a)) if len(a) else float("nan")  # noqa: E731
    return {
        "n": int(len(t)), "median_trans": q(t, np.median), "median_rot_deg": q(r, np.median),
        "mean_trans": q(t, np.mean), "mean_rot_deg": q(r, np.mean),
        "p90_trans": q(t, lambda a: np.percentile(a, 90)), "p90_rot_deg": q(r, lambda a: np.percentile(a, 90)),
    }


# ----------------------------------------------------------------------------- training
def _lr_factor(progress: float) -> float:
    """Linear warm-up over the first 3%, then cosine decay to 1% of the base rate."""
    if progress < 0.03:
        return max(progress / 0.03, 0.05)
    p = min((progress - 0.03) / 0.97, 1.0)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p))


def pose_loss(pred: torch.Tensor, gt: torch.Tensor, t_scale: torch.Tensor, log_vars: Optional[torch.Tensor], beta: float):
    """Translation (normalised units) + rotation (chordal) loss; learned (Kendall) or fixed weighting.

    pred, gt [B, 4, 4]. Returns (loss, per-sample translation error [B], rotation chordal error [B]).
    """
    dt = ((pred[:, :3, 3] - gt[:, :3, 3]) / t_scale).norm(dim=-1)
    dr = (pred[:, :3, :3] - gt[:, :3, :3]).flatten(1).norm(dim=-1)
    if log_vars is None:
        return dt.mean() + beta * dr.mean(), dt, dr
    s_t, s_r = log_vars[0], log_vars[1]
    return dt.mean() * torch.exp(-s_t) + s_t + dr.mean() * torch.exp(-s_r) + s_r, dt, dr


class _Views:
    """Training views at the APR's input size: uint8 images [N, 3, h, w], K [N, 3, 3], c2w [N, 4, 4]."""

    def __init__(self, images: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> None:
        self.images, self.K, self.c2w = images, K, c2w

    def take(self, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[sel], self.K[sel], self.c2w[sel]


def _batch(real: _Views, pool: Optional[_Views], sel: torch.Tensor, n_novel: int, gen: torch.Generator):
    """Real views `sel` plus `n_novel` random views of the novel pool -> (images float [B, 3, h, w], K, c2w)."""
    parts = [real.take(sel)]
    if pool is not None and n_novel > 0:
        parts.append(pool.take(torch.randint(0, pool.images.shape[0], (n_novel,), generator=gen)))
    images, K, c2w = (torch.cat(t) for t in zip(*parts))
    return images.float() / 255.0, K, c2w


def fit_apr(
    scene: Scene, config: Optional[APRConfig] = None, novel_views: Optional[NovelViews] = None,
    progress: bool = True, device: str = "cpu",
) -> tuple[APR, dict]:
    """Train an APR on `scene`'s training split. Returns (APR in eval mode, metrics).

    Deterministic for a given config (seed) on CPU when the budget is `epochs`; a `minutes`
    budget stops on the wall clock. An epoch is one pass over the real training images; with
    novel views, `novel_fraction` of every batch comes from a pool of `novel_pool` views (default:
    as many as training images) redrawn every `novel_refresh_epochs` epochs (0: never).
    Metrics: epochs, steps, seconds, novel views drawn, and error summaries (`error_summary`) of
    the trained APR on the clean train and (where it has ground truth) test splits.
    """
    config = config or APRConfig()
    config.validate()
    train_idx = scene.split("train")
    if len(train_idx) < 2:
        raise FastnefesError(f"{scene.root}: the APR needs at least 2 training images, found {len(train_idx)}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    hw0 = tuple(int(v) for v in scene.hw[train_idx[0]])
    hw = input_hw_for(hw0, config.input_height)
    apr = APR(config, hw)
    apr.set_frame(scene.c2w[train_idx])
    apr.fingerprint = scene_fingerprint(scene)
    real = _Views(*_view_set([scene.image(i) for i in train_idx], scene.K[train_idx], scene.c2w[train_idx], hw))
    n_novel = min(int(round(config.batch_size * config.novel_fraction)), config.batch_size - 1) if novel_views else 0
    pool_size = config.novel_pool or 3 * len(train_idx)

    def draw_pool() -> Optional[_Views]:
        return _Views(*_novel_pool(novel_views, pool_size, rng, scene.K[train_idx[0]], hw0, hw)) if n_novel else None

    pool = draw_pool()
    n_drawn = pool_size if pool is not None else 0
    n_real = config.batch_size - n_novel
    steps_per_epoch = max(1, len(train_idx) // n_real)
    total_steps = steps_per_epoch * config.epochs
    budget_s = None if config.minutes is None else 60.0 * config.minutes

    apr.to(device).train()
    params = [{"params": apr.parameters(), "weight_decay": config.weight_decay}]
    log_vars = None
    if config.loss_weighting == "learned":
        log_vars = torch.tensor([config.init_log_var_t, config.init_log_var_r], device=device, requires_grad=True)
        params.append({"params": [log_vars], "weight_decay": 0.0})
    opt = torch.optim.AdamW(params, lr=config.lr)

    start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - start  # noqa: E731
    done = lambda: step >= total_steps if budget_s is None else elapsed() >= budget_s  # noqa: E731
    step, epoch, loss_val = 0, 0, float("nan")
    with _Bar(progress, budget_s or total_steps) as bar:
        while not done():
            if pool is not None and config.novel_refresh_epochs > 0 and epoch > 0 and epoch % config.novel_refresh_epochs == 0:
                pool = draw_pool()
                n_drawn += pool_size
            perm = torch.randperm(len(train_idx), generator=gen)
            errs_t, errs_r = [], []
            for b in range(steps_per_epoch):
                images, K, c2w = _batch(real, pool, perm[b * n_real : (b + 1) * n_real], n_novel, gen)
                x, y = augment(images, K, c2w, config, gen)
                for g in opt.param_groups:
                    g["lr"] = config.lr * _lr_factor(step / total_steps if budget_s is None else elapsed() / budget_s)
                loss, dt, dr = pose_loss(apr(x.to(device)), y.to(device), apr.t_scale, log_vars, config.beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_val = float(loss.detach())
                errs_t.append(dt.detach().cpu() * float(apr.t_scale))
                errs_r.append(torch.rad2deg(2 * torch.asin((dr.detach().cpu() / math.sqrt(8)).clamp(max=1))))
                bar.update(step if budget_s is None else elapsed(), epoch + 1, loss_val,
                           float(torch.cat(errs_t).median()), float(torch.cat(errs_r).median()))
                if done():
                    break
            epoch += 1
    apr.eval()
    metrics = {
        "epochs": epoch, "steps": step, "seconds": round(elapsed(), 2), "final_loss": loss_val,
        "input_hw": list(hw), "novel_views": n_drawn,
        "train": error_summary(predict_split(apr, scene, "train")[1], scene.c2w[train_idx]),
    }
    test_idx, test_pred = predict_split(apr, scene, "test")
    if test_idx and np.isfinite(scene.c2w[test_idx]).all():
        metrics["test"] = error_summary(test_pred, scene.c2w[test_idx])
    return apr, metrics


def train_apr(
    scene: Scene, out_dir: str | Path, config: Optional[APRConfig] = None, novel_views: Optional[NovelViews] = None,
    progress: bool = True, device: str = "cpu",
) -> dict:
    """Train an APR on `scene` (see `fit_apr`) and save it to `out_dir` (config.json + model.safetensors)."""
    from fastnefes.apr.io import save_apr

    apr, metrics = fit_apr(scene, config, novel_views, progress, device)
    save_apr(apr, out_dir, scene=scene, metrics=metrics)
    return metrics


class _Bar:
    """A rich progress bar over steps (or seconds), showing epoch, loss and the epoch's median
    errors on its (augmented) training batches."""

    def __init__(self, enabled: bool, total: float) -> None:
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]APR[/] ep {task.fields[epoch]}"), BarColumn(bar_width=16),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("apr", total=total, epoch=0, stats="")

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, done: float, epoch: int, loss: float, med_t: float, med_r: float) -> None:
        if self.progress is not None:
            stats = f"loss {loss:.3f} train med {med_t:.3f}/{med_r:.1f}°"
            self.progress.update(self.task, completed=done, epoch=epoch, stats=stats)
