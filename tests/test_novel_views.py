"""Novel views from a trained field, for APR training."""

import numpy as np

from fastnefes.apr import novel_views_from_run


def test_novel_views_render_the_scene(tiny_run, tiny_scene):
    run_dir, _ = tiny_run
    render = novel_views_from_run(run_dir, tiny_scene)
    images, c2w, K = render(4, np.random.default_rng(0))
    assert images.shape == (4, 48, 64, 3) and images.dtype == np.uint8 and c2w.shape == (4, 4, 4) and K.shape == (4, 3, 3)
    # At a training pose the rendering must look like the training image (the field is trained).
    from fastnefes.novel_views import novel_view_renderer

    i = tiny_scene.split("train")[0]
    img, _, _ = novel_view_renderer(run_dir, tiny_scene)(tiny_scene.c2w[i : i + 1])
    mse = np.mean((img[0].astype(float) - tiny_scene.image(i).astype(float)) ** 2) / 255.0**2
    assert 10 * np.log10(1.0 / mse) > 16.0
