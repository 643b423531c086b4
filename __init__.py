"""comfyui-loraclr: train concept LoRAs with CAT and merge many of them with LoRACLR, as ComfyUI nodes."""
import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is None:
    # Imported outside ComfyUI (a script using the pure-torch libraries, or a test runner
    # collecting this folder as a package): there are no nodes to register.
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
else:
    from .nodes import NODE_CLASSES

    NODE_CLASS_MAPPINGS = {cls.define_schema().node_id: cls for cls in NODE_CLASSES}
    NODE_DISPLAY_NAME_MAPPINGS = {cls.define_schema().node_id: cls.define_schema().display_name
                                  for cls in NODE_CLASSES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
