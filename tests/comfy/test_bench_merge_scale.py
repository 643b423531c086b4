"""bench/merge_scale.py at its tiny size: the attention its last line names is the one ComfyUI ran,
chosen by the launch flag --attention sets (its figures are not judged here: a 32-channel UNet)."""
import os
import re
import subprocess
import sys

import pytest

from _harness import COMFY, ROOT


@pytest.mark.parametrize("choice, function", [("pytorch", "attention_pytorch"), ("split", "attention_split")])
def test_the_last_line_names_the_attention_the_flag_chose(choice, function):
    env = dict(os.environ, COMFYUI_PATH=str(COMFY))
    env.pop("LORACLR_TEST_DEVICE", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "merge_scale.py"), "--tiny", "--ns", "2",
                           "--attention", choice], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"merge_scale: n=2 peak_gib=\S+ seconds=\S+ device=cpu px=64 attention=(\w+)", last)
    assert m, last
    assert m.group(1) == function
