"""Build transformers reference models from the engine's built-in tiny geometries (tests only)."""
from __future__ import annotations

import copy

import torch


def hf_text_config(raw: dict):
    raw = copy.deepcopy(raw)
    if raw["model_type"] == "gemma4_text":
        from transformers import Gemma4TextConfig

        return Gemma4TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})


def hf_causal_lm(raw: dict, seed: int = 0):
    """A transformers CausalLM with random weights (norms perturbed so they matter), fp32, eager."""
    cfg = hf_text_config(raw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    if raw["model_type"] == "gemma4_text":
        from transformers import Gemma4ForCausalLM as cls
    else:
        from transformers import Gemma3ForCausalLM as cls
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(0.9)
    return model
