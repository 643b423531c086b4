"""Text: tokenization through the CLIP object, prompt encoding (rows, pooled output, the first
77-token chunk), the model's conditioning for a list of prompts, trigger token ids and positions,
captions with the trigger removed on token ids, and whether two CLIPs encode alike."""
from __future__ import annotations

import torch

from .sampling import needs_y, with_y


def same_text_encoder(a, b) -> bool:
    """Whether CLIP objects ``a`` and ``b`` encode every prompt identically: the same
    underlying text encoder and tokenizer, the same layer choice and the very same weight
    patches (clones share their patch entries until a patch is added)."""
    if a is b:
        return True
    if a.cond_stage_model is not b.cond_stage_model or a.tokenizer is not b.tokenizer:
        return False
    if getattr(a, "layer_idx", None) != getattr(b, "layer_idx", None):
        return False
    pa, pb = a.patcher, b.patcher
    if pa.model is not pb.model or pa.patches.keys() != pb.patches.keys():
        return False
    if any(len(pa.patches[k]) != len(pb.patches[k]) or any(x is not y for x, y in zip(pa.patches[k], pb.patches[k]))
           for k in pa.patches):
        return False
    if pa.object_patches.keys() != pb.object_patches.keys() or any(
            pa.object_patches[k] is not pb.object_patches[k] for k in pa.object_patches):
        return False
    try:
        return bool(pa.model_options == pb.model_options)
    except Exception:  # options holding tensors or objects that refuse comparison
        return False


def encode_prompt(clip, text: str) -> torch.Tensor:
    """The conditioning tensor the UNet receives for ``text`` (batch 1, tokens × width)."""
    tokens = clip.tokenize(text)
    cond = clip.encode_from_tokens(tokens)
    return cond.detach().to("cpu", torch.float32)


def encode_first_chunk(clip, text: str, pooled: bool = False):
    """The conditioning of the first 77-token chunk of ``text`` only (a prompt over 77 tokens
    is cut there, so every prompt gives the same number of rows), and whether it was cut:
    (cond, cut), or with ``pooled`` (cond, pooled, cut), pooled None where the encoder has none."""
    tokens = clip.tokenize(text)
    cut = any(len(chunks) > 1 for chunks in tokens.values())
    first = {k: chunks[:1] for k, chunks in tokens.items()}
    if not pooled:
        return clip.encode_from_tokens(first).detach().to("cpu", torch.float32), cut
    cond, pool = encode_tokens(clip, first, pooled=True)
    return cond, pool, cut


def trigger_positions(clip, text: str, trigger: str) -> list[int]:
    """Token positions (in the first 77-token chunk of ``text``, start token included) of every
    occurrence of ``trigger``'s tokens, in the first text encoder's tokenization."""
    tokens = clip.tokenize(text)
    key = next(iter(tokens))
    ids = [t[0] for t in tokens[key][0]]
    want = trigger_ids(clip, key, trigger)
    if not want:
        return []
    out, i = [], 0
    while i <= len(ids) - len(want):
        if ids[i:i + len(want)] == want:
            out.extend(range(i, i + len(want)))
            i += len(want)
        else:
            i += 1
    return out


def tokenizer_for(clip, key: str):
    return getattr(clip.tokenizer, f"clip_{key}", None)


def neutral_tokens(clip, caption: str, remover_for_key) -> dict:
    """The caption's tokens with the trigger removed on token ids (first 77-token chunk), padded
    back to the same length. ``remover_for_key(key)`` gives the TriggerRemover of that text encoder."""
    tokens = clip.tokenize(caption)
    out = {}
    for key, chunks in tokens.items():
        tok = tokenizer_for(clip, key)
        first = list(chunks[0])
        ids = [t[0] for t in first]
        start = 1 if tok is not None and tok.start_token is not None and ids and ids[0] == tok.start_token else 0
        end_tok = tok.end_token if tok is not None else None
        stop = ids.index(end_tok, start) if end_tok is not None and end_tok in ids[start:] else len(ids)
        content = first[start:stop]
        kept = remover_for_key(key).kept_indices([t[0] for t in content], caption)
        new = first[:start] + [content[i] for i in kept] + first[stop:]
        pad = (tok.pad_token if tok is not None else 0)
        while len(new) < len(first):
            new.append((pad, 1.0) + tuple(first[-1][2:]))
        out[key] = [new] + [list(c) for c in chunks[1:]]
    return out


def trigger_ids(clip, key: str, text: str) -> list:
    """Token ids of ``text`` alone (no start/end/padding) in text encoder ``key``."""
    tok = tokenizer_for(clip, key)
    ids = [t[0] for t in clip.tokenize(text)[key][0]]
    specials = {tok.start_token, tok.end_token, tok.pad_token} if tok is not None else set()
    if tok is not None and tok.start_token is not None and ids and ids[0] == tok.start_token:
        ids = ids[1:]
    out = []
    for i in ids:
        if i in specials:
            break
        out.append(i)
    return out


def encode_tokens(clip, tokens, pooled: bool = False):
    """The conditioning rows for ``tokens``; with ``pooled`` also the pooled output (or None)."""
    if not pooled:
        return clip.encode_from_tokens(tokens).detach().to("cpu", torch.float32)
    cond, pool = clip.encode_from_tokens(tokens, return_pooled=True)
    return (cond.detach().to("cpu", torch.float32),
            None if pool is None else pool.detach().to("cpu", torch.float32))


def model_conditioning(node: str, model, clip, prompts, width: int, height: int):
    """Conditioning for the model from a list of prompts (texts or tokenized prompts): the rows
    as one tensor, or, for a model that takes ``y`` (SDXL), a Cond with the rows and y for a
    ``width`` × ``height`` image."""
    tokens_list = [clip.tokenize(p) if isinstance(p, str) else p for p in prompts]
    if not needs_y(model):
        return torch.cat([encode_tokens(clip, t) for t in tokens_list])
    pairs = [encode_tokens(clip, t, pooled=True) for t in tokens_list]
    return with_y(node, model, torch.cat([c for c, _ in pairs]), [p for _, p in pairs], width, height)
