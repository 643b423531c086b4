"""The README's main command (scripts/run_example.sh minus its idempotent setup): the default
template runs headless on a real server and writes a merged LoRA and an image."""
import subprocess
import sys

from _harness import COMFY, ROOT


def test_main_command_runs_the_default_template(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_example.py"), "--comfy", str(COMFY),
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "merged LoRA:" in proc.stdout and "image:" in proc.stdout, proc.stdout
