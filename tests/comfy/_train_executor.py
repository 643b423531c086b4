"""Run API-format prompts in-process through ComfyUI's own executor (execution.PromptExecutor),
as the server does: every node's execute runs under torch.inference_mode(), outputs are cached
between prompts of one executor, and errors come back as execution_error messages."""
import uuid

from _executor import StubServer, register_pack

MICRO = "loraclr_micro_sd15.safetensors"


def new_executor():
    import execution

    register_pack()
    return execution.PromptExecutor(StubServer(), cache_type=execution.CacheType.CLASSIC,
                                    cache_args={"lru": 0, "ram": 0})


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
    inputs = {"model": ["1", 0], "clip": ["1", 1], "latents": ["3", 0], "captions": captions, "trigger": "sks",
              "rank": 2, "alpha": 2.0, "target_layers": "attention", "layer_pattern": "", "steps": steps,
              "learning_rate": 1e-2, "optimizer": "AdamW", "batch_size": 1, "grad_accumulation": 1,
              "lambda_cat": lambda_cat, "seed": 0, "training_dtype": "float32", "gradient_checkpointing": False,
              "resume_from": "none", "preview_every": 0}
    inputs.update(train)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MICRO}},
        "2": {"class_type": "LoRACLRSpriteDataset", "inputs": {"count": count, "width": 64, "height": 64,
                                                               "trigger": "sks", "seed": 0, "variant": 0}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "LoRACLRTrainCAT", "inputs": inputs},
        "5": {"class_type": "LoRACLRSaveCAT", "inputs": {"lora": ["4", 1], "filename": f"{sub}/{save_name}",
                                                         "dtype": "float32", "if_exists": "error",
                                                         "save_state": save_state}},
    }
