"""ComfyUI's own TrainLoraNode, called the same way whatever its API version, for comparisons.

ComfyUI 0.3.75: outputs (MODEL with the LoRA, lora, loss map, steps). ComfyUI 0.33 adds five
required inputs (quantized_backward, checkpoint_depth, offloading, bucket_mode, bypass_mode) and
no longer outputs the MODEL: the LoRA is applied with its LoraModelLoader, as its workflows do.
An input this helper does not know is an error, so a further API change is noticed, not guessed.
"""


def train_lora_node(model, latents, cond, steps, learning_rate, rank, seed=0, gradient_checkpointing=False):
    """Train with TrainLoraNode on ``latents`` (a list of LATENT dicts, one per image) and the
    conditioning ``cond``; returns the MODEL with the trained LoRA applied."""
    import comfy_extras.nodes_train as nt

    schema = nt.TrainLoraNode.define_schema()
    names = {i.id for i in schema.inputs}
    kw = dict(model=[model], latents=latents, positive=[cond], batch_size=[1], grad_accumulation_steps=[1],
              steps=[steps], learning_rate=[learning_rate], rank=[rank], optimizer=["AdamW"], loss_function=["MSE"],
              seed=[seed], training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"],
              gradient_checkpointing=[gradient_checkpointing], existing_lora=["[None]"])
    newer = dict(quantized_backward=[False], checkpoint_depth=[1], offloading=[False], bucket_mode=[False],
                 bypass_mode=[False])  # ComfyUI 0.33: off, as the 0.3.75 node behaved
    kw.update({k: v for k, v in newer.items() if k in names})
    unknown = names - set(kw)
    if unknown:
        raise RuntimeError(f"TrainLoraNode has inputs this comparison does not know: {sorted(unknown)}")
    out = nt.TrainLoraNode.execute(**{k: v for k, v in kw.items() if k in names}).result
    if schema.outputs[0].get_io_type() == "MODEL":
        return out[0]
    return nt.LoraModelLoader.execute(model, out[0], 1.0).result[0]
