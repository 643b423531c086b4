"""scripts/gpu_check.py --dry-run end to end on the CPU: the script a GPU session runs is known to
work before a GPU sees it. It prepares (or reuses) the carried folder with
scripts/prepare_gpu_carry.py, sends each call's folder alone as the device tool would (the calls
before the last staged with --stage into one work folder, the last running the check), runs every
step with its dry-run sizes and checks the summary: every step passed and gave its figures, the
GPU run's executor test ids all exist, the files the device tool brings back are there."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from _harness import ROOT, COMFY

sys.path.append(str(ROOT / "scripts"))
import carry_parts  # noqa: E402
import gpu_check  # noqa: E402
import prepare_gpu_carry  # noqa: E402

MAX_FILES_BACK = 8  # the device tool returns at most eight files from $OUT


def test_dry_run_passes_every_step_and_writes_the_summary(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(COMFY))
    env.pop("LORACLR_TEST_DEVICE", None)
    prep = subprocess.run([sys.executable, "scripts/prepare_gpu_carry.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    carry = ROOT / ".gpu_carry"
    n = json.loads((carry / "call1" / "manifest.json").read_text())["calls"]
    tree = prepare_gpu_carry.working_tree_bytes()
    for k in range(1, n + 1):  # every call fits the device tool's limit with the working tree
        assert tree + prepare_gpu_carry.folder_bytes(carry / f"call{k}") <= prepare_gpu_carry.LIMIT_MIB * 2 ** 20
    assert f"calls={n}" in prep.stdout

    def sent(k):  # what call k sends: its own folder, nothing else of .gpu_carry
        d = tmp_path / f"sent{k}"
        shutil.copytree(carry / f"call{k}", d / f"call{k}")
        return str(d)

    work, out = tmp_path / "work", tmp_path / "out"
    check = [sys.executable, "scripts/gpu_check.py", "--dry-run", "--work", str(work), "--budget", "1500",
             "--deadline", "1700"]
    last = sent(n)
    if n > 1:  # the last call alone, the earlier ones not staged: setup fails and names them
        early = subprocess.run(check + ["--out", str(tmp_path / "early"), "--carry", last], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
        failed = json.loads((tmp_path / "early" / "summary.json").read_text())
        assert early.returncode == 1 and failed["setup"]["status"] == "failed"
        assert f"call(s) {list(range(1, n))} of {n} are not on this machine" in failed["setup"]["error"]
    for k in range(1, n):
        st = subprocess.run([sys.executable, "scripts/gpu_check.py", "--stage", "--out", str(out), "--carry", sent(k),
                             "--work", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        here = sorted(set(range(1, k + 1)) | {n})  # the failed run above staged the last call's pieces
        assert st.returncode == 0 and f"call(s) {here} of {n} are here" in st.stdout, st.stdout + st.stderr
    p = subprocess.run(check + ["--out", str(out), "--carry", last], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1800)
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


def _files(tmp_path, sizes):
    build = tmp_path / "build"
    files = []
    for i, size in enumerate(sizes):
        data = bytes((i * 7 + j) % 251 for j in range(size))
        name = f"wheels/f{i}.whl" if i else "comfyui.tar.gz"
        (build / name).parent.mkdir(parents=True, exist_ok=True)
        (build / name).write_bytes(data)
        files.append({"name": name, "bytes": size, "sha256": hashlib.sha256(data).hexdigest()})
    return build, {"files": files}


def test_pieces_fill_each_call_and_put_the_files_back_together(tmp_path):
    """Worked by hand: files of 5, 0, 12 and 3 bytes in calls of 8 bytes: call 1 holds the first
    file, the empty one and 3 bytes of the third; call 2 the third's next 8 bytes; call 3 its last
    byte and the fourth file. Staged one call at a time into one work folder, the files come back
    byte for byte; a damaged piece is refused and named."""
    plan = carry_parts.plan_pieces([("a", 5), ("b", 0), ("c", 12), ("d", 3)], 8)
    assert [[(p["file"], p["offset"], p["bytes"]) for p in call] for call in plan] == [
        [("a", 0, 5), ("b", 0, 0), ("c", 0, 3)], [("c", 3, 8)], [("c", 11, 1), ("d", 0, 3)]]
    with pytest.raises(ValueError):
        carry_parts.plan_pieces([("a", 1)], 0)

    build, manifest = _files(tmp_path, [5, 0, 12, 3])
    dest = tmp_path / "carry"
    full = carry_parts.write_calls(build, dest, manifest, 8)
    assert full["calls"] == 3 and sorted(p.name for p in dest.iterdir()) == ["call1", "call2", "call3"]
    assert all(sum(p["bytes"] for p in full["pieces"] if p["call"] == k) <= 8 for k in (1, 2, 3))
    work = tmp_path / "work"
    for k in (1, 2):
        one = tmp_path / f"sent{k}"
        shutil.copytree(dest / f"call{k}", one / f"call{k}")
        st = carry_parts.stage(one, work)
        assert st["complete"] == list(range(1, k + 1)) and st["missing"] == list(range(k + 1, 4))
    with pytest.raises(RuntimeError, match=r"call\(s\) \[3\] of 3 are not on this machine"):
        carry_parts.assemble(tmp_path / "sent2", work)
    shutil.copytree(dest / "call3", tmp_path / "sent3" / "call3")
    back = carry_parts.assemble(tmp_path / "sent3", work)
    for f in manifest["files"]:
        assert (back / f["name"]).read_bytes() == (build / f["name"]).read_bytes()
    assert json.loads((back / "manifest.json").read_text())["calls"] == 3

    # a damaged piece: refused with its name, nothing staged from it
    bad = tmp_path / "bad"
    shutil.copytree(dest / "call2", bad / "call2")
    piece = next(p for p in full["pieces"] if p["call"] == 2)
    data = bytearray((bad / "call2" / piece["name"]).read_bytes())
    data[0] ^= 1
    (bad / "call2" / piece["name"]).write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=piece["name"]):
        carry_parts.stage(bad, tmp_path / "work2")
    assert not (tmp_path / "work2" / "pieces" / piece["name"]).exists()

    # prepared again with more room: fewer calls, the stale folder removed
    assert carry_parts.write_calls(build, dest, manifest, 20)["calls"] == 1
    assert sorted(p.name for p in dest.iterdir()) == ["call1"]
