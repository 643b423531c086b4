"""bench/train_speed.py as a test, at a tiny size: all three sides (this pack's plain and CAT
training, ComfyUI's own TrainLoraNode) run to the end on the ComfyUI under test, so the benchmark
keeps working with whichever TrainLoraNode API that ComfyUI has (0.3.75: MODEL output; 0.33: five
more inputs, no MODEL output). The figures themselves are not judged here (2 training steps)."""
import math
import os
import re
import subprocess
import sys

from _harness import COMFY, ROOT


def test_train_speed_runs_all_three_sides():
    env = dict(os.environ, COMFYUI_PATH=str(COMFY))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_speed.py"), "--comfy", str(COMFY),
                           "--size", "8", "--steps", "1", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    for mode in ("plain", "cat", "comfy"):
        assert any(re.match(rf"{mode}\s+step\s+\S+ ms\s+peak extra RSS\s+\d+ MiB", ln) for ln in lines), lines
    m = re.fullmatch(r"train_speed: cat_over_plain_time=(\S+) cat_over_plain_mem=(\S+) plain_over_comfy_time=(\S+)",
                     lines[-1])
    assert m, lines[-1]
    # step times are differences of two runs, so with 1 and 2 steps a ratio may be any sign; they
    # must be numbers (a side that trained nothing or failed silently gives nan or inf)
    assert all(math.isfinite(float(v)) for v in m.groups()), lines[-1]
