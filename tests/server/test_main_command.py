"""The README's main command (scripts/run_example.sh minus its idempotent setup): on a ComfyUI with
only the pack installed, the default template merges two shipped concept LoRAs of the sprite world,
writes a merged LoRA and pictures, and the detector finds both concepts in a picture."""
import subprocess
import sys

from _harness import COMFY, ROOT


def test_main_command_draws_both_concepts(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_example.py"), "--comfy", str(COMFY),
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "merged LoRA:" in proc.stdout and "image:" in proc.stdout, proc.stdout
    verdicts = [line for line in proc.stdout.splitlines() if line.strip().startswith("detector:")]
    assert len(verdicts) == 4, proc.stdout
    both = [v for v in verdicts if "sks creature: teal/red FOUND" in v and "zwx robot: blue/orange FOUND" in v]
    assert both, proc.stdout
