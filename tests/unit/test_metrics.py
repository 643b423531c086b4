"""loraclr.metrics against values worked out by hand."""
import math

import pytest
import torch

from comfyui_loraclr.loraclr import metrics


def test_denoising_loss_is_the_mean_squared_error():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert metrics.denoising_loss(pred, target) == pytest.approx((0 + 4 + 9 + 0) / 4)
    with pytest.raises(ValueError, match="one shape"):
        metrics.denoising_loss(pred, target[:1])


def test_retention_by_hand():
    # base 1.0, the LoRA alone 0.6 (learned 0.4); merged 0.7 keeps 0.3 of it
    assert metrics.retention(1.0, 0.7, 0.6) == pytest.approx(0.75)
    assert metrics.retention(1.0, 0.6, 0.6) == pytest.approx(1.0)
    assert metrics.retention(1.0, 1.0, 0.6) == pytest.approx(0.0)
    assert metrics.retention(1.0, 1.2, 0.6) == pytest.approx(-0.5)  # worse than the base
    assert math.isnan(metrics.retention(1.0, 0.9, 1.0))  # nothing learned
    assert math.isnan(metrics.retention(1.0, 0.9, 1.1))


def test_fidelity_by_hand():
    lora = torch.tensor([1.0, 1.0])
    base = torch.tensor([0.0, 0.0])  # ‖base − lora‖² = 2
    assert metrics.fidelity(lora.clone(), lora, base) == 0.0
    assert metrics.fidelity(base.clone(), lora, base) == pytest.approx(1.0)
    assert metrics.fidelity(torch.tensor([0.5, 1.0]), lora, base) == pytest.approx(0.25 / 2)
    assert math.isnan(metrics.fidelity(lora, base, base))


def test_knowledge_preservation_by_hand():
    noise = torch.tensor([1.0, -1.0, 2.0, 0.0])  # ‖ε‖² = 6
    base = torch.tensor([0.9, -1.1, 2.0, 0.1])
    adapted = base + torch.tensor([0.0, 0.3, 0.0, -0.3])  # moved by 0.18
    assert metrics.knowledge_preservation(adapted, base, noise) == pytest.approx(0.18 / 6)
    assert metrics.knowledge_preservation(base, base, noise) == 0.0


def test_summary_ignores_non_finite_values_and_counts_them():
    s = metrics.summary([1.0, 3.0, math.nan])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and (s["min"], s["max"]) == (1.0, 3.0)
    assert s["n"] == 2 and s["non_finite"] == 1
    assert metrics.summary([math.nan])["n"] == 0


def test_registry_metadata_is_complete():
    """pyproject.toml carries what the Comfy registry reads (the version's one source: test_metadata)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    comfy, project = meta["tool"]["comfy"], meta["project"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"] == ">=0.3.75"
    assert set(comfy["includes"]) == {"web", "example_workflows"}
    assert project["name"] == "comfyui-loraclr" and project["description"] and project["urls"]["Repository"]
    assert "torch" not in " ".join(project["dependencies"])  # ComfyUI's own torch is used
    assert comfy["Icon"].endswith("docs/icon.png")
