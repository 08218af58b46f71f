"""The single seam for every linear layer in the engine.

All projections go through `Linear`, so a different weight format (int4 W4A16 from Google's QAT
checkpoints, next) replaces this one class and nothing else. Weights are `[out, in]` row-major,
as in Hugging Face checkpoints; several projections that read the same input are fused into one
matrix at load time (QKV, gate+up) so decode reads each activation once and launches fewer kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x @ W.T, no bias (Gemma has none)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    @classmethod
    def fused(cls, weights: list[torch.Tensor]) -> "Linear":
        """One matrix for several projections of the same input; split the output with `split_sizes`."""
        return cls(torch.cat(weights, dim=0).contiguous())


def split_sizes(weights: list[torch.Tensor]) -> list[int]:
    return [w.shape[0] for w in weights]
