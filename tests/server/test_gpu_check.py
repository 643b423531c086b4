"""scripts/gpu_check.py --dry-run end to end on the CPU: the script a GPU session runs is known to
work before a GPU sees it. It prepares (or reuses) the carried folder with
scripts/prepare_gpu_carry.py, sets up from it in a fresh work folder as on the GPU machine, runs
every step with its dry-run sizes and checks the summary: every step passed and gave its figures,
the GPU run's executor test ids all exist, the files the device tool brings back are there."""
import json
import os
import subprocess
import sys

import torch

from _harness import ROOT, COMFY

sys.path.append(str(ROOT / "scripts"))
import gpu_check  # noqa: E402

MAX_FILES_BACK = 8  # the device tool returns at most eight files from $OUT


def test_dry_run_passes_every_step_and_writes_the_summary(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(COMFY))
    env.pop("LORACLR_TEST_DEVICE", None)
    prep = subprocess.run([sys.executable, "scripts/prepare_gpu_carry.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out), "--work",
                        str(tmp_path / "work"), "--budget", "1500", "--deadline", "1700"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    summary = json.loads((out / "summary.json").read_text())
    md = (out / "summary.md").read_text()
    assert p.returncode == 0 and summary["result"] == "passed", md + p.stdout[-3000:] + p.stderr[-3000:]
    assert summary["dry_run"] and summary["finished"]
    assert summary["setup"]["status"] == "passed" and summary["comfyui_version"]
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["env", "gpu_tests", "executor_cuda", "merge_speed", "train_speed", "merge_scale"]
    assert all(s["status"] == "passed" and s["seconds"] > 0 for s in steps.values()), md
    # planned H100 times are written next to each step and fit in the 9 minutes
    assert all(s["planned_s"] > 0 for s in steps.values()) and summary["planned_total_s"] <= 540
    assert summary["env"]["torch"] == torch.__version__ and summary["env"]["cuda_available"] == torch.cuda.is_available()
    gpu = steps["gpu_tests"]["tests"]
    if not torch.cuda.is_available():  # collected, all skipped with the reason
        assert gpu["skipped"] == 9 and gpu["passed"] == gpu["failed"] == gpu["errors"] == 0, gpu
    ex = steps["executor_cuda"]
    # every id the GPU run names exists: 1 + 5 stock-loader tests, 3 stages, 2 all-stages, 3 + 1 saves
    # reloaded, 3 CAT training under the executor, 1 fused against split
    assert ex["collected"] == 19
    assert ex["tests"]["passed"] == len(gpu_check.EXECUTOR_TESTS_DRY) and not ex["tests"]["failed"] and not ex["tests"]["errors"], ex["tests"]
    assert steps["merge_speed"]["figures"]["ratio"] > 0
    assert steps["merge_speed"]["figures"]["objective_ours"] > 0
    assert steps["train_speed"]["figures"]["cat_over_plain_time"] > 0
    assert steps["merge_scale"]["figures"]["n"] == 2 and steps["merge_scale"]["figures"]["device"] == "cpu"
    for name in steps:
        assert f"| {name} | passed |" in md, md
    back = [f for f in out.rglob("*") if f.is_file()]
    assert len(back) <= MAX_FILES_BACK and {"summary.json", "summary.md", "steps.log"} <= {f.name for f in back}
    assert "===== merge_scale" in (out / "steps.log").read_text()
