"""Run API-format prompts through ComfyUI's own executor in-process.

This is what the server does for every queued prompt: validation, ``torch.inference_mode()``
around every node, the output cache between prompts, device moves. Calling a node class
directly skips all of that, so node behaviour that depends on it is tested here.
"""
from __future__ import annotations

import asyncio
import uuid


class StubServer:
    """The attributes of ComfyUI's PromptServer that the executor touches; messages are kept."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


# The cache settings ComfyUI's main.py passes. 0.33 reads "ram_inactive" too (KeyError without it);
# 0.3.75 ignores keys it does not know. Zero: no RAM-pressure headroom (these executors use the
# classic cache, which drops outputs as soon as no node needs them).
CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}


class PromptError(RuntimeError):
    def __init__(self, message, details):
        super().__init__(message)
        self.details = details


def register_pack():
    """Make the pack's nodes known to ComfyUI's node table, as ComfyUI does for custom_nodes."""
    import nodes

    from comfyui_loraclr import nodes as pack_nodes

    for cls in pack_nodes.NODE_CLASSES:
        nodes.NODE_CLASS_MAPPINGS.setdefault(cls.define_schema().node_id, cls)


class Executor:
    def __init__(self):
        import execution

        register_pack()
        self.server = StubServer()
        self.executor = execution.PromptExecutor(self.server, cache_args=dict(CACHE_ARGS))

    def run(self, prompt: dict, outputs=None):
        """Validate and execute ``prompt`` up to ``outputs`` (node ids; default: its output nodes,
        as the server does); returns {node_id: outputs list} for every node that ran or was cached.
        Raises PromptError with the executor's message on a validation or execution error."""
        import execution

        prompt_id = str(uuid.uuid4())
        if outputs is None:
            valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
            if not valid[0]:
                raise PromptError(f"invalid prompt: {valid[1]} {valid[3]}", valid)
            outputs = valid[2]
        else:  # the same per-node validation, for prompts whose last node is not an output node
            validated = {}
            for node_id in outputs:
                ok = asyncio.run(execution.validate_inputs(prompt_id, prompt, node_id, validated))
                if not ok[0]:
                    # the node's own errors, and those of the upstream nodes that failed with it
                    upstream = {k: v[1] for k, v in validated.items() if not v[0] and v[1]}
                    raise PromptError(f"invalid prompt: node {node_id}: {ok[1]} {upstream}", ok)
        self.server.messages.clear()
        self.executor.execute(prompt, prompt_id, {}, list(outputs))
        for event, data in self.executor.status_messages:
            if event == "execution_error":
                raise PromptError(f"{data['node_type']}: {data['exception_message']}", data)
            if event == "execution_interrupted":
                raise PromptError("interrupted", data)
        out = {}
        for node_id in prompt:
            entry = self.executor.caches.outputs.get(node_id)
            if asyncio.iscoroutine(entry):  # newer ComfyUI caches are async
                entry = asyncio.run(entry)
            if entry is not None:
                out[node_id] = entry.outputs if hasattr(entry, "outputs") else entry
        return out

    def ui(self):
        return self.executor.history_result["outputs"]
