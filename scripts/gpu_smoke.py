"""Exit 0 if the Triton decode attention matches its reference at E4B shapes on this GPU (bf16)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
ok = True
for B, T, S, D, window in ((1, 1, 521, 256, 512), (4, 8, 521, 256, 192), (1, 1, 4096, 512, 0), (8, 4, 4096, 512, 0)):
    q = torch.randn(B, T, 8, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, 2, S, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slot_pos = torch.arange(S, device=dev, dtype=torch.int32)[None].repeat(B, 1)
    slot_pos[:, S // 2:] = -1 if window == 0 else slot_pos[:, S // 2:]
    q_pos = (torch.arange(T, device=dev, dtype=torch.int32) + S // 2 - T)[None].repeat(B, 1)
    out = decode_attention(q, k, v, slot_pos, q_pos, window, 1.0, None).float()
    ref = decode_attention_ref(q.float(), k.float(), v.float(), slot_pos, q_pos, window, 1.0, None)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"B={B} T={T} S={S} D={D} window={window}: rel err {rel:.2e}")
    ok &= rel < 2e-2
sys.exit(0 if ok else 1)
