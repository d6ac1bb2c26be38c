"""Micro-benchmarks of the native kernels against their pure-torch twins (and, on CUDA, nerfacc and
tinycudann where installed).

    python benchmarks/ops.py [--device cpu|cuda|all] [--ops composite,hashgrid,march] [--threads N]
                             [--clock wall|cpu] [--repeats 10] [--json out.json]

Compositing: 200k packed samples over 4800 rays (about 42 per ray), D = 16 / 32 / 128, densities
that do not trigger early termination (so the fused kernel gets no free skip). Hash grid: 200k
points, 16 levels x 2 features, 2^19 table, gradients for the table and the positions.
March: OccupancyGrid.sampling of 4096 rays from inside a 64^3 room-like grid (walls, a box, a
sphere shell; 19% of cells occupied), step sqrt(3)/256 (the training defaults), no culling.
Each row: median milliseconds over `--repeats` runs after warm-up, for the forward alone (no
autograd graph) and forward + backward, and the ratio torch / native (higher = native faster).
`--clock cpu` times the process's CPU time instead of wall time: with `--threads 1` on a machine
shared with other jobs it excludes the time other processes hold the core (CPU only).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastnefes.io import write_json  # noqa: E402
from fastnefes.ops._allocator import keep_freed_memory_in_heap  # noqa: E402
from fastnefes.ops._backend import load_native, native_status  # noqa: E402
from fastnefes.ops import OccupancyGrid, backends  # noqa: E402
from fastnefes.ops._native import composite_native, hash_grid_encode_native  # noqa: E402
from fastnefes.ops.composite._torch_impl import composite_torch  # noqa: E402
from fastnefes.ops.hashgrid._torch_impl import hash_grid_encode_torch  # noqa: E402
from fastnefes.ops.hashgrid.config import HashGridConfig  # noqa: E402


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def median_ms(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
              warmup: int = 2) -> dict[str, float]:
    """Median time in milliseconds on `clock` of each fn, run interleaved (a, b, a, b, ...) so
    all see the same allocator and machine state; CUDA is synchronised around each run."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def composite_inputs(n_samples: int, n_rays: int, dim: int, device: torch.device, seed: int = 0) -> dict:
    """Packed samples sorted by ray; sigma*dt sums to about 5 per ray (T stays above 1e-4)."""
    g = torch.Generator().manual_seed(seed)
    ray_indices = torch.sort(torch.randint(0, n_rays, (n_samples,), generator=g))[0]
    counts = torch.bincount(ray_indices, minlength=n_rays)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n_samples) - first[ray_indices]  # position of the sample in its ray
    step = 2.0 / counts.clamp(min=1)[ray_indices]
    t_starts = rank * step
    inputs = {
        "sigmas": torch.rand(n_samples, generator=g) * 5.0,
        "rgbs": torch.rand(n_samples, 3, generator=g),
        "features": torch.randn(n_samples, dim, generator=g),
        "t_starts": t_starts,
        "t_ends": t_starts + step,
        "ray_indices": ray_indices,
    }
    return {k: v.to(device) for k, v in inputs.items()} | {"n_rays": n_rays}


def _composite_runner(fn: Callable, inputs: dict, backward: bool) -> Callable[[], object]:
    leaves = {k: inputs[k].clone().requires_grad_(backward) for k in ("sigmas", "rgbs", "features")}
    args = (leaves["sigmas"], leaves["rgbs"], leaves["features"], inputs["t_starts"], inputs["t_ends"],
            inputs["ray_indices"], inputs["n_rays"])

    def run() -> object:
        if not backward:
            with torch.no_grad():
                return fn(*args)
        out = fn(*args)
        outs = [out.rgb, out.features, out.depth, out.opacity]
        # grad(), not backward(): no accumulation into .grad inflating both sides
        return torch.autograd.grad(outs, list(leaves.values()), [torch.ones_like(o) for o in outs])

    return run


