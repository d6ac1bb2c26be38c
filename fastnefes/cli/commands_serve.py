"""`fastnefes serve`: the refinement service; `fastnefes query`: a split refined through one."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from fastnefes.cli.app import app, console
from fastnefes.cli.options import DeviceOpt, DownscaleOpt, FocalOpt, FormatOpt, MaxSideOpt, SfmPosesOpt, SplitOpt, json_object_option
from fastnefes.errors import FastnefesError

SettingsOpt = Annotated[Optional[str], typer.Option(
    "--settings", help="Refinement settings as JSON text or a .json file, e.g. '{\"polish_levels\": 3}' (the names of "
                       "fastnefes.refine.RefineConfig that a request may set; GET /info lists them).")]


def read_settings(settings: Optional[str]) -> dict:
    """--settings: inline JSON or a JSON file -> dict."""
    return json_object_option(settings, "--settings", "refinement settings")


@app.command("serve")
def serve_command(
    run: Annotated[Path, typer.Argument(help="Trained run directory (fastnefes train).")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most queries refined together in one batch.")] = 8,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", min=0.0, help="How long a query waits for others to share its batch.")] = 20.0,
    settings: SettingsOpt = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest request body accepted (413 above).")] = 32.0,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="Refine one synthetic query before accepting requests.")] = True,
    device: DeviceOpt = "auto",
) -> None:
    """Serve pose refinement over HTTP: POST /refine (image + camera + initial pose), GET /health,
    GET /info, docs at /docs. Settings default to `fastnefes refine`'s."""
    from fastnefes.serve import require_extra

    require_extra()
    import uvicorn

    from fastnefes.io import read_json
    from fastnefes.refine import RefineConfig
    from fastnefes.serve.app import RefineService, create_app, settings_config
    from fastnefes.train.run import CONFIG_FILE, load_run
    from fastnefes.train.trainer import resolve_device

    defaults = settings_config(RefineConfig(), read_settings(settings), where="--settings")
    model, _ = load_run(run, resolve_device(device))
    record = read_json(run / CONFIG_FILE).get("data")
    if defaults.verify and defaults.verify_rays > 0:
        _calibrate_pixel_check(model, record, defaults.verify_rays)
    service = RefineService(model, run, defaults, max_batch, max_wait_ms / 1e3, record, int(max_upload_mb * 2**20))
    failure = service.warm_up() if warmup else None
    if failure:
        console.print(f"[yellow]warning:[/] the warm-up refinement failed ({failure}); serving anyway", highlight=False)
    # HTTP on a thread, refinement on this one: the thread that loaded the model and ran its
    # parallel kernels keeps them (DynamicBatcher.run).
    server = uvicorn.Server(uvicorn.Config(create_app(service, batcher_thread=False), host=host, port=port,
                                           log_level="warning", access_log=False))
    http = threading.Thread(target=server.run, name="fastnefes-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise FastnefesError(f"could not serve on {host}:{port} (is the port in use?)")
        time.sleep(0.05)
    console.print(f"serving {run} on http://{host}:{port} ({model.device}; batches of up to {max_batch}, "
                  f"{max_wait_ms:g} ms wait); docs at /docs", highlight=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a graceful stop, as Ctrl-C
    try:
        service.batcher.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(10)


def _calibrate_pixel_check(model, record: dict | None, rays: int) -> None:
    """The pixel check's absolute floor from the run's training views, where the data the run
    records can be read here; else a warning (the relative check still runs)."""
    from fastnefes.data.options import DataOptions
    from fastnefes.refine.verify import calibrate_pixel_check

    try:
        root = record["data"]
        calibrate_pixel_check(model, DataOptions.from_record(record, root).load(root), rays)
    except (FastnefesError, KeyError, TypeError, OSError) as exc:
        console.print(f"[yellow]warning:[/] the pixel check runs without its floor relative to the training views "
                      f"(their data could not be read: {exc})", highlight=False)


@app.command("query")
def query_command(
    url: Annotated[str, typer.Argument(help="The service's address, e.g. http://127.0.0.1:8000.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder holding the query images.")],
    init: Annotated[Path, typer.Option("--init", help="Initial pose file.")],
    out: Annotated[Path, typer.Option("--out", help="Refined pose file to write; diagnostics go beside it as .json.")],
    split: SplitOpt = "test",
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight at once (the server batches them).")] = 8,
    settings: SettingsOpt = None,
    format: FormatOpt = None,
    downscale: DownscaleOpt = None,
    max_side: MaxSideOpt = None,
    focal: FocalOpt = None,
    sfm_poses: SfmPosesOpt = None,
) -> None:
    """Send a split's images, intrinsics and initial poses to a running `fastnefes serve`; writes
    the refined pose file and its JSON diagnostics as `fastnefes refine` does. Data options
    default to those the server's run was trained with."""
    import time

    import numpy as np

    from fastnefes.cli.commands_refine import before_after_table, progress_bar
    from fastnefes.client import Client, Query
    from fastnefes.data.options import DataOptions, as_options
    from fastnefes.geometry import read_poses, write_poses
    from fastnefes.io import write_json
    from fastnefes.refine.pipeline import SplitRefinement, match_init_to_split

    init_poses = read_poses(init)
    request_settings = read_settings(settings)
    with Client(url, connections=concurrency) as client:
        info = client.info()
        record = info.get("data_options")
        recorded = DataOptions.from_record(record, data, where=f"{url}/info") if record else None
        scene = as_options(format, downscale, max_side, focal, sfm_poses).merged_over(recorded).load(data)
        indices = match_init_to_split(scene, split, init_poses, init)
        names = [scene.names[i] for i in indices]
        queries = [Query(scene.image(i), scene.K[i], init_poses[scene.names[i]], scene.names[i], settings=request_settings)
                   for i in indices]
        with progress_bar() as bar:
            task = bar.add_task(f"query {url}", total=len(queries), info="")
            start = time.perf_counter()

            def on_answer(i: int, answer) -> None:
                bar.update(task, advance=1)

            answers = client.refine_many(queries, concurrency, on_answer)
            wall = time.perf_counter() - start
    refined = {n: a.c2w for n, a in zip(names, answers)}
    write_poses(out, refined)
    served = np.array([a.data["timings"]["total_ms"] for a in answers])
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[a.status] = statuses.get(a.status, 0) + 1
    config = {**info["settings"], **request_settings}
    report = {"server": url, "run": info.get("run"), "data": str(data), "split": split, "device": info.get("device"),
              "config": config, "concurrency": concurrency, "wall_s": wall, "queries_per_s": len(answers) / wall,
              "latency_ms": {f"p{q}": float(np.percentile(served, q)) for q in (50, 95, 99)} | {"mean": float(served.mean())},
              "status_counts": statuses,
              "queries": [{"name": n, **a.data["diagnostics"], "timings": a.data["timings"]} for n, a in zip(names, answers)]}
    result = SplitRefinement(names, {n: a.initial_c2w for n, a in zip(names, answers)}, refined, [])
    table = None
    try:
        table, before, after = before_after_table(scene, split, result)
        report["evaluation"] = {"before": before, "after": after}
    except FastnefesError:
        pass
    json_path = out.with_suffix(".json")
    write_json(json_path, report)
    if table is not None:
        console.print(table)
    lat = report["latency_ms"]
    console.print(f"{len(answers)} queries in {wall:.1f} s ({report['queries_per_s']:.2f}/s, {concurrency} in flight); "
                  f"served latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms; status: {statuses}")
    console.print(f"wrote {out} and {json_path}")
