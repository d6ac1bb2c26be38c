"""Named presets and --config files for train (refine's: tests/test_refine_cli via RefineConfig.preset)."""

from __future__ import annotations

import json

import pytest

from conftest import run_main
from fastnefes.errors import FastnefesError
from fastnefes.train.config import TRAIN_PRESETS, TrainConfig, train_config


def test_train_presets_are_documented_configs():
    assert train_config().to_dict() == TrainConfig.for_arch("hash").to_dict()  # default = the defaults
    quick = train_config(preset="quick")
    assert quick.steps == TRAIN_PRESETS["quick"]["steps"] and quick.batch_samples == TRAIN_PRESETS["quick"]["batch_samples"]
    assert train_config(preset="long").steps > TrainConfig().steps
    # a file's settings over the preset, keyword fields over the file; model fields nested
    cfg = train_config("hash", "quick", {"steps": 50, "model": {"feature_dim": 8}}, steps=60)
    assert cfg.steps == 60 and cfg.model.feature_dim == 8 and cfg.batch_samples == TRAIN_PRESETS["quick"]["batch_samples"]
    assert train_config("mlp").model.arch == "mlp"


@pytest.mark.parametrize("overrides, needle", [
    ({"stepz": 3}, "stepz"), ({"model": {"grdi": {}}}, "model.grdi"), ({"model": 3}, "model"), ({"steps": -1}, "steps"),
])
def test_train_config_errors_name_the_setting(overrides, needle):
    with pytest.raises(FastnefesError, match=needle):
        train_config(overrides=overrides, where="cfg.json")


def test_train_cli_rejects_bad_config_files(monkeypatch, capsys, tmp_path):
    tiny_dataset = tmp_path  # the settings are checked before the data is read
    bad = tmp_path / "bad.json"
    for text, needle in (('{"stepz": 1}', "stepz"), ("[1, 2]", "JSON object"), ("{not json", "not valid JSON")):
        bad.write_text(text)
        code, out, err = run_main(monkeypatch, capsys, "train", str(tiny_dataset), "--out", str(tmp_path / "run"),
                                  "--config", str(bad))
        assert code == 2 and needle in err and str(bad) in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_main(monkeypatch, capsys, "train", str(tiny_dataset), "--out", str(tmp_path / "run"), "--preset", "huge")
    assert code == 2 and "quick, default, long" in err
    assert not (tmp_path / "run").exists()


def test_refine_presets_and_config_files(monkeypatch, capsys, tmp_path):
    from fastnefes.refine.config import PRESETS, RefineConfig, checked_config

    # default = direct = the defaults: direct alignment of features, then of colours
    assert RefineConfig.preset("default").to_dict() == RefineConfig().to_dict() == RefineConfig.preset("direct").to_dict()
    default = RefineConfig()
    assert default.method == "direct" and default.polish_method == "direct" and default.iters < 20
    nefes = RefineConfig.preset("nefes")  # NeFeS: Adam on the features, a Levenberg-Marquardt polish
    assert nefes.method == "adam" and nefes.polish_method == "lm" and nefes.iters == 150
    fast = RefineConfig.preset("fast")
    assert fast.method == "adam" and fast.iters < nefes.iters and fast.polish_iters < nefes.polish_iters
    assert RefineConfig.preset("lm").method == "lm" and set(PRESETS) == {"default", "direct", "nefes", "fast", "lm"}
    cfg = checked_config({"iters": 7, "loss": "robust"}, "f.json", base=RefineConfig.preset("fast"))
    assert cfg.iters == 7 and cfg.loss == "robust" and cfg.polish_iters == fast.polish_iters
    for bad, needle in (({"iterz": 1}, "iterz"), ({"iters": 1.5}, "iters"), ({"loss": "l3"}, "loss"),
                        ({"polish_levels": 0}, "polish_levels"), ([1], "JSON object")):
        with pytest.raises(FastnefesError, match=needle):
            checked_config(bad, "f.json")
    # the CLI: a bad file or preset is one line, exit 2, before any data or run is read
    bad = tmp_path / "refine.json"
    bad.write_text(json.dumps({"iters": "many"}))
    code, _, err = run_main(monkeypatch, capsys, "refine", str(tmp_path), "--data", str(tmp_path), "--init", str(bad),
                            "--out", str(tmp_path / "r.txt"), "--config", str(bad))
    assert code == 2 and str(bad) in err and "iters" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_main(monkeypatch, capsys, "refine", str(tmp_path), "--data", str(tmp_path), "--init", str(bad),
                            "--out", str(tmp_path / "r.txt"), "--preset", "turbo")
    assert code == 2 and "default, direct, nefes, fast, lm" in err
    # The APR target is refined by Adam on the APR's weights: nefes unless told otherwise, and a
    # method without a gradient through the APR is refused before anything is read.
    for extra in (["--method", "direct"], ["--preset", "default"]):
        code, _, err = run_main(monkeypatch, capsys, "refine", str(tmp_path), "--data", str(tmp_path), "--target", "apr",
                                "--apr", str(tmp_path), "--out", str(tmp_path / "r.txt"), *extra)
        assert code == 2 and "--target apr is refined by Adam" in err and len(err.strip().splitlines()) == 1, err
