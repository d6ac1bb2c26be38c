"""Target "apr" (NeFeS's default): Adam on a per-query copy of the APR's weights, the APR's
output pose giving the render pose; then the pose-target photometric polish of its result."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace

import torch

from fastnefes.refine.optim import lr_scale
from fastnefes.refine.result import QueryDiagnostics, RefineResult


def refine_apr_weights(refiner, image, K_np, apr) -> RefineResult:
    """One query: image [1, H, W, 3] uint8, K_np [1, 3, 3]; `refiner` a Refiner (its model,
    config and loss). Only a deep copy of `apr` is updated (its BN statistics frozen)."""
    from fastnefes.apr.model import prepare_images

    cfg = refiner.config
    t0 = time.perf_counter()
    H, W = image.shape[1:3]
    dev = refiner.device
    K = torch.as_tensor(K_np, dtype=torch.float32, device=dev)
    stride = refiner.stride(H, W)
    target = refiner.encode_queries(image, stride=stride)
    local = copy.deepcopy(apr).to(dev).eval()
    x = prepare_images(image, local.image_hw).to(dev)
    opt = torch.optim.Adam(local.parameters(), lr=cfg.lr_apr)
    with torch.no_grad():
        init = local(x).float()
        initial_loss = float(refiner._loss_at(K, init, target, H, W, stride)[0])
    status, its = "max_iters", 0
    for it in range(cfg.iters):
        for g in opt.param_groups:
            g["lr"] = cfg.lr_apr * lr_scale(cfg.iters, it, cfg.lr_final_fraction)
        factor = cfg.coarse_factor if it < cfg.coarse_iters else 1
        loss = refiner._loss_at(K, local(x).float(), target, H, W, stride, factor)
        its += 1
        if not torch.isfinite(loss).all():
            status = "failed"
            break
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        final = local(x).float()
        final_loss = float(refiner._loss_at(K, final, target, H, W, stride)[0])
    keep = (status == "failed" or not math.isfinite(final_loss) or not bool(torch.isfinite(final).all())
            or (cfg.verify and final_loss >= initial_loss))
    if keep and status != "failed":
        status = "kept_initial"
    pose = (init if keep else final).double().cpu().numpy()
    diag = QueryDiagnostics(initial_loss, final_loss, its, time.perf_counter() - t0, status)
    return RefineResult(pose, init.double().cpu().numpy(), [diag])


def polish_apr_results(refiner, images, K, result: RefineResult) -> RefineResult:
    """The pose-target polish (no feature iterations) from the APR-refined poses; the
    verification still compares against the APR's own prediction."""
    polish = type(refiner)(refiner.model, replace(refiner.config, target="pose", iters=0))
    polished = polish._refine_poses(images, K, result.poses, None)
    diags = []
    for d, p in zip(result.diagnostics, polished.diagnostics):
        took = p.status in ("converged", "max_iters")  # else the polish kept the APR-refined pose
        diags.append(QueryDiagnostics(d.initial_loss, p.final_loss if took else d.final_loss,
                                      d.iterations + p.iterations, d.wall_time_s + p.wall_time_s,
                                      p.status if took else d.status))
    return RefineResult(polished.poses, result.initial, diags)
