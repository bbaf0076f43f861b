"""One call of each nvq kernel on an 8192×28672 bf16 weight, for `ncu` to profile:

    ncu --kernel-name regex:nvq --metrics ... python bench/profile_kernels.py
"""

import torch

from nvq import ops

w = (torch.randn(8192, 28672, device="cuda") * 0.02).to(torch.bfloat16)
for _ in range(2):  # the second round is the one to read (warm caches and clocks)
    g = ops.nvfp4_global_scale(ops.tensor_amax(w), w.dtype)
    packed, scale = ops.nvfp4_quantize_packed(w, g)
    ops.nvfp4_dequantize_packed(packed, scale, g, torch.bfloat16)
    mx_packed, mx_scale = ops.mxfp4_quantize_packed(w)
    ops.mxfp4_dequantize_packed(mx_packed, mx_scale, torch.bfloat16)
torch.cuda.synchronize()
assert all(ops.backend(op) == "cuda" for op in ops.OPS), {op: ops.backend(op) for op in ops.OPS}
