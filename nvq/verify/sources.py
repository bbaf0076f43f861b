"""Lazy canonical tensor sources for the streamed verifier: a candidate directory read one tensor
at a time, with partial reads for what the forward needs only part of.

`CandidateSource` is a `Mapping[str, torch.Tensor]` over the canonical names `load_candidate`
gives, with the same float32 values and schemes, but each tensor is read (positional reads of its
own bytes) and decoded when it is accessed, and never kept. Its partial reads are the ones
`nvq.models.layers.Weights` uses when present: `rows(name, ids)` (embedding lookup),
`row_block(name, start, stop)` (LM head chunks), `expert(name, e)` (one expert of a fused stack,
decoded from that expert's modules only). The GGUF counterpart is `nvq.io.gguf_model.GGUFSource`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from nvq.io.rows import read_row_set
from nvq.verify.candidate import Candidate, Layout, Scheme, Source, merge_findings, open_layout
from nvq.verify.serving import DEFAULT_SERVING, SERVINGS, Serving


class CandidateSource(Mapping[str, torch.Tensor]):
    """A candidate checkpoint as {canonical name: float32 tensor}, read on access.

    Rows of a tensor stored dense are read alone; a quantized module is decoded whole before its
    rows are cut out (its codes may not be laid out by rows, as GPTQ's are not).
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    @classmethod
    def open(cls, path: str | Path, device: str | torch.device = "cpu",
             serving: Serving = SERVINGS[DEFAULT_SERVING]) -> CandidateSource:
        layout = open_layout(path, serving)
        layout.device = torch.device(device)
        return cls(layout)

    @property
    def path(self) -> Path:
        return self.layout.ckpt.path

    @property
    def arch(self):
        return self.layout.arch

    @property
    def config(self):
        return self.layout.ckpt.config

    @property
    def format(self) -> str:
        return self.layout.format

    @property
    def schemes(self) -> dict[str, Scheme]:
        """canonical name → how the candidate stores it (Candidate.schemes)."""
        return {n: src.scheme for n, src in self.layout.sources.items()}

    def source(self, name: str) -> Source:
        try:
            return self.layout.sources[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor '{name}' (canonical name)") from None

    def storage(self, name: str) -> Scheme:
        return self.source(name).scheme

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the headers where it is stored dense (else by decoding it)."""
        src = self.source(name)
        if self._dense_leaf(src):
            return tuple(self.layout.ckpt.info(src.name).shape)
        return tuple(self[name].shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.layout.read(self.source(name))

    def __contains__(self, name: object) -> bool:
        return name in self.layout.sources  # Mapping's default would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.sources)

    def __len__(self) -> int:
        return len(self.layout.sources)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any order, repeats allowed) of a 2-D tensor."""
        src = self.source(name)
        if self._dense_leaf(src):
            return read_row_set(lambda a, b: self.layout.ckpt.read_rows(src.name, a, b).float(), ids)
        return self.layout.read(src)[ids.long()]

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor's 2-D view [prod(shape[:-1]), shape[-1]]."""
        src = self.source(name)
        if self._dense_leaf(src):
            return self.layout.ckpt.read_rows(src.name, start, stop).float()
        t = self.layout.read(src)
        return t.reshape(-1, t.shape[-1])[start:stop]

    def expert(self, name: str, e: int) -> torch.Tensor:
        """Expert e `[rows, cols]` of a fused `[E, rows, cols]` stack."""
        src = self.source(name)
        if src.experts:
            if not 0 <= e < len(src.experts):
                raise ValueError(f"tensor '{name}' has {len(src.experts)} experts, not an expert {e}.")
            return self.layout.read_expert(src, e)
        shape = self.layout.ckpt.info(src.name).shape if self._dense_leaf(src) else None
        if shape is None or len(shape) != 3 or not 0 <= e < shape[0]:
            raise ValueError(f"tensor '{name}' is not a fused expert stack with an expert {e}.")
        n = shape[1]  # a stack stored fused and dense: expert e is rows e·n..(e+1)·n of the 2-D view
        return self.layout.ckpt.read_rows(src.name, e * n, (e + 1) * n).float().reshape(shape[1:])

    @staticmethod
    def _dense_leaf(src: Source) -> bool:
        return src.module is None and not src.experts


def shape_of(tensors, name: str) -> tuple[int, ...]:
    """A tensor's shape without reading it where the mapping is a lazy source."""
    shape = getattr(tensors, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(tensors[name].shape)


def open_candidate(path: str | Path, device: str | torch.device = "cpu",
                   serving: Serving = SERVINGS[DEFAULT_SERVING]) -> Candidate:
    """A candidate whose tensors are a `CandidateSource` (read on access). Group indices and client
    findings of quantized modules whose codec reports them (GPTQ) are gathered module by module,
    keeping none of the weights."""
    source = CandidateSource.open(path, device, serving)
    lay = source.layout
    cand = Candidate(lay.ckpt.path, lay.arch, lay.ckpt.config, source, source.schemes, lay.format,
                     client_findings=list(lay.codec.findings if lay.codec else ()))
    if lay.codec is not None and lay.codec.read is not None:
        for c, src in lay.sources.items():
            if not src.scheme.quantized:
                continue
            read = lay.read_full(src)
            if read.groups is not None and not read.trivial:
                cand.group_index[c] = read.groups
            cand.client_findings += merge_findings([replace(f, tensor=c) for f in read.findings])
    return cand
