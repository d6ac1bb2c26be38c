"""The culling pre-pass schedule: the pre-pass changes no rendered value, and runs only while it
culls more than it costs."""

from __future__ import annotations

import copy

import torch

from conftest import query_views
from fastnefes.ops.occgrid.culling import CullSchedule
from fastnefes.render import render_image


def test_schedule_runs_while_it_pays_and_probes_otherwise():
    schedule = CullSchedule(break_even=0.3, probe_every=3)
    assert schedule.due()  # the first render measures
    schedule.record(100, 95)  # culled 5%: costs more than it saves
    assert [schedule.due() for _ in range(4)] == [False, False, False, True]  # the fourth probes again
    schedule.record(100, 50)  # culled half: worth it
    assert schedule.due() and schedule.due()
    schedule.record(0, 0)  # nothing marched: no measurement
    assert schedule.culled_fraction == 0.5
    restored = CullSchedule()
    restored.load_state_dict(schedule.state_dict() | {"unknown": 1})
    assert restored == schedule


def test_renders_are_the_same_with_and_without_the_prepass(tiny_run, tiny_scene):
    _, trained = tiny_run
    model = copy.deepcopy(trained).eval()
    # Rays march on behind opaque surfaces: the pre-pass has work to do.
    model.occupancy.binaries.fill_(True)
    model.geometry.density_bias += 4.0
    _, K, c2w = query_views(tiny_scene, 2)
    K, c2w = torch.tensor(K, dtype=torch.float32), torch.tensor(c2w, dtype=torch.float32)
    H, W = (int(v) for v in tiny_scene.hw[0])
    outs = {}
    for name, break_even in (("always", 0.0), ("never", 2.0)):
        model.occupancy.culling = CullSchedule(break_even=break_even, probe_every=10**9)
        with torch.no_grad():
            outs[name] = render_image(model, K, c2w, H, W)
        if name == "always":
            assert model.occupancy.culling.culled_fraction > 0.3
        else:
            assert model.occupancy.culling.skipped > 0 and model.occupancy.culling.culled_fraction == 1.0
    for key in ("rgb", "features", "fused", "depth", "opacity"):
        torch.testing.assert_close(outs["always"][key], outs["never"][key], rtol=0, atol=1e-5)
