"""The single seam for every linear layer in the engine.

All projections go through `Linear`, so a different weight format (int4 W4A16 from Google's QAT
checkpoints, next) replaces this one class and nothing else. Weights are `[out, in]` row-major,
as in Hugging Face checkpoints; several projections that read the same input are fused into one
matrix at load time (QKV, gate+up) so decode reads each activation once and launches fewer kernels.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# Decode/verify widths (<= 16 rows) on CUDA: "all" (default) sends every matrix to the batch-invariant
# Triton GEMV, so a verify of K+1 positions equals K+1 decode steps bit for bit (cuBLAS picks other
# kernels for 1 and for 9 rows); "auto" only matrices up to SMALL_MATRIX elements; "off" keeps cuBLAS.
# Read at call time, so a benchmark can A/B it in one process.
GEMV_POLICY = os.environ.get("VKAE_GEMV", "all")
SMALL_MATRIX = 16 * 2**20
MAX_GEMV_ROWS = 16


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
        return matmul(x, self.weight)

    @classmethod
    def fused(cls, weights: list[torch.Tensor]) -> "Linear":
        """One matrix for several projections of the same input; split the output with `split_sizes`."""
        return cls(torch.cat(weights, dim=0).contiguous())


def routes_to_gemv(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `matmul(x, w)` takes the small-M GEMV path (decode/verify widths on CUDA) under the
    policy above; `engine.fused_tail` fuses epilogues into exactly these calls."""
    return x.is_cuda and GEMV_POLICY != "off" and x.numel() <= MAX_GEMV_ROWS * x.shape[-1] and (
        GEMV_POLICY == "all" or w.numel() <= SMALL_MATRIX)


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T through the decode-width policy above (also used for the tied LM head)."""
    if routes_to_gemv(x, w):
        from kernels.gemv import linear_small_m

        return linear_small_m(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], -1)
    return F.linear(x, w)


def split_sizes(weights: list[torch.Tensor]) -> list[int]:
    return [w.shape[0] for w in weights]
