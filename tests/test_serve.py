"""The refinement service: the real server in a subprocess on a free loopback port, talked to
over HTTP with httpx; the batcher and the wire format on their own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastnefes.errors import FastnefesError  # noqa: E402
from fastnefes.geometry import perturb_poses, pose_errors, read_poses, write_poses  # noqa: E402
from fastnefes.refine import RefineConfig, Refiner  # noqa: E402
from fastnefes.refine.result import QueryDiagnostics, RefineResult  # noqa: E402
from fastnefes.serve.wire import (WireError, camera_to_wire, decode_image, encode_png, image_size,  # noqa: E402
                                  pose_from_wire, pose_to_wire)

from conftest import query_views, run_main  # noqa: E402

# Light settings so a query refines in a fraction of a second on the tiny field.
SETTINGS = {"iters": 8, "search_pad": 0.0, "polish_iters": 0}
MAX_WAIT_MS = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """URL of `fastnefes serve` on the tiny run, in a subprocess (stopped after the module)."""
    run_dir, _ = tiny_run
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = _free_port()
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "fastnefes", "serve", str(run_dir), "--port", str(port),
                                 "--device", "cpu", "--max-batch", "4", "--max-wait-ms", str(MAX_WAIT_MS),
                                 "--settings", json.dumps(SETTINGS), "--max-upload-mb", "1"], stdout=sink, stderr=sink,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # light on CI's 2 cores, and as `queries`'s
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # start-up is seconds on an idle machine; a busy one can take minutes
    try:
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, f"server not up: {log.read_text()}"
            time.sleep(0.3)
        yield url
    finally:  # also when it never came up: no server left behind
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def queries(tiny_run, tiny_scene):
    """(images, K, init, single-query Python API results) of the tiny scene's test views."""
    from fastnefes.train.run import load_run

    run_dir, _ = tiny_run
    images, K, gt = query_views(tiny_scene)
    # As the server sees them: through the wire's quaternions (float64, exact to ~1e-16).
    init = np.stack([pose_from_wire(pose_to_wire(c2w)) for c2w in perturb_poses(gt, 2.0, 0.03, seed=4)])
    model, _ = load_run(run_dir, "cpu")  # what the server loads
    refiner = Refiner(model, RefineConfig.from_dict({**RefineConfig().to_dict(), **SETTINGS}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's
    try:
        singles = [refiner.refine(images[i : i + 1], K[i : i + 1], init[i : i + 1]) for i in range(len(images))]
    finally:
        torch.set_num_threads(threads)
    return images, K, init, singles


def _post(url: str, image: bytes, query: dict | str, timeout: float = 120) -> httpx.Response:
    body = query if isinstance(query, str) else json.dumps(query)
    return httpx.post(f"{url}/refine", files={"image": ("q.png", image)}, data={"query": body}, timeout=timeout)


def _query(images, K, init, i: int, **extra) -> tuple[bytes, dict]:
    h, w = images[i].shape[:2]
    return encode_png(images[i]), {"name": f"q{i}", "camera": camera_to_wire(K[i], w, h), "pose": pose_to_wire(init[i]),
                                   **extra}


def _assert_own_results(poses, init, singles) -> None:
    """Each pose is its own query's single-query result (a batch's float rounding can part
    trajectories a little: NeFeS-style batched and single runs agree to a fraction of the move),
    and nearer to it than to any other query's."""
    reference = np.concatenate([s.poses for s in singles])
    for i, pose in enumerate(poses):
        moved_t, _ = pose_errors(reference[i : i + 1], init[i : i + 1])
        dt, _ = pose_errors(np.repeat(pose[None], len(reference), 0), reference)
        assert dt[i] <= 0.25 * moved_t[0] + 1e-6 and dt.argmin() == i, (i, dt, moved_t)


def test_round_trip_matches_python_api(server, queries):
    images, K, init, singles = queries
    r = _post(server, *_query(images, K, init, 0))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["name"] == "q0"
    expected = singles[0]
    assert np.allclose(pose_from_wire(out["pose"]), expected.poses[0], atol=1e-6)
    assert np.allclose(pose_from_wire(out["initial_pose"]), init[0], atol=1e-9)
    diag = expected.diagnostics[0].to_dict()
    assert out["diagnostics"].keys() == diag.keys()
    # The loss at the refined pose (before verification: it differs from the initial loss even
    # when the initial pose is kept) and the iterations show the same refinement ran.
    assert out["final_loss"] == pytest.approx(diag["final_loss"], rel=1e-4) and out["final_loss"] != out["initial_loss"]
    assert out["status"] == diag["status"] and out["iterations"] == diag["iterations"]
    confidence = diag.get("confidence")
    assert out["confidence"] == (None if confidence is None else pytest.approx(confidence, rel=1e-4))
    assert out["timings"]["batch_size"] == 1 and out["timings"]["refine_ms"] > 0


def test_concurrent_requests_are_batched_and_answered_each(server, queries):
    images, K, init, singles = queries
    n = len(images)
    before = httpx.get(f"{server}/info").json()["batching"]
    barrier = threading.Barrier(n)

    def send(i):
        barrier.wait()
        return _post(server, *_query(images, K, init, i))

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(send, range(n)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    answers = [r.json() for r in responses]
    assert [a["name"] for a in answers] == [f"q{i}" for i in range(n)]
    assert max(a["timings"]["batch_size"] for a in answers) > 1  # sent together within max-wait: batched
    after = httpx.get(f"{server}/info").json()["batching"]
    assert after["largest_batch"] > 1 and after["answered"] - before["answered"] == n
    assert after["batches"] - before["batches"] < n
    _assert_own_results([pose_from_wire(a["pose"]) for a in answers], init, singles)


def test_malformed_requests_get_4xx_naming_the_field_and_server_stays_up(server, queries):
    images, K, init, _ = queries
    png, good = _query(images, K, init, 1)
    small = encode_png(images[1][::2, ::2])
    cases = [
        (b"not an image at all", good, 422, "image"),
        (png[: len(png) // 2], good, 422, "image"),  # truncated PNG: header fine, pixels missing
        (small, good, 422, "image"),  # wrong size for the intrinsics
        (png, {**good, "pose": [1, 0, 0, 0, 0, 0, float("nan")]}, 422, "pose"),
        (png, {**good, "pose": [2, 0, 0, 0, 0, 0, 0]}, 422, "pose"),  # not a rotation
        (png, {**good, "pose": [1, 0, 0]}, 422, "pose"),
        (png, {**good, "camera": {**good["camera"], "fx": -1}}, 422, "camera.fx"),
        (png, {**good, "settings": {"iterz": 3}}, 422, "settings.iterz"),
        (png, {**good, "settings": {"iters": -1}}, 422, "settings.iters"),
        (png, "{not json", 422, "query"),
        (b"\x89PNG" + bytes(2 * 2**20), good, 413, "image"),  # over --max-upload-mb 1
    ]
    for image, query, status, field in cases:
        r = _post(server, image, query)
        assert r.status_code == status and r.json()["field"] == field, (field, r.status_code, r.text)
        assert r.json()["error"]
    r = httpx.post(f"{server}/refine", data={"query": json.dumps(good)})  # no image part
    assert r.status_code == 422 and r.json()["field"] == "image", r.text
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    r = _post(server, png, good)
    assert r.status_code == 200 and r.json()["name"] == "q1", r.text
    info = httpx.get(f"{server}/info").json()
    assert info["requests"]["rejected"]["422"] >= 11 and info["requests"]["rejected"]["413"] >= 1
    assert info["settings"]["iters"] == SETTINGS["iters"] and "iters" in info["request_settings"]
    assert info["device"] == "cpu" and info["backends"] and info["memory_rss_mb"] > 0
    assert httpx.get(f"{server}/openapi.json").json()["paths"]["/refine"]["post"]


def test_query_command_writes_the_pose_file_and_diagnostics(server, queries, tiny_scene, tmp_path, monkeypatch, capsys):
    from fastnefes.data import write_scene

    from fastnefes.data import load_scene

    images, K, init, singles = queries
    data = tmp_path / "data"
    write_scene(tiny_scene, data, "7scenes")
    scene = load_scene(data)
    test = scene.split("test")
    assert all(np.array_equal(scene.image(i), images[k]) for k, i in enumerate(test))  # the same queries
    names = [scene.names[i] for i in test]
    write_poses(tmp_path / "init.txt", dict(zip(names, init)))
    code, out, err = run_main(monkeypatch, capsys, "query", server, "--data", str(data), "--init", str(tmp_path / "init.txt"),
                              "--out", str(tmp_path / "refined.txt"), "--concurrency", "4")
    assert code == 0, err
    refined = read_poses(tmp_path / "refined.txt")
    assert list(refined) == names
    _assert_own_results([refined[n] for n in names], init, singles)
    report = json.loads((tmp_path / "refined.json").read_text())
    assert [q["name"] for q in report["queries"]] == names and report["config"]["iters"] == SETTINGS["iters"]
    assert {"p50", "p95"} <= set(report["latency_ms"]) and "after" in report["evaluation"]
    assert sum(report["status_counts"].values()) == len(names)
    # A query the server refuses: one line naming it, nothing written.
    code, _, err = run_main(monkeypatch, capsys, "query", server, "--data", str(data), "--init", str(tmp_path / "init.txt"),
                            "--out", str(tmp_path / "x.txt"), "--settings", '{"iters": -3}')
    assert code == 2 and "settings.iters" in err and not (tmp_path / "x.txt").exists()


# ---- without a server -------------------------------------------------------------------------
def _fake_refine(calls):
    """A refine function that moves each pose by its image's first pixel and raises on 255."""
    def refine(config, images, K, c2w):
        calls.append((images.shape, config.iters))
        if (images[:, 0, 0, 0] == 255).any():
            raise RuntimeError("poisoned query")
        poses = c2w.copy()
        poses[:, 0, 3] += images[:, 0, 0, 0]
        diags = [QueryDiagnostics(1.0, 0.5, config.iters, 0.0, "converged") for _ in images]
        return RefineResult(poses, c2w, diags)
    return refine


def test_batcher_groups_by_size_and_settings_and_isolates_a_failing_query():
    from fastnefes.serve.batcher import DynamicBatcher

    calls = []
    batcher = DynamicBatcher(_fake_refine(calls), max_batch=8, max_wait_s=0.5)
    a, b = RefineConfig(iters=3), RefineConfig(iters=4)
    jobs = [(np.full((4, 6, 3), v, np.uint8), cfg) for v, cfg in ((1, a), (2, a), (255, a), (3, b))]
    jobs.append((np.full((5, 6, 3), 4, np.uint8), a))
    futures = [batcher.submit(img, np.eye(3), np.eye(4), cfg) for img, cfg in jobs]  # queued before the worker starts
    gone = batcher.submit(jobs[0][0], np.eye(3), np.eye(4), a)
    assert gone.cancel()  # its caller gave up before the worker took it: dropped, not refined
    batcher.start()
    try:
        answers = []
        for f in futures[:2] + futures[3:]:
            answers.append(f.result(timeout=10))
        with pytest.raises(RuntimeError, match="poisoned"):
            futures[2].result(timeout=10)
    finally:
        batcher.stop()
    assert [ans.result.poses[0, 0, 3] for ans in answers] == [1, 2, 3, 4]  # each its own result
    assert calls[0] == ((3, 4, 6, 3), 3)  # the three 4x6 iters-3 queries in one batch (it raised) ...
    assert sorted(calls[1:]) == sorted([((1, 4, 6, 3), 3)] * 3 + [((1, 4, 6, 3), 4), ((1, 5, 6, 3), 3)])  # ... then alone
    counters = batcher.counters()
    assert counters["answered"] == 5 and counters["errors"] == 1 and counters["cancelled"] == 1
    assert counters["gathered_sizes"] == {"6": 1} and counters["in_flight"] == 0


def test_batcher_window_opens_when_the_worker_takes_a_query():
    """Queries that waited for the worker still wait max_wait for company: a query sent just
    after the worker became free (as a closed-loop client answered by the last batch sends its
    next) joins them, although the oldest arrived long before."""
    import time

    from fastnefes.serve.batcher import DynamicBatcher

    calls = []
    batcher = DynamicBatcher(_fake_refine(calls), max_batch=8, max_wait_s=1.0)
    img, cfg = np.full((4, 6, 3), 1, np.uint8), RefineConfig(iters=3)
    futures = [batcher.submit(img, np.eye(3), np.eye(4), cfg) for _ in range(2)]
    time.sleep(1.2)  # the queued queries are older than max_wait
    batcher.start()
    try:
        time.sleep(0.05)
        futures.append(batcher.submit(img, np.eye(3), np.eye(4), cfg))
        for f in futures:
            f.result(timeout=10)
    finally:
        batcher.stop()
    assert calls == [((3, 4, 6, 3), 3)] and batcher.counters()["gathered_sizes"] == {"3": 1}


def test_wire_pose_round_trip_and_image_headers():
    c2w = perturb_poses(np.eye(4)[None], 30.0, 2.0, seed=1)[0]
    assert np.allclose(pose_from_wire(pose_to_wire(c2w)), c2w, atol=1e-12)
    with pytest.raises(WireError, match="quaternion norm"):
        pose_from_wire([0.5, 0, 0, 0, 0, 0, 0])
    image = np.random.default_rng(0).integers(0, 255, (13, 17, 3), dtype=np.uint8)
    assert image_size(encode_png(image)) == (17, 13)
    import cv2

    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok and image_size(jpeg.tobytes()) == (17, 13)
    assert np.array_equal(decode_image(encode_png(image), 17, 13), image)  # lossless, RGB order kept
    with pytest.raises(WireError, match="17x13 but the camera is 16x13"):
        decode_image(encode_png(image), 16, 13)


def test_missing_extra_is_one_line(monkeypatch):
    import importlib.util

    from fastnefes.serve import require_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(FastnefesError, match=r"uvicorn not installed\): pip install 'fastnefes\[serve\]'"):
        require_extra()
