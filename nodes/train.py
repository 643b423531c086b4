"""Train CAT LoRA, Save CAT LoRA and the sprite dataset nodes: their schemas; the training itself is
in :mod:`.training`."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..cat_training import DTYPES, OPTIMIZERS, TrainConfig
from . import _comfy, filenames
from .display import safe_text
from .patterns import queue_time_problem
from .training import SAVE_FIELDS, TARGETS, TrainSettings, save_cat_lora, train_from_inputs

TRAINED = io.Custom("LORACLR_TRAINED_LORA")


class TrainCATLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = TrainConfig()
        return io.Schema(
            node_id="LoRACLRTrainCAT",
            display_name="Train CAT LoRA",
            category="LoRACLR/train",
            description="Trains a concept LoRA on the MODEL with the CAT term, which keeps the model's prediction on "
                        "the caption without the trigger equal to the base model's.",
            inputs=[
                io.Model.Input("model", tooltip="The base model to train the LoRA on (SD1.5-family, ε- or "
                                                "v-prediction). It is not changed: the MODEL output is a copy with the "
                                                "trained LoRA applied."),
                io.Clip.Input("clip", tooltip="Text encoder that turns the captions (and, for the CAT term, the "
                                              "captions without the trigger) into conditioning. Not trained."),
                io.String.Input("captions", multiline=True, default="photo of sks",
                                tooltip="One caption per training image, one per line in image order, or a single "
                                        "line used for every image. With lambda_cat > 0 every caption must contain "
                                        "the trigger."),
                io.String.Input("trigger", default="sks",
                                tooltip="The word(s) naming the concept in the captions; several: comma-separated. "
                                        "The CAT term uses each caption with every trigger occurrence removed on "
                                        "token ids, with brackets around it ('<sks>') and a comma, semicolon or "
                                        "colon after it; the rest of the caption keeps its tokens."),
                io.Int.Input("rank", default=1, min=1, max=1024,
                             tooltip="LoRA rank r: the inner size of the two factors of every adapted layer (the "
                                     "CAT paper uses 1). Higher: more capacity, bigger file."),
                io.Float.Input("alpha", default=1.0, min=0.0, max=4096.0, step=0.5,
                               tooltip="LoRA alpha: each layer's update is up·down × alpha / rank (alpha = rank gives "
                                       "scale 1). Saved in the file, so LoRA loaders apply the same scale."),
                io.Combo.Input("target_layers", options=list(TARGETS), default="attention",
                               tooltip="Which UNet layers get an adapter. attention: every attention projection (q, "
                                       "k, v, out), as in the paper. all_linear: every linear layer. all: every "
                                       "linear and convolution layer. Ignored when layer_pattern is set."),
                io.String.Input("layer_pattern", default="",
                                tooltip="Optional regular expression searched in the UNet's weight keys (e.g. "
                                        "'attn2\\.to_[kv]'); when set, every matching linear or convolution "
                                        "weight is adapted instead of target_layers."),
                io.Int.Input("steps", default=d.steps, min=1, max=1000000,
                             tooltip="Optimizer steps to train. When resuming: the total step count to reach, not "
                                     "the number of extra steps."),
                io.Float.Input("learning_rate", default=d.learning_rate, min=0.0, max=1.0, step=1e-6,
                               tooltip="Step size of the optimizer (the CAT paper: 1e-4 with AdamW)."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW",
                               tooltip="AdamW (torch's defaults: betas 0.9/0.999, weight decay 0.01), Adam (no "
                                       "weight decay) or SGD (no momentum)."),
                io.Int.Input("batch_size", default=1, min=1, max=1024,
                             tooltip="Images per micro-batch, drawn at random (with replacement) from the training "
                                     "images; each gets its own timestep and noise."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                             tooltip="Micro-batches per optimizer step; their gradients are averaged, so one step "
                                     "sees batch_size × grad_accumulation images."),
                io.Float.Input("lambda_cat", default=d.lambda_cat, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the CAT term, which keeps the LoRA model's prediction on each "
                                       "caption without the trigger equal to the base model's. 0: plain LoRA "
                                       "training (captions then need not contain the trigger)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate="fixed",
                             tooltip="Seed of every random draw of the run: the LoRA's initial down factors, the "
                                     "images, timesteps and noise of every step, and the noise of the preview "
                                     "images. Same seed and settings: the same LoRA."),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="float32",
                               tooltip="Precision of the UNet's forward and backward passes. float32: every layer "
                                       "computes in float32 (a UNet stored in float16 is upcast). bfloat16 / "
                                       "float16: autocast (faster on GPUs, less memory); float16 also scales the "
                                       "loss so gradients do not underflow. The LoRA and optimizer stay float32."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute each UNet block's activations in the backward pass instead of "
                                         "keeping them: less memory, about a third more time, same result."),
                io.Combo.Input("resume_from", options=["none"] + _comfy.lora_names(), default="none",
                               tooltip="Continue a run saved by Save CAT LoRA (save_state on) up to 'steps', exactly "
                                       "as if it had not stopped. Every other setting, the captions, trigger, "
                                       "training data and base model must be those of the saved run (only steps, "
                                       "gradient_checkpointing and preview_every may change); otherwise the node "
                                       "stops with an error naming the field. none: start a new run."),
                io.Int.Input("preview_every", default=0, min=0, max=100000,
                             tooltip="Every N steps, sample the first caption with the LoRA so far (8 Euler steps "
                                     "from the seed's noise, no CFG), decode it with the vae and show it on the "
                                     "node; 0 = off. Does not change the training."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Encodes the training 'images' into latents and decodes the preview images."),
                io.Image.Input("images", optional=True,
                               tooltip="Training images (an IMAGE batch), encoded with the vae. Give images or "
                                       "latents."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Training latents (e.g. from VAE Encode), used instead of images."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), TRAINED.Output(display_name="lora"),
                     io.String.Output(display_name="loss_history"), io.Int.Output(display_name="steps"),
                     io.Image.Output(display_name="loss_plot")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, resume_from=None, layer_pattern=None):
        # before the prompt runs: a value that is not a saved run (e.g. a number shifted into this
        # widget by a hand-edited workflow) is refused with the field's name, and so is a pattern
        # that would backtrack without end
        problem = queue_time_problem(layer_pattern, "layer_pattern", "Train CAT LoRA")
        if problem is not None:
            return problem
        return _comfy.check_lora_choice("resume_from", resume_from, what="a run saved by Save CAT LoRA")

    @classmethod
    def execute(cls, model, clip, *, vae=None, images=None, latents=None, **inputs):
        out_model, trained, history, steps_done, plot, text = train_from_inputs(
            model, clip, TrainSettings(**inputs), vae, images, latents, node_id=_comfy.node_id(cls))
        return io.NodeOutput(out_model, trained, history, steps_done, plot, ui=ui.PreviewText(safe_text(text)))


class SaveCATLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRACLRSaveCAT",
            display_name="Save CAT LoRA",
            category="LoRACLR/train",
            is_output_node=True,
            description="Saves a trained LoRA as a standard kohya-key file in the loras folder (+ optimizer state to resume).",
            inputs=[
                TRAINED.Input("lora", tooltip="The trained LoRA (the 'lora' output of Train CAT LoRA)."),
                io.String.Input("filename", default="loraclr/cat_{trigger}",
                                tooltip="File name inside the loras folder (sub-folders allowed, .safetensors "
                                        "added); {trigger} and {steps} are filled in."),
                io.Combo.Input("dtype", options=["float16", "bfloat16", "float32"], default="float16",
                               tooltip="Storage precision of the LoRA factors in the file (float32 keeps them "
                                       "exactly as trained; the optimizer state is always float32)."),
                io.Combo.Input("if_exists", options=["increment", "error", "overwrite"], default="increment",
                               tooltip="When the file exists: increment adds _00001, _00002, … to the name; error "
                                       "stops; overwrite replaces the file and its sidecar."),
                io.Boolean.Input("save_state", default=True,
                                 tooltip="Also write the run's optimizer state, generator and settings to a sidecar "
                                         "file (<name>.loraclr-state, not listed by LoRA loaders) so Train CAT LoRA "
                                         "can resume it exactly."),
            ],
            outputs=[io.String.Output(display_name="lora_name")],
        )

    @classmethod
    def validate_inputs(cls, filename=None):
        # at queue time, before Train CAT LoRA runs: a bad name never costs a training run
        problem = filenames.template_problem(filename, SAVE_FIELDS)
        return True if problem is None else f"[Save CAT LoRA] field 'filename' {problem}"

    @classmethod
    def execute(cls, lora, filename, dtype, if_exists, save_state):
        name, text = save_cat_lora(lora, filename, dtype, if_exists, save_state)
        return io.NodeOutput(name, ui=ui.PreviewText(safe_text(text)))


class SpriteDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRACLRSpriteDataset",
            display_name="LoRACLR Sprite Dataset",
            category="LoRACLR/train",
            description="A synthetic concept to train on: one distinctive sprite in varied scenes, with captions.",
            inputs=[
                io.Int.Input("count", default=8, min=1, max=256, tooltip="Number of images."),
                io.Int.Input("width", default=256, min=64, max=2048, step=8, tooltip="Image width."),
                io.Int.Input("height", default=256, min=64, max=2048, step=8, tooltip="Image height."),
                io.String.Input("trigger", default="sks", tooltip="Trigger word used in the captions."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate="fixed",
                             tooltip="Seed of the scenes and placements."),
                io.Int.Input("variant", default=0, min=0, max=2, tooltip="Which sprite (colour scheme): "
                                                                         "different variants are different concepts."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.String.Output(display_name="captions")],
        )

    @classmethod
    def execute(cls, count, width, height, trigger, seed, variant=0):
        from ..cat_training.sprites import sprite_dataset

        images, captions = sprite_dataset(count, width, height, trigger.strip() or "sks", seed, variant)
        return io.NodeOutput(images, "\n".join(captions))


class WorldDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..sprite_world.render import CONCEPTS, concept_label

        return io.Schema(
            node_id="LoRACLRWorldDataset",
            display_name="LoRACLR Sprite World Concept",
            category="LoRACLR/train",
            description="Training images of one concept of the sprite world (a class in one colour scheme the "
                        "world's base model never saw, named by its trigger), in varied scenes, with captions.",
            inputs=[
                io.Combo.Input("concept", options=[concept_label(c) for c in CONCEPTS],
                               default=concept_label(CONCEPTS[0]),
                               tooltip="Which concept: trigger, class, body/accent colours. Several of one class "
                                       "differ only in colour (look-alikes)."),
                io.Int.Input("count", default=16, min=1, max=1024, tooltip="Number of images."),
                io.Int.Input("size", default=64, min=64, max=512, step=64,
                             tooltip="Image side in pixels (the world's model is trained at 64)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate="fixed",
                             tooltip="Seed of the scenes and placements; another seed gives held-out images."),
                io.Float.Input("companions", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Share of images where a sprite of another class, in the base model's "
                                       "random colours, stands beside the concept (captioned 'a sks creature "
                                       "and a robot'), so the LoRA colours only its own object in a two-object "
                                       "prompt. 0: the concept alone in every image."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.String.Output(display_name="captions"),
                     io.String.Output(display_name="trigger")],
        )

    @classmethod
    def execute(cls, concept, count, size, seed, companions=0.5):
        from ..sprite_world.render import concept_dataset, concept_from_label

        c = concept_from_label(concept, node="LoRACLR Sprite World Concept")
        images, captions = concept_dataset(c, count, size, seed, companions)
        return io.NodeOutput(images, "\n".join(captions), c.trigger)
