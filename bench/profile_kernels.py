"""One call of each nvq kernel on an 8192×28672 bf16 weight (and one 128×704×2816 expert stack),
for `ncu` to profile:

    ncu --kernel-name regex:'amax|quantize|table' --metrics ... python bench/profile_kernels.py
"""

import torch

from nvq import ops

w = (torch.randn(8192, 28672, device="cuda") * 0.02).to(torch.bfloat16)
stack = (torch.randn(128, 704, 2816, device="cuda") * 0.02).to(torch.bfloat16)
for _ in range(2):  # the second round is the one to read (warm caches and clocks)
    g = ops.nvfp4_global_scale(ops.tensor_amax(w), w.dtype)
    packed, scale = ops.nvfp4_quantize_packed(w, g)
    ops.nvfp4_dequantize_packed(packed, scale, g, torch.bfloat16)
    mx_packed, mx_scale = ops.mxfp4_quantize_packed(w)
    ops.mxfp4_dequantize_packed(mx_packed, mx_scale, torch.bfloat16)
    ops.nvfp4_quantize_experts(stack)
torch.cuda.synchronize()
used = {op: ops.backend(op) for op in ("tensor_amax", "nvfp4_quantize_packed", "mxfp4_quantize_packed",
                                        "nvfp4_dequantize_packed", "mxfp4_dequantize_packed", "nvfp4_quantize_experts")}
assert set(used.values()) == {"cuda"}, used
