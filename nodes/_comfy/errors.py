"""The pack's user-facing error: NodeError, a message that names the node and the offending
input, field or file."""
from __future__ import annotations


class NodeError(ValueError):
    """An error shown to the user, naming the node and the offending file or field."""

    def __init__(self, node: str, message: str):
        from ..display import safe_text  # control and bidi characters from files are shown escaped

        super().__init__(safe_text(f"[{node}] {message}"))


# ComfyUI shows an error's type as "module.ClassName" beside its message (here that was
# "...custom_nodes/comfyui-loraclr.nodes._comfy.NodeError"); a builtins-module type is shown by its
# name alone, so the user reads "NodeError: [Train CAT LoRA] field ..." with the node's name first.
NodeError.__module__ = "builtins"
