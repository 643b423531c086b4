"""What a collection runs with: the stages and their layers, and the settings of one collection
(built once by the node from its inputs)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

STAGE_PATTERNS = {
    "text_encoder": re.compile(r"\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$"),
    "cross_attention": re.compile(r"^diffusion_model\..*\.attn2\.to_[kv]\.weight$"),
    "spatial": re.compile(r"^diffusion_model\..*(\.attn1\.to_(q|k|v|out\.0)|\.attn2\.to_(q|out\.0)"
                          r"|\.ff\.net\.(0\.proj|2)|\.\d+\.proj_in|\.\d+\.proj_out)\.weight$"),
}
INPUTS_FROM = ("concept_lora", "wired")
TOKEN_ROWS = ("all", "trigger")
SPATIAL_STATISTICS = ("compact", "exact")
DEFAULT_MEMORY_BUDGET_GIB = 4.0
# a line of the preservation prompts that stands for every concept's own prompts with its
# trigger removed on token ids
CONCEPT_PROMPTS_LINE = "{concept prompts}"
GENERIC_PRESERVATION_PROMPTS = ("a photo", "a painting of a landscape", "a close-up photo of an object on a table",
                                "a street in a city at night", "a portrait of a person")
DEFAULT_PRESERVATION_PROMPTS = "\n".join((CONCEPT_PROMPTS_LINE,) + GENERIC_PRESERVATION_PROMPTS)


@dataclass(frozen=True)
class SpatialSampling:
    """How the spatial stage samples every concept: Euler steps, how many of them are recorded
    (evenly spread), the image size, and the seed of the initial noise all concepts share."""
    steps: int = 20
    record_steps: int = 20
    width: int = 512
    height: int = 512
    seed: int = 0


@dataclass(frozen=True)
class CollectSettings:
    """One collection's settings, named as the Collect node's inputs (``sampling``: the spatial
    stage's steps, record_steps, width, height and seed)."""
    inputs_from: str = "concept_lora"
    layer_filter: str = ""
    only_lora_layers: bool = True
    token_rows: str = "all"
    spatial_statistics: str = "compact"
    memory_budget_gib: float = DEFAULT_MEMORY_BUDGET_GIB
    sampling: SpatialSampling = field(default_factory=SpatialSampling)
    # trigger-free prompts whose layer inputs X_0 the merge keeps at the base output ('' : none)
    preservation_prompts: str = DEFAULT_PRESERVATION_PROMPTS

    @classmethod
    def from_inputs(cls, steps=20, record_steps=20, width=512, height=512, seed=0, layer_filter="",
                    **inputs) -> "CollectSettings":
        """From the node's inputs by name; an optional input left out keeps its default."""
        return cls(layer_filter=layer_filter or "", sampling=SpatialSampling(steps, record_steps, width, height, seed),
                   **inputs)
