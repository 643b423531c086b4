"""Layer patterns from a workflow, matched so that no pattern can hang the server.

A shared workflow carries its regular expressions (Collect's and Merge (all stages)'s
``layer_filter``, Train CAT LoRA's ``layer_pattern``). Python's ``re`` backtracks without limit and
holds the interpreter while it does: a pattern such as ``(.*.*)*#`` freezes every request of the
server. Patterns here are compiled and matched with the ``regex`` package (in every ComfyUI
environment through ``transformers``), which takes a timeout and releases the interpreter lock
while matching; a pattern that runs out of time is refused with an error naming the field. The same
check runs when the prompt is queued (``queue_time_problem``), on keys shaped like the real ones.
"""
from __future__ import annotations

import regex

from ._comfy.errors import NodeError

MATCH_TIMEOUT_S = 0.25  # per key; real keys are under 120 characters
# Keys of the lengths and shapes the pack matches (UNet, CLIP), for the check at queue time.
PROBE_KEYS = (
    "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.9.ff.net.0.proj.weight",
    "clip_l.transformer.text_model.encoder.layers.11.self_attn.out_proj.weight",
    "clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight",
)


class LayerPattern:
    """A compiled pattern whose ``search`` cannot run away."""

    def __init__(self, text: str, field: str, node: str):
        self.text, self.field, self.node = text, field, node
        try:
            self.rx = regex.compile(text)
        except regex.error as e:
            raise NodeError(node, f"field '{field}' is not a valid regular expression: {e}") from e

    def search(self, key: str) -> bool:
        try:
            return self.rx.search(key, timeout=MATCH_TIMEOUT_S) is not None
        except TimeoutError as e:
            raise NodeError(self.node, f"field '{self.field}': the pattern {self.text!r} took longer than "
                                       f"{MATCH_TIMEOUT_S} s on one layer key (nested repeats such as '(.*)*' "
                                       "backtrack without end); simplify it") from e


def compile_pattern(text: str, field: str, node: str) -> LayerPattern | None:
    """None for an empty pattern (no filter)."""
    return LayerPattern(text, field, node) if text and text.strip() else None


def queue_time_problem(text, field: str, node: str) -> str | None:
    """What is wrong with a pattern, found before the prompt runs (validate_inputs), or None."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        p = LayerPattern(text, field, node)
        for key in PROBE_KEYS:
            p.search(key)
            p.search(key + "#")
    except NodeError as e:
        return str(e)
    return None