def _nerfacc_composite(sigmas, rgbs, features, t_starts, t_ends, ray_indices, n_rays):
    """nerfacc's unfused path: weights, then one accumulate per quantity."""
    from nerfacc import accumulate_along_rays, render_weight_from_density

    weights, _, _ = render_weight_from_density(t_starts, t_ends, sigmas, ray_indices=ray_indices, n_rays=n_rays)
    rgb = accumulate_along_rays(weights, rgbs, ray_indices=ray_indices, n_rays=n_rays)
    feats = accumulate_along_rays(weights.detach(), features, ray_indices=ray_indices, n_rays=n_rays)
    depth = accumulate_along_rays(weights, ((t_starts + t_ends) / 2)[:, None], ray_indices=ray_indices, n_rays=n_rays)
    opacity = accumulate_along_rays(weights, None, ray_indices=ray_indices, n_rays=n_rays)
    return type("Out", (), {"rgb": rgb, "features": feats, "depth": depth, "opacity": opacity})()


def _nerfacc_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import nerfacc  # noqa: F401
    except Exception:
        return False
    return True


def bench_composite(device: torch.device, repeats: int, dims: tuple[int, ...]) -> list[dict]:
    rows = []
    with_nerfacc = _nerfacc_available(device)
    for dim in dims:
        inputs = composite_inputs(200_000, 4800, dim, device)
        for backward in (False, True):
            row = {"op": "composite", "config": f"D={dim}", "device": device.type,
                   "pass": "fwd+bwd" if backward else "fwd"}
            fns = {"torch_ms": composite_torch, "native_ms": composite_native}
            if with_nerfacc:
                fns["nerfacc_ms"] = _nerfacc_composite
            runners = {name: _composite_runner(fn, inputs, backward) for name, fn in fns.items()}
            rows.append(row | median_ms(runners, device, repeats))
    return rows


def _tcnn_encode(device: torch.device) -> Callable | None:
    if device.type != "cuda" or backends._probe("hashgrid", "tcnn", "cuda") is not None:
        return None
    from fastnefes.ops.hashgrid._tcnn import hash_grid_encode_tcnn

    return hash_grid_encode_tcnn


def bench_hashgrid(device: torch.device, repeats: int) -> list[dict]:
    cfg = HashGridConfig()  # 16 levels, 2 features, 2^19, base 16, scale 2
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200_000, 3, generator=g).to(device)
    params = (torch.rand(cfg.n_params, generator=g) * 2e-4 - 1e-4).to(device)
    fns = {"torch_ms": hash_grid_encode_torch, "native_ms": hash_grid_encode_native}
    tcnn = _tcnn_encode(device)
    if tcnn is not None:
        fns["tcnn_ms"] = tcnn
    rows = []
    for backward in (False, True):
        row = {"op": "hashgrid", "config": "16x2, 2^19", "device": device.type,
               "pass": "fwd+bwd" if backward else "fwd"}
        runners = {}
        for name, fn in fns.items():
            xx, pp = x.clone().requires_grad_(backward), params.clone().requires_grad_(backward)

            def run(fn=fn, xx=xx, pp=pp) -> object:
                if not backward:
                    with torch.no_grad():
                        return fn(xx, pp, cfg)
                out = fn(xx, pp, cfg)
                return torch.autograd.grad(out, [xx, pp], torch.ones_like(out))

            runners[name] = run
        row |= median_ms(runners, device, repeats)
        rows.append(row)
    return rows


def room_grid(device: torch.device, res: int = 64) -> OccupancyGrid:
    """A 64^3 grid occupied like a furnished room seen from inside: walls, floor and ceiling two
    cells thick, a box and a sphere shell (19% of the cells)."""
    grid = OccupancyGrid((0, 0, 0, 1, 1, 1), res, 1)
    c = (torch.arange(res) + 0.5) / res
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    shell = ((x - 0.5).abs().maximum((y - 0.5).abs()).maximum((z - 0.5).abs()) - 0.4).abs() < 1.5 / res
    box = ((x - 0.3).abs() < 0.08) & ((y - 0.7).abs() < 0.1) & ((z - 0.3).abs() < 0.05)
    sphere = (((x - 0.6) ** 2 + (y - 0.4) ** 2 + (z - 0.6) ** 2).sqrt() - 0.1).abs() < 1.0 / res
    grid.binaries[0] = shell | box | sphere
    return grid.to(device)


