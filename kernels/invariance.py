"""The row-invariance switch, read from the environment in this one place.

Speculative decoding is lossless only if a verify step that scores T = K+1 positions per stream
computes each position bit for bit like a T = 1 decode step. On the GPU that holds only when no
kernel lets a row's arithmetic (block sizes, split counts, reduction order) depend on how many
rows share the launch. With `ROW_INVARIANT` on (the default):
  * `kernels.gemv` runs every M <= 16 with the same tensor-core tile and split-K;
  * `kernels.decode_attention` uses a fixed row block and num_warps per head dim, and a KV split
    count from S, B x Hkv and the SM count only;
  * `engine.ops` sends every norm (hidden dim and per-head) to the one-row-per-program Triton
    kernels of `kernels.rmsnorm` / `kernels.head_norm` instead of torch.compile, whose reduction
    config follows the row count.

`VKAE_ROW_INVARIANT=0` turns it off (the faster-per-launch heuristics, not lossless in bf16).
Code reads `invariance.ROW_INVARIANT` at call time, so a benchmark can flip it in one process
(re-capture CUDA graphs and reset `engine.ops` compiled kernels after flipping).
This module must not import triton: the engine reads the switch without pulling in triton,
which the kernel tests need to import first under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

ROW_INVARIANT: bool = os.environ.get("VKAE_ROW_INVARIANT", "1") != "0"
