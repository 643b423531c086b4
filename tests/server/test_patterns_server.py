"""A layer pattern from a shared workflow never hangs the server: a pattern that backtracks without
end is refused when the prompt is queued, or stopped (with the field named) when it runs, while the
server keeps answering /system_stats and /interrupt and runs the next prompt."""
import sys
import threading
import time

import pytest
import requests

from _harness import COMFY, ROOT, train_prompt

sys.path.insert(0, str(ROOT / "scripts"))
import comfy_client  # noqa: E402

# Runs past any limit on a layer key with a backtracking engine (regex's too: it is the timeout that stops it).
CATASTROPHIC = r"(.*?){30}\d{9}"
# Harmless on keys without "middle_block" (so it passes the queue-time probe), catastrophic on the
# micro model's middle-block keys at run time.
LATE_CATASTROPHE = r"middle_block(.*?){30}\d{9}"
# Hangs Python's re on a layer key; the regex engine answers it at once (it matches nothing).
RE_HANG = "(.*.*)*#"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("patterns")
    with comfy_client.ComfyServer(str(COMFY), output_dir=str(out), log_path=str(out / "server.log")) as s:
        yield s


def collect_prompt(layer_filter):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "loraclr_micro_sd15.safetensors"}},
        "2": {"class_type": "LoRACLRConcept", "inputs": {"lora_name": "loraclr_test/concept_a_kohya.safetensors",
                                                         "strength_model": 1.0, "strength_clip": 1.0,
                                                         "trigger": "sks", "prompts": "photo of a {}"}},
        "3": {"class_type": "LoRACLRCollectActivations", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concepts": ["2", 0], "stage": "spatial",
            "inputs_from": "concept_lora", "layer_filter": layer_filter, "only_lora_layers": False, "steps": 2,
            "record_steps": 2, "width": 64, "height": 64, "seed": 0}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }


def renumber(prompt, offset):
    """The same API prompt with every node id (and every link to one) moved up by ``offset``."""
    def move(v):
        return [str(int(v[0]) + offset), v[1]] if isinstance(v, list) and len(v) == 2 else v
    return {str(int(k) + offset): dict(n, inputs={name: move(v) for name, v in n["inputs"].items()})
            for k, n in prompt.items()}


class Watch:
    """Polls /system_stats in a thread and records the slowest answer."""

    def __init__(self, url):
        self.url, self.worst, self.failures, self.stop = url, 0.0, 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop:
            t = time.time()
            try:
                requests.get(self.url + "/system_stats", timeout=5).raise_for_status()
            except requests.RequestException:
                self.failures += 1
            self.worst = max(self.worst, time.time() - t)
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def test_catastrophic_patterns_are_refused_at_queue_time(server):
    prompt = collect_prompt(CATASTROPHIC)
    prompt.update(renumber(train_prompt("loraclr_pytest_never/x", 2, None, 1e-4, layer_pattern=CATASTROPHIC), 10))
    with Watch(server.url) as watch:
        t = time.time()
        r = requests.post(server.url + "/prompt", json={"prompt": prompt}, timeout=60)
        took = time.time() - t
    assert r.status_code == 400, r.text[:500]
    details = {nid: " ".join(e["details"] for e in v["errors"]) for nid, v in r.json()["node_errors"].items()}
    assert "field 'layer_filter'" in details["3"] and "took longer" in details["3"], details
    assert "[Collect LoRA Activations]" in details["3"]
    assert "field 'layer_pattern'" in details["14"] and "[Train CAT LoRA]" in details["14"], details
    assert took < 5 and watch.failures == 0 and watch.worst < 2, (took, watch.worst)


def test_a_pattern_that_runs_away_on_real_keys_stops_with_the_field_named(server):
    with Watch(server.url) as watch:
        hist_box = {}
        runner = threading.Thread(target=lambda: hist_box.update(
            h=comfy_client.run_prompt(server.url, collect_prompt(LATE_CATASTROPHE), timeout=300)))
        runner.start()
        time.sleep(1.0)
        assert requests.post(server.url + "/interrupt", timeout=5).ok  # answered while the prompt runs
        runner.join(300)
    hist = hist_box["h"]
    assert hist["status"]["status_str"] == "error"
    msgs = [m for kind, m in hist["status"]["messages"] if kind == "execution_error"]
    if msgs:  # the interrupt may land first; when the pattern is reached, its error names the field
        text = msgs[0]["exception_message"]
        assert "[Collect LoRA Activations] field 'layer_filter'" in text and "took longer" in text, text
    assert watch.failures == 0 and watch.worst < 2, watch.worst
    # and the next prompt runs
    ok = comfy_client.run_prompt(server.url, collect_prompt("attn2"), timeout=300)
    assert ok["status"]["status_str"] == "success", ok["status"]


def test_the_pattern_that_hangs_pythons_re_is_answered_at_once(server):
    t = time.time()
    hist = comfy_client.run_prompt(server.url, collect_prompt(RE_HANG), timeout=120)
    assert time.time() - t < 60
    msgs = [m for kind, m in hist["status"]["messages"] if kind == "execution_error"]
    assert msgs and "no spatial layer matches layer_filter" in msgs[0]["exception_message"], hist["status"]
