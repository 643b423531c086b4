"""Thin ComfyUI nodes: widgets in, one library call, outputs out."""
from .apply import LoRACLRApply, LoRACLRSave
from .collect import LoRACLRCollect, LoRACLRConcept
from .evaluate import LoRACLREvaluate
from .train import SaveCATLoRA, SpriteDataset, TrainCATLoRA, WorldDataset
from .merge import LoRACLRMerge, LoRACLRMergeAllStages, LoRACLRSweepValues

NODE_CLASSES = [LoRACLRConcept, LoRACLRCollect, LoRACLRMerge, LoRACLRApply, LoRACLRSave, LoRACLRMergeAllStages,
                LoRACLRSweepValues, TrainCATLoRA, SaveCATLoRA, SpriteDataset, WorldDataset,
                LoRACLREvaluate]
