"""bench/evidence.py --quick as a test: it trains two concept LoRAs with Train CAT LoRA (cached
by stamp), merges them with every method and checks what must hold whatever the numbers (one
concept merged with sum keeps retention 1 and fidelity 0; a LoRA merged with its identical copy
keeps retention >= 0.99 with least_squares; a trained LoRA beats the base on held-out images)."""
import json
import os
import re
import subprocess
import sys

from _harness import COMFY, ROOT


def test_evidence_quick_run(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(COMFY))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "evidence.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    m = re.fullmatch(r"evidence: n=2 retention_sum=(\S+) retention_lsq=(\S+) retention_loraclr=(\S+) "
                     r"kp_cat_over_plain=(\S+)", lines[-1])
    assert m, lines[-1]
    assert sum("check:" in ln for ln in lines) >= 4
    assert {r["token_rows"] for r in results_rows(tmp_path)} == {"all", "trigger"}
    results = json.load(open(tmp_path / "results.json"))
    methods = {r["method"] for r in results["merges"]}
    assert {"sum", "average", "least_squares", "loraclr_official", "loraclr"} <= methods
    pairs = {(r["preset"], r["method"]) for r in results["merges"]}
    assert {("all", m) for m in ("sum", "average", "least_squares", "loraclr_official", "loraclr")} <= pairs
    assert {("cross_attention", f"loraclr_norm_m{m}") for m in ("0.1", "0.5", "1")} <= pairs  # quick: not in "all"
    official = [r for r in results["merges"] if r["method"] == "loraclr_official"]
    assert all(r["iterations"] > 0 for r in official)  # the original start really iterates
    for name in ("cat_vs_plain.png", "retention_vs_n_cross_attention.png", "retention_vs_n_all.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # the reported means are the means of the per-concept values
    for r in results["merges"]:
        vals = [c["fidelity"] for c in r["concepts"]]
        assert abs(r["fidelity"]["mean"] - sum(vals) / len(vals)) < 1e-9


def results_rows(path):
    return json.load(open(path / "results.json"))["token_rows"]
