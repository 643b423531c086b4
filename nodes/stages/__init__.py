"""The three collection stages, in the order a full merge runs them, each recording per concept i
the inputs X_i of the layers to merge and their LoRA-applied outputs Y_i = X_i (W0 + ΔW_i)ᵀ (bias
removed):

* :mod:`.text_encoder`: the CLIP linear layers (q/k/v/out_proj, fc1/fc2) while encoding the
  concept's prompts with the concept's CLIP LoRA applied.
* :mod:`.cross_attention`: the UNet's cross-attention to_k/to_v. Their input is the conditioning
  the UNet receives, so no UNet forward is needed.
* :mod:`.spatial`: attn1 q/k/v/out, attn2 q/out, feed-forward, proj_in/proj_out (1×1 convs
  included), recorded while sampling the concept's prompts with its LoRA, on one of two paths:
  :mod:`.spatial_compact` (all concepts in one batched forward, statistics whose size does not
  depend on the number of concepts, and the distance pass that certifies a merge) and
  :mod:`.spatial_exact` (each concept sampled on its own patched model, exact pairwise statistics;
  also how a merge collects some layers again). :mod:`.sampling` holds what both paths share.

:mod:`.settings` holds the settings a collection runs with, :mod:`.common` the pieces every stage
uses; :mod:`..collection` checks the settings and runs one stage.
"""
