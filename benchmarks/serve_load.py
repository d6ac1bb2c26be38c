"""Load benchmark of `fastnefes serve`: throughput and latency under concurrent clients, against
the batch command's throughput on the same queries, and a malformed-request soak.

    python benchmarks/serve_load.py --run RUN --data DATA [--clients 8] [--requests 64]
        [--max-batch 8] [--max-wait-ms 20] [--settings JSON] [--soak 1000] [--out results.json]

On loopback, with the server in a subprocess (the same torch threads as this process):
1. offline: refine_split over the split's queries in batches of --max-batch, as
   `fastnefes refine --batch B` runs it (without its process start and model load);
2. single: one client, requests one after another: the single-request latency;
3. load: --clients closed-loop clients, --requests requests in all (at most --time-limit s):
   throughput and latency p50 / p95 / p99. Offline and load alternate --repeats times (medians).
4. soak: --soak requests (each with --soak-settings) from --clients clients, --bad-fraction
   of them malformed (garbage bytes, truncated PNG, wrong size, NaN pose, non-rotation, bad
   JSON, unknown setting): every good one must come back 200 with its own id and a pose nearest
   its own query's offline pose (same settings), every bad one a 4xx, /health must answer
   throughout, and the server's resident memory after the run is compared with the one after
   warm-up (the first 10% of the soak).
Every request carries a unique id (its `name`); each must be answered exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastnefes.refine.config import NEFES

# NeFeS's pipeline (the nefes preset), lightened: the measurement is of batching and serving.
LIGHT = {**NEFES, "iters": 20, "coarse_iters": 5, "search_pad": 0.0, "polish_iters": 5, "polish_levels": 2}
SOAK = {"iters": 3, "search_pad": 0.0, "polish_iters": 0}  # per request: the soak is about robustness, not refinement


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, settings: dict):
    import httpx

    port = free_port()
    log = open(os.path.join(args.workdir, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "fastnefes", "serve", args.run, "--port", str(port), "--device", "cpu",
                             "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                             "--settings", json.dumps(settings)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("server did not come up")


class Load:
    """Closed-loop clients sending requests from a list of (image bytes, query dict, expected)."""

    def __init__(self, url: str, requests: list, clients: int, time_limit: float):
        self.url, self.requests, self.clients, self.time_limit = url, requests, clients, time_limit
        self.next, self.lock = 0, threading.Lock()
        self.results: list[tuple] = []  # (index, status, latency_s, answer json)

    def _client(self, deadline: float) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=600) as http:
            while time.perf_counter() < deadline:
                with self.lock:
                    i = self.next
                    self.next += 1
                if i >= len(self.requests):
                    return
                image, query, _ = self.requests[i]
                body = query if isinstance(query, str) else json.dumps(query)
                t0 = time.perf_counter()
                r = http.post("/refine", files={"image": ("q.png", image)}, data={"query": body})
                latency = time.perf_counter() - t0
                try:
                    answer = r.json()
                except ValueError:
                    answer = {"error": r.text}
                with self.lock:
                    self.results.append((i, r.status_code, latency, answer))

    def run(self) -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(self.clients) as pool:
            for f in [pool.submit(self._client, start + self.time_limit) for _ in range(self.clients)]:
                f.result()
        return time.perf_counter() - start


def percentiles(latencies_s) -> dict:
    ms = np.asarray(latencies_s) * 1e3
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)} | {"mean": float(ms.mean())}


def make_requests(queries, n: int, bad_fraction: float, tag: str, seed: int = 0, settings: dict | None = None) -> list:
    """n requests cycling over the queries; a bad_fraction of them malformed (7 kinds in turn).
    Each entry: (image bytes, query dict or text, expected: query index or 'bad')."""
    rng = np.random.default_rng(seed)
    bad = set(rng.choice(n, int(round(n * bad_fraction)), replace=False).tolist()) if bad_fraction > 0 else set()
    out, kinds = [], 0
    for i in range(n):
        q = i % len(queries)
        png, query, small = queries[q]
        query = {**query, "name": f"{tag}-{i}", **({"settings": settings} if settings else {})}
        if i not in bad:
            out.append((png, query, q))
            continue
        kind, kinds = kinds % 7, kinds + 1
        if kind == 0:
            out.append((b"garbage" * 50, query, "bad"))
        elif kind == 1:
            out.append((png[: len(png) // 2], query, "bad"))
        elif kind == 2:
            out.append((small, query, "bad"))
        elif kind == 3:
            out.append((png, {**query, "pose": [1, 0, 0, 0, 0, 0, float("nan")]}, "bad"))
        elif kind == 4:
            out.append((png, {**query, "pose": [0.3, 0.1, 0, 0, 0, 0, 0]}, "bad"))
        elif kind == 5:
            out.append((png, json.dumps(query)[:-5], "bad"))
        else:
            out.append((png, {**query, "settings": {"no_such_setting": 1}}, "bad"))
    return out


def exactly_once(load: Load) -> bool:
    names = [a.get("name") for i, s, _, a in load.results if s == 200]
    sent = [i for i, *_ in load.results]
    return len(sent) == len(set(sent)) and len(names) == len(set(names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--queries", type=int, default=16, help="distinct queries (the split's first ones)")
    ap.add_argument("--perturb", type=float, nargs=2, default=(5.0, 0.1), metavar=("DEG", "UNITS"),
                    help="initial poses: the ground truth turned DEG degrees and moved UNITS (dataset units)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64, help="requests per load run")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per load run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--settings", default=json.dumps(LIGHT), help="refinement settings JSON (server and offline)")
    ap.add_argument("--soak", type=int, default=1000, help="requests in the malformed-request soak (0 = none)")
    ap.add_argument("--bad-fraction", type=float, default=0.1)
    ap.add_argument("--soak-settings", default=json.dumps(SOAK), help="settings JSON sent with each soak request")
    ap.add_argument("--workdir", default="/tmp/fastnefes_serve_load")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    import httpx
    import torch

    from fastnefes.cli.options import load_scene_from_options
    from fastnefes.geometry import perturb_poses
    from fastnefes.ops._allocator import keep_freed_memory_in_heap
    from fastnefes.refine import RefineConfig, refine_split
    from fastnefes.serve.wire import camera_to_wire, encode_png, pose_to_wire
    from fastnefes.train.run import load_run

    keep_freed_memory_in_heap()  # as the CLI (and so the server) does
    settings = json.loads(args.settings)
    config = RefineConfig.from_dict({**RefineConfig().to_dict(), **settings})
    model, _ = load_run(args.run, "cpu")
    scene = load_scene_from_options(args.data, run=args.run)
    idx = scene.split(args.split)[: args.queries]
    names = [scene.names[i] for i in idx]
    init = dict(zip(names, perturb_poses(scene.c2w[idx], *args.perturb, seed=0)))
    queries = []
    for i, name in zip(idx, names):
        image = scene.image(i)
        h, w = image.shape[:2]
        queries.append((encode_png(image), {"camera": camera_to_wire(scene.K[i], w, h), "pose": pose_to_wire(init[name])},
                        encode_png(image[: h // 2, : w // 2])))

    def offline(cfg=config) -> tuple[float, object]:
        t0 = time.perf_counter()
        result = refine_split(model, scene, args.split, init, cfg, batch=args.max_batch)
        return len(names) / (time.perf_counter() - t0), result

    proc, url = start_server(args, settings)
    report: dict = {"machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
                    "torch_threads": torch.get_num_threads(), "settings": settings, "queries": len(names),
                    "clients": args.clients, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                    "load_average_at_start": os.getloadavg()}
    try:
        # Single-request latency (one client, one request at a time), after one warm-up request.
        single = Load(url, make_requests(queries, len(names) + 1, 0.0, "single"), 1, args.time_limit)
        single.run()
        single_latency = [lat for i, s, lat, _ in single.results if i > 0 and s == 200]
        report["single_latency_ms"] = percentiles(single_latency)
        offline_qps, served_qps, loads = [], [], []
        reference = None
        for r in range(args.repeats):
            qps, reference = offline()
            offline_qps.append(qps)
            load = Load(url, make_requests(queries, args.requests, 0.0, f"load{r}"), args.clients, args.time_limit)
            wall = load.run()
            ok = [x for x in load.results if x[1] == 200]
            served_qps.append(len(ok) / wall)
            loads.append({"answered": len(ok), "sent": len(load.results), "wall_s": wall,
                          "exactly_once": exactly_once(load), "latency_ms": percentiles([x[2] for x in ok]),
                          "batch_sizes": [x[3]["timings"]["batch_size"] for x in ok]})
        report["offline_queries_per_s"] = offline_qps
        report["served_queries_per_s"] = served_qps
        report["throughput_ratio"] = statistics.median(served_qps) / statistics.median(offline_qps)
        report["load"] = [{k: v for k, v in x.items() if k != "batch_sizes"} | {"mean_batch": float(np.mean(x["batch_sizes"]))}
                          for x in loads]
        p95 = statistics.median(x["latency_ms"]["p95"] for x in loads)
        report["p95_over_single_p50"] = p95 / report["single_latency_ms"]["p50"]

        if args.soak > 0:
            soak_settings = json.loads(args.soak_settings)
            _, soak_reference = offline(RefineConfig.from_dict({**config.to_dict(), **soak_settings}))
            report["soak"] = soak(args, url, queries, soak_reference, names, soak_settings)
        report["server_info"] = httpx.get(f"{url}/info").json()
        report["load_average_at_end"] = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps({k: v for k, v in report.items() if k != "server_info"}, indent=1))
    if args.out:
        from fastnefes.io import write_json

        write_json(args.out, report)


def soak(args, url: str, queries, reference, names, settings: dict) -> dict:
    """The malformed-request soak: see the module docstring."""
    import httpx

    from fastnefes.geometry import pose_errors
    from fastnefes.serve.wire import pose_from_wire

    requests = make_requests(queries, args.soak, args.bad_fraction, "soak", seed=1, settings=settings)
    warm = args.soak // 10
    head = Load(url, requests[:warm], args.clients, args.time_limit)  # warm-up: the first 10%
    head.run()
    rss_warm = httpx.get(f"{url}/info").json()["memory_rss_mb"]
    health_failures, health_checks, stop = [0], [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            health_checks[0] += 1
            try:
                ok = httpx.get(f"{url}/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                ok = False
            health_failures[0] += not ok
            stop.wait(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    tail = Load(url, requests[warm:], args.clients, args.time_limit)
    wall = tail.run()
    stop.set()
    watcher.join()
    rss_end = httpx.get(f"{url}/info").json()["memory_rss_mb"]
    results = [(i, s, lat, a) for i, s, lat, a in head.results] + [(i + warm, s, lat, a) for i, s, lat, a in tail.results]
    good_ok = bad_4xx = wrong = nearest_own = 0
    deviation_t, deviation_r = [], []
    moved = {n: pose_errors(reference.refined[n][None], reference.init[n][None]) for n in names}
    offline = np.stack([reference.refined[n] for n in names])
    for i, status, _, answer in results:
        _, _, expected = requests[i]
        if expected == "bad":
            bad_4xx += 400 <= status < 500
            continue
        if status != 200 or answer.get("name") != f"soak-{i}":
            wrong += 1
            continue
        name = names[expected]
        pose = pose_from_wire(answer["pose"])
        dt, dr = pose_errors(pose[None], reference.refined[name][None])
        nearest_own += int(np.argmin(pose_errors(np.repeat(pose[None], len(names), 0), offline)[0]) == expected)
        deviation_t.append(float(dt[0]))
        deviation_r.append(float(dr[0]))
        good_ok += 1
    n_bad = sum(1 for _, _, e in requests if e == "bad")
    return {"requests": len(requests), "answered": len(results), "bad_sent": n_bad, "bad_4xx": bad_4xx,
            "good_sent": len(requests) - n_bad, "good_200_own_id": good_ok, "good_wrong": wrong,
            "good_nearest_own_offline_pose": nearest_own,
            "exactly_once": len({i for i, *_ in results}) == len(results) == len(requests),
            "deviation_from_offline": {"trans_median": float(np.median(deviation_t)), "trans_max": max(deviation_t, default=0.0),
                                       "rot_deg_median": float(np.median(deviation_r)), "rot_deg_max": max(deviation_r, default=0.0)},
            "offline_move": {"trans_median": float(np.median([m[0][0] for m in moved.values()])),
                             "rot_deg_median": float(np.median([m[1][0] for m in moved.values()]))},
            "health_checks": health_checks[0], "health_failures": health_failures[0], "wall_s": wall,
            "rss_mb_after_warmup": rss_warm, "rss_mb_end": rss_end,
            "rss_growth_pct": 100.0 * (rss_end - rss_warm) / rss_warm}


if __name__ == "__main__":
    main()
