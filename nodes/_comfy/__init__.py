"""The one place that touches ComfyUI internals: a small package with one module per concern.

Everything here is a small adapter over APIs present in both ComfyUI 0.3.75 and current
releases: ``comfy.lora`` key maps and ``load_lora``, ``comfy.lora.calculate_weight`` (each
adapter's own weight calculation), ``ModelPatcher.add_patches`` / ``get_key_patches``,
``folder_paths``, ``comfy.utils.ProgressBar`` and ``PromptServer.send_sync``. If upstream moves
one of them, this package is where it is mended.

* ``errors``     NodeError, the message naming the node and the offending input
* ``files``      the loras folder: finding and reading LoRAs, hashes, output names, atomic writes
* ``patches``    key maps, LoRAs as patches, ΔW and factors of a patch, patched MODEL/CLIP clones
* ``text``       tokenization, prompt encoding and conditioning, trigger ids and positions
* ``sampling``   sigmas, initial latents, one denoising step, SDXL's ``y``, what can be sampled
* ``families``   the model and text-encoder families the pack supports, refused otherwise
* ``progress``   progress bar and previews, cancellation, node id, messages to the editor
* ``recording``  layer modules and forward pre-hooks that record layer inputs
* ``training``   weight wrappers, native prediction, gradient checkpointing, training device
* ``images``     VAE encode/decode, model latents, preview samples

Callers use ``_comfy.name``: every public name is re-exported here (each lives in one module).
"""
from __future__ import annotations

from .errors import NodeError, reporting_as  # noqa: F401
from .files import (lora_names, lora_path, check_lora_choice, read_lora, safetensors_metadata,  # noqa: F401
                    file_fingerprint, file_sha256, loras_output_dir, resolve_output_file, shown_path,
                    atomic_write_bytes, atomic_save_safetensors)
from .patches import (lora_key_map, captured_log, check_finite_tensors, patch_shape_problem,  # noqa: F401
                      load_lora_patches, base_weight, patch_delta, lora_factors, state_keys, patch_model, patch_clip,
                      clip_with_patches, inverse_key_map)
from .text import (same_text_encoder, encode_prompt, encode_first_chunk, trigger_positions, tokenizer_for,  # noqa: F401
                   neutral_tokens, trigger_ids, encode_tokens, model_conditioning)
from .sampling import (needs_y, adm_vector, with_y, check_sampling_support, sampling_sigmas, initial_latent,  # noqa: F401
                       denoise, euler_step, latent_scale, latent_channels)
from .families import (SUPPORTED_FAMILIES, model_family, clip_family, check_model_family,  # noqa: F401
                       check_clip_family, check_families)
from .progress import Progress, check_cancel, node_id, send_message  # noqa: F401
from .recording import load_patched, unet_modules, clip_modules, rows_of, InputRecorder  # noqa: F401
from .training import (model_weight_shapes, attach_weight_wrappers, training_device, NativePrediction,  # noqa: F401
                       GradientCheckpointing)
from .images import encode_images, decode_latents, model_latents, preview_sample  # noqa: F401

