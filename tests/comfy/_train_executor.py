"""Run API-format prompts in-process through ComfyUI's own executor (execution.PromptExecutor),
as the server does: every node's execute runs under torch.inference_mode(), outputs are cached
between prompts of one executor, and errors come back as execution_error messages."""
import uuid

import _harness
from _executor import CACHE_ARGS, StubServer, register_pack



def new_executor():
    import execution

    register_pack()
    return execution.PromptExecutor(StubServer(), cache_type=execution.CacheType.CLASSIC,
                                    cache_args=dict(CACHE_ARGS))


def run(executor, prompt: dict, outputs=None):
    """Execute ``prompt`` (its output nodes, or ``outputs``); returns the executor's error
    message (a dict) or None on success."""
    import nodes

    if outputs is None:
        outputs = [k for k, v in prompt.items() if getattr(nodes.NODE_CLASS_MAPPINGS[v["class_type"]], "OUTPUT_NODE",
                                                                  False)
                   or v["class_type"].startswith("LoRACLRSave")]
    executor.execute(prompt, uuid.uuid4().hex, {}, outputs)
    errors = [m for kind, m in executor.status_messages if kind in ("execution_error", "execution_interrupted")]
    return errors[0] if errors else None


def train_prompt(sub: str, steps=2, save_name="run", lambda_cat=1.0, captions="a photo of sks dog", count=2,
                 save_state=True, **train):
    """Checkpoint → sprite images → VAE-encoded latents → Train CAT LoRA → Save CAT LoRA (float32)."""
    return _harness.train_prompt(f"{sub}/{save_name}", steps, captions, train.pop("learning_rate", 1e-2), count,
                                 save_state, lambda_cat=lambda_cat, **train)
