"""Input checks and block reshaping shared by the NVFP4 and MXFP4 reference codecs."""

import torch
from torch import Tensor

WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_weight(w: Tensor, block: int, fmt: str) -> None:
    """Raise ValueError unless `w` is a 2-D bf16/fp16/fp32 [N, K] tensor with K % block == 0."""
    if not isinstance(w, Tensor):
        raise ValueError(f"{fmt} quantize takes a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{fmt} quantize takes bfloat16, float16 or float32, got {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"{fmt} quantize takes a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    if w.shape[1] % block:
        raise ValueError(f"{fmt} needs K % {block} == 0, got K={w.shape[1]}")


def check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{what} must be bfloat16, float16 or float32, got {dtype}")


def sanitize(w: Tensor) -> Tensor:
    """The reference's non-finite policy: NaN -> 0, ±Inf -> ±(largest finite of w.dtype)."""
    return torch.nan_to_num(w, nan=0.0)


def split_blocks(w: Tensor, block: int) -> Tensor:
    """[N, K] -> [N, K/block, block] (a view)."""
    return w.reshape(w.shape[0], w.shape[1] // block, block)


def max_abs(w: Tensor) -> Tensor:
    """0-d max |w| in w.dtype (exact); 0 for an empty tensor."""
    if w.numel() == 0:
        return torch.zeros((), dtype=w.dtype, device=w.device)
    return w.abs().amax()
