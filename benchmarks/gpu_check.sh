#!/usr/bin/env bash
# Every GPU check in one call on a CUDA machine, at most 8 minutes (run from the repository root):
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
# 0. installs the wheels carried in .whl/ (e.g. nerfacc) into /tmp/site, when there are any;
# 1. builds the native kernels, CPU and CUDA launchers (`fastnefes doctor --build`);
# 2. runs the CUDA parity tests (tests/test_native_cuda.py; nerfacc and tinycudann against torch
#    where installed);
# 3. op benchmarks on CUDA (benchmarks/ops.py): native hash grid, compositing and march against
#    torch, and against tinycudann / nerfacc where installed;
# 4. trains the default synthetic room (`fastnefes synth room`, `fastnefes bench train --archs
#    hash --stop-when-reached`): seconds to 20 and 25 dB;
# 5. `fastnefes bench refine` of that run with the default refinement settings (preset "fast",
#    RefineConfig's defaults): single-query latency p50 and batched throughput.
# Each stage has a time limit (they sum to 7.6 minutes) and a failing stage does not stop the
# others. RESULTS_DIR (default benchmarks/results)/gpu_check_<device>.json names the device and
# holds every stage's exit status, seconds and figures; the logs are in $WORK.
set -uo pipefail
RESULTS=${1:-benchmarks/results}
WORK=${WORK:-/tmp/fastnefes-gpu-check}
rm -rf "$WORK"
mkdir -p "$RESULTS" "$WORK"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" || exit 1

# stage NAME SECONDS COMMAND...: run under the time limit, keep the log, record status and seconds.
stage() {
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$WORK/stages.tsv"
  tail -n 30 "$WORK/$name.log"
}

stage build 120 python3 -m fastnefes doctor --build
stage tests 60 python3 -m pytest -q -p no:warnings -p no:cacheprovider -k "cuda or nerfacc or tcnn" \
  tests/test_native_cuda.py tests/test_ops_occgrid.py tests/test_ops_hashgrid.py
stage ops 45 python3 benchmarks/ops.py --device cuda --repeats 20 --json "$WORK/ops.json"
stage synth 30 python3 -m fastnefes synth "$WORK/room" --format 7scenes
stage train 110 python3 -m fastnefes bench train "$WORK/room" --archs hash --minutes-hash 1.5 --psnr 20,25 \
  --stop-when-reached --save-runs "$WORK/runs" --device cuda --json "$WORK/train.json"
stage refine 90 python3 -m fastnefes bench refine "$WORK/runs/hash" --data "$WORK/room" --presets fast \
  --device cuda --json "$WORK/refine.json"

WORK="$WORK" RESULTS="$RESULTS" python3 - <<'PY'
"""Gather the stages into RESULTS/gpu_check_<device>.json, with the headline figures first."""
import json
import os
from pathlib import Path

import torch

from fastnefes.bench.environment import device_slug, git_commit
from fastnefes.io import write_json

work, results = Path(os.environ["WORK"]), Path(os.environ["RESULTS"])


def load(name):
    path = work / name
    return json.loads(path.read_text()) if path.exists() else None


stages = {}
for line in (work / "stages.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    stages[name] = {"exit_status": int(rc), "seconds": int(seconds),
                    "log_tail": (work / f"{name}.log").read_text(errors="replace")[-2000:]}
ops, train, refine = load("ops.json"), load("train.json"), load("refine.json")
summary = {}
for row in (ops or {}).get("rows", []):
    key = f"{row['op']} {row['config']} {row['pass']}"
    summary[key] = {k: round(v, 3) for k, v in row.items() if k.endswith("_ms")}
    for other in ("torch", "tcnn", "nerfacc"):
        if f"{other}_ms" in row:
            summary[key][f"{other}/native"] = round(row[f"{other}_ms"] / row["native_ms"], 2)
try:  # the headline figures; the full JSON of each benchmark follows whatever its layout
    if train:
        hash_row = train["archs"]["hash"]
        summary["train room: seconds to PSNR"] = hash_row["time_to_psnr_s"]
        summary["train room: best val PSNR"] = hash_row["best_psnr"]
    if refine:
        row = next(iter(refine["rows"].values()))
        summary["refine: latency ms (one query)"] = row["latency_ms"]
        summary["refine: queries/s by batch"] = {t["batch"]: t["queries_per_s"] for t in row["throughput"]}
except (KeyError, TypeError, StopIteration) as exc:
    summary["summary error"] = f"{type(exc).__name__}: {exc}"
out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
       "commit": git_commit(), "summary": summary, "stages": stages, "ops": ops, "train": train, "refine": refine}
path = results / f"gpu_check_{device_slug(torch.device('cuda'))}.json"
write_json(path, out)
print(json.dumps({"device": out["device"], "summary": summary,
                  "stages": {k: (v["exit_status"], v["seconds"]) for k, v in stages.items()}}, indent=1))
print(f"written {path}")
PY
