"""CAT (contrastive adapter training) in pure torch: trigger removal on token ids, trainable
LoRA weight functions with a bypass switch, and the training loop. No ComfyUI import."""
from .lora import AdapterSet, LoRAWeight
from .trainer import DTYPES, OPTIMIZERS, CATTrainer, StepLosses, TrainConfig, TrainedLoRA, make_optimizer
from .triggers import TriggerNotFound, TriggerRemover

__all__ = ["AdapterSet", "LoRAWeight", "CATTrainer", "StepLosses", "TrainConfig", "make_optimizer", "OPTIMIZERS",
           "DTYPES", "TriggerRemover", "TriggerNotFound", "TrainedLoRA"]
