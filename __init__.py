"""comfyui-loraclr: train concept LoRAs with CAT and merge many of them with LoRACLR, as ComfyUI nodes.

Registered through ComfyUI's V3 extension entry point (``comfy_entrypoint``), which every tested
ComfyUI (0.3.75 and 0.33) reads. On first load the sprite world's checkpoint is assembled and its
folders are registered (nodes/_comfy/world.py).
"""
import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None:
    from comfy_api.latest import ComfyExtension

    from .nodes import NODE_CLASSES
    from .nodes._comfy import world as _world

    class LoRACLRExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODE_CLASSES)

    async def comfy_entrypoint() -> ComfyExtension:
        _world.register()
        return LoRACLRExtension()

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
else:
    # Imported outside ComfyUI (a script using the pure-torch libraries, or a test runner
    # collecting this folder as a package): there are no nodes to register.
    __all__ = ["WEB_DIRECTORY"]
