"""The README's main command (scripts/run_example.sh minus its idempotent setup): on a ComfyUI with
only the pack installed, the default template merges two shipped concept LoRAs of the sprite world,
writes a merged LoRA and pictures of the two side by side, and prints the detector's verdict on each
picture for both concepts; in at least one picture it finds both, each in its own half."""
import os
import re
import subprocess
import sys

import pytest

from _harness import COMFY, ROOT

CONCEPTS = ("sks creature: teal/red", "zwx robot: blue/orange")


@pytest.fixture(scope="module")
def main_command(tmp_path_factory):
    out = tmp_path_factory.mktemp("main")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_example.py"), "--comfy", str(COMFY),
                           "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _verdicts(stdout):
    return [line for line in stdout.splitlines() if line.strip().startswith("detector:")]


def test_main_command_writes_the_merge_and_a_verdict_per_picture(main_command):
    assert "merged LoRA:" in main_command and "image:" in main_command, main_command
    for line in main_command.splitlines():  # the paths it prints are the files it wrote
        if line.startswith(("merged LoRA: ", "image: ")):
            assert os.path.isfile(line.split(": ", 1)[1]), line
    verdicts = _verdicts(main_command)
    assert len(verdicts) == 4, main_command
    for v in verdicts:  # each concept judged, and what the detector saw, on every picture
        for c in CONCEPTS:
            assert re.search(re.escape(c) + r" (FOUND|not found)", v), v
        assert "(detector sees: " in v, v


def test_main_command_draws_both_concepts(main_command):
    both = [v for v in _verdicts(main_command)
            if f"{CONCEPTS[0]} FOUND (left)" in v and f"{CONCEPTS[1]} FOUND (right)" in v]
    assert both, main_command
