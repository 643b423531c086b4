"""The pack's user-facing error: NodeError, a message that names the node and the offending
input, field or file."""
from __future__ import annotations

import contextlib
import contextvars

# The node the user placed, while a node runs work that other nodes also do: LoRACLR Merge (all
# stages) runs Collect's and Merge's code, and its errors must name the node that is in the graph.
_placed = contextvars.ContextVar("loraclr_placed_node", default=None)


@contextlib.contextmanager
def reporting_as(node: str):
    """Inside the block, every NodeError names ``node``."""
    token = _placed.set(node)
    try:
        yield
    finally:
        _placed.reset(token)


class NodeError(ValueError):
    """An error shown to the user, naming the node (the one placed in the graph) and the offending
    file or field."""

    def __init__(self, node: str, message: str):
        from ..display import safe_text  # control and bidi characters from files are shown escaped

        self.node = _placed.get() or node
        super().__init__(safe_text(f"[{self.node}] {message}"))


# ComfyUI shows an error's type as "module.ClassName" beside its message (here that was
# "...custom_nodes/comfyui-loraclr.nodes._comfy.NodeError"); a builtins-module type is shown by its
# name alone, so the user reads "NodeError: [Train CAT LoRA] field ..." with the node's name first.
NodeError.__module__ = "builtins"