def bench_march(device: torch.device, repeats: int) -> list[dict]:
    grid = room_grid(device)
    g = torch.Generator().manual_seed(0)
    origins = (0.5 + (torch.rand(4096, 3, generator=g) - 0.5) * 0.4).to(device)
    dirs = torch.nn.functional.normalize(torch.randn(4096, 3, generator=g), dim=-1).to(device)
    step = 3**0.5 / 256
    names = ["torch", "native"] + (["nerfacc"] if backends._probe("occgrid", "nerfacc", device.type) is None else [])

    def runner(backend: str) -> Callable[[], object]:
        def run() -> object:
            os.environ["FASTNEFES_OCCGRID_BACKEND"] = backend
            return grid.sampling(origins, dirs, near_plane=0.02, render_step_size=step)

        return run

    before = os.environ.get("FASTNEFES_OCCGRID_BACKEND")
    try:
        times = median_ms({f"{b}_ms": runner(b) for b in names}, device, repeats)
        n = int(runner("native")()[0].numel())
    finally:
        if before is None:
            os.environ.pop("FASTNEFES_OCCGRID_BACKEND", None)
        else:
            os.environ["FASTNEFES_OCCGRID_BACKEND"] = before
    return [{"op": "march", "config": f"4096 rays, {n} samples", "device": device.type, "pass": "fwd"} | times]


SIZES = ("composite: 200k samples over 4800 rays, D features; hashgrid: 200k points, 16 levels x 2 features, "
         "2^19 table; fwd+bwd = gradients for sigma, rgb, features / for x and the table; march: 4096 rays in a "
         "64^3 room-like grid, step sqrt(3)/256")
OTHERS = ("nerfacc", "tcnn")  # third-party backends measured where installed


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    others = [o for o in OTHERS if any(f"{o}_ms" in r for r in rows)]
    table = Table(title=title, caption=SIZES)
    for col in ("op", "device", "config", "pass", "torch ms", "native ms", "torch/native"):
        table.add_column(col, justify="right" if "ms" in col or "/" in col else "left")
    for o in others:
        table.add_column(f"{o} ms", justify="right")
        table.add_column(f"{o}/native", justify="right")
    for r in rows:
        cells = [r["op"], r["device"], r["config"], r["pass"], f"{r['torch_ms']:.2f}", f"{r['native_ms']:.2f}",
                 f"{r['torch_ms'] / r['native_ms']:.1f}x"]
        for o in others:
            t = r.get(f"{o}_ms")
            cells += [f"{t:.2f}", f"{t / r['native_ms']:.2f}x"] if t else ["-", "-"]
        table.add_row(*cells)
    Console().print(table)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="all = cpu, plus cuda when available")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch / OpenMP CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="cpu: process CPU time (CPU only)")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 128], help="feature widths D")
    parser.add_argument("--ops", default="composite,hashgrid,march", help="comma-separated subset to run")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the machine here")
    parser.add_argument("--allocator", choices=("heap", "system"), default="heap",
                        help="heap: keep freed memory mapped (as the CLI does); system: glibc's defaults")
    args = parser.parse_args()
    kept = args.allocator == "heap" and keep_freed_memory_in_heap()
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if args.clock == "cpu" and "cuda" in devices:
        raise SystemExit("--clock cpu measures CPU work only: use it with --device cpu")
    start = time.perf_counter()
    for d in devices:
        if load_native(d) is None:
            raise SystemExit(f"native kernels unavailable on {d}: {native_status()}")
    print(f"native build/load: {time.perf_counter() - start:.1f} s")

    ops = {o.strip() for o in args.ops.split(",") if o.strip()}
    rows: list[dict] = []
    for d in devices:
        device = torch.device(d)
        if "composite" in ops:
            rows += bench_composite(device, args.repeats, tuple(args.dims))
        if "hashgrid" in ops:
            rows += bench_hashgrid(device, args.repeats)
        if "march" in ops:
            rows += bench_march(device, args.repeats)
    info = machine()
    info["clock"] = args.clock
    info["allocator"] = "heap (freed memory kept mapped)" if kept else "glibc defaults"
    print_table(rows, f"native vs torch, median {args.clock} ms of {args.repeats} ({info['cpu']}, {info['torch_threads']} threads"
                      + (f", {info['cuda_device']}" if "cuda_device" in info else "") + ")")
    if args.json:
        write_json(args.json, {"machine": info, "repeats": args.repeats, "sizes": SIZES, "rows": rows})


if __name__ == "__main__":
    main()
