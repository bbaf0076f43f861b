"""GPTQ solver (formats.md §4.3): quantize one weight W [N, K] to int4 so that the error on the
calibration inputs, tr(ΔW·H·ΔWᵀ) with H = 2/n·Σ xᵀx, is small, column by column with the
Cholesky factor of H⁻¹ carrying each column's error into the columns not yet quantized.

Choices (all deterministic for the same W and H):
* dampening λ·mean(diag H) with λ = `damp` (0.01), raised by 0.01 until the Cholesky succeeds;
* lazy block updates of `block` (128) columns;
* act-order with static groups: columns are solved in descending diag(H) order, but every group's
  scale is fitted on the original W first, so g_idx stays k // G and vLLM can load the result;
* dead inputs (diag H = 0) are zeroed, as in the reference.
`H = None` (or an identity) makes GPTQ round-to-nearest: no error reaches other columns.

On CUDA a block's column loop is ~1.5k tiny kernels whose launches, not their math, cost the time;
it is captured once per block shape as a CUDA graph and replayed (`columns_graph`), running the
same kernels on the same values, so the bits do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvq.formats import int4

DEFAULT_DAMP = 0.01
DAMP_STEP = 0.01
DAMP_LIMIT = 1.0
DEFAULT_BLOCK = 128


@dataclass(frozen=True)
class Solution:
    quantized: int4.Int4Quantized
    damp: float  # the dampening that made H positive definite
    error: float  # ‖ΔW·X‖/‖W·X‖ over the calibration inputs X: the layer output's relative L2 error
    dead_inputs: int


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Relative L2 error of the output, √(tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)), for inputs with second moment h."""
    d = (w_hat - w).double()
    hd = h.double()
    den = ((w.double() @ hd) * w.double()).sum()
    num = ((d @ hd) * d).sum()
    return float((num / den).sqrt()) if den > 0 else float(num.sqrt())


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, raising λ until H is positive definite."""
    mean_diag = h.diagonal().mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    while True:
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper, damp
        damp += DAMP_STEP
        if damp > DAMP_LIMIT:
            raise ValueError("the calibration Hessian stays singular even with dampening 1.0")


def columns(W1: torch.Tensor, err1: torch.Tensor, codes1: torch.Tensor, u1: torch.Tensor,
            scale1: torch.Tensor, zero1: torch.Tensor) -> None:
    """One block of columns: quantize each, write its code, carry its error into the block's later
    columns (W1 in place), and keep the error for the update of the columns after the block.
    scale1/zero1 hold each column's group parameters."""
    for i in range(W1.shape[1]):
        col = W1[:, i]
        s, z = scale1[:, i], zero1[:, i]
        q = int4.quantize_codes(col, s, z)
        codes1[:, i] = q
        e = (col - s * (q - z)) / u1[i, i]
        W1[:, i:] -= e[:, None] * u1[i, i:][None, :]
        err1[:, i] = e


class _ColumnsGraph:
    """`columns` captured once as a CUDA graph for blocks of [rows, width]: one launch per block
    instead of ~12 per column, the same kernels on the same values, so the same bits."""

    def __init__(self, rows: int, width: int, device: torch.device):
        def buf(r: int, c: int) -> torch.Tensor:
            return torch.zeros(r, c, device=device)

        self.args = (buf(rows, width), buf(rows, width), buf(rows, width),
                     torch.eye(width, device=device), buf(rows, width), buf(rows, width))
        # one eager pass first: kernels load and the allocator warms up outside the capture
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            columns(*self.args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            columns(*self.args)

    def __call__(self, W1: torch.Tensor, err1: torch.Tensor, codes1: torch.Tensor, u1: torch.Tensor,
                 scale1: torch.Tensor, zero1: torch.Tensor) -> None:
        sW1, serr1, scodes1, su1, sscale1, szero1 = self.args
        sW1.copy_(W1)
        su1.copy_(u1)
        sscale1.copy_(scale1)
        szero1.copy_(zero1)
        self.graph.replay()  # writes every column of err1 and codes1
        err1.copy_(serr1)
        codes1.copy_(scodes1)


_graphs: dict[tuple, _ColumnsGraph | None] = {}
USE_GRAPHS = True


def columns_graph(rows: int, width: int, device: torch.device) -> _ColumnsGraph | None:
    """The captured `columns` for this block shape on a CUDA device, or None (CPU, or capture failed)."""
    if device.type != "cuda" or not USE_GRAPHS:
        return None
    key = (rows, width, device)
    if key not in _graphs:
        try:
            _graphs[key] = _ColumnsGraph(rows, width, device)
        except RuntimeError:  # capture unsupported here: the eager loop computes the same
            _graphs[key] = None
    return _graphs[key]


def solve(
    w: torch.Tensor,
    h: torch.Tensor | None,
    group_size: int,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    block: int = DEFAULT_BLOCK,
) -> Solution:
    """GPTQ of w [N, K] against Hessian h [K, K] (fp32, on w's device); symmetric int4."""
    n, k = w.shape
    g = int4.check_group_size(k, group_size)
    dev = w.device
    W = w.detach().float().clone()
    H = torch.eye(k, device=dev) if h is None else h.detach().float().clone().to(dev)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    # static groups: every group's scale comes from the original W (after dead columns)
    scale, zero = int4.fit_params(W.reshape(n, k // g, g), sym=True)  # [N, K/G]
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(k, device=dev)
    W = W[:, order]
    H = H[order][:, order]
    U, used_damp = _inverse_cholesky(H, damp)
    group_of = order // g
    codes = torch.empty((n, k), dtype=torch.float32, device=dev)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        err1 = torch.empty_like(W1)
        groups = group_of[i1:i2]
        step = columns_graph(n, i2 - i1, dev) or columns
        step(W1, err1, codes[:, i1:i2], U[i1:i2, i1:i2], scale[:, groups], zero[:, groups])
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    inverse = torch.argsort(order)
    codes = codes[:, inverse]
    q = int4.Int4Quantized(codes.to(torch.uint8), scale.half(), zero.to(torch.uint8), g)
    h_err = torch.eye(k, device=dev) if h is None else h.float().to(dev)
    error = output_error(w.float(), int4.dequantize(q, torch.float32), h_err)
    return Solution(q, used_damp, error, int(dead.sum()))
