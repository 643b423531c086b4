"""Progress and messages: ComfyUI's progress bar and previews on the node, cancellation
(``/interrupt``), the executing node's id and messages to the editor (``PromptServer.send_sync``)."""
from __future__ import annotations

import comfy.model_management
import comfy.utils


class Progress:
    def __init__(self, total: int, node_id: str | None = None):
        self.bar = comfy.utils.ProgressBar(max(1, total), node_id=node_id)

    def step(self, n: int = 1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update(n)

    def preview(self, image):
        """Show a PIL image on the node (ComfyUI's progress preview)."""
        self.bar.update_absolute(self.bar.current, None, ("JPEG", image, 512))

    def set_total(self, total: int):
        """Once the amount of work is known (e.g. after the layers are selected)."""
        self.bar.update_absolute(self.bar.current, max(1, total))


def check_cancel():
    comfy.model_management.throw_exception_if_processing_interrupted()


def node_id(node_cls):
    """The executing node's id (V3 hidden input), or None when called outside a prompt."""
    return getattr(getattr(node_cls, "hidden", None), "unique_id", None)


def send_message(event: str, data: dict):
    try:
        from server import PromptServer
    except ImportError:  # no server module (scripts, in-process tests): messages are optional
        return
    inst = getattr(PromptServer, "instance", None)
    if inst is not None:
        inst.send_sync(event, data)
