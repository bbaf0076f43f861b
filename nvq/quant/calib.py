"""Calibration token ids for GPTQ: a corpus (the embedded public-domain text, or `--calib-file`)
tokenized with the checkpoint's own tokenizer and cut into N windows of L tokens.

Windows start at evenly spaced offsets over the token stream, so every part of the corpus is
used; when N·L exceeds the stream the windows overlap (reported), and when one window is longer
than the whole stream the request is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from nvq import limits
from nvq.errors import ConfigError
from nvq.io.tokenizer import load_tokenizer

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 2048
CORPUS = "calibration.txt"


@dataclass(frozen=True)
class CalibrationSet:
    sequences: list[torch.Tensor]  # int64 [L] each
    source: str
    overlap: bool  # windows share tokens (the corpus is shorter than N·L)

    @property
    def n_tokens(self) -> int:
        return sum(int(s.numel()) for s in self.sequences)


def corpus_text(calib_file: str | Path | None = None) -> tuple[str, str]:
    """(text, source description) of the calibration corpus."""
    if calib_file is None:
        return resources.files("nvq.data").joinpath(CORPUS).read_text(encoding="utf-8"), "embedded corpus"
    return limits.read_text_file(calib_file, "--calib-file", limits.MAX_CALIB_FILE_BYTES), f"--calib-file {calib_file}"


def windows(stream: torch.Tensor, n_samples: int, seq_len: int) -> list[torch.Tensor]:
    """N windows of L tokens at evenly spaced starts over the stream (the last ends at its end)."""
    span = stream.numel() - seq_len
    if span < 0:
        raise ConfigError(
            f"the calibration text gives {stream.numel()} tokens, fewer than one sequence of {seq_len}; "
            "use a longer --calib-file or a smaller --calib-seq-len."
        )
    starts = [round(i * span / max(n_samples - 1, 1)) for i in range(n_samples)]
    return [stream[s : s + seq_len].clone() for s in starts]


def calibration_set(
    model_dir: str | Path,
    vocab_size: int,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    calib_file: str | Path | None = None,
) -> CalibrationSet:
    if n_samples < 1 or seq_len < 2:
        raise ConfigError(f"calibration needs at least 1 sample of 2 tokens, not {n_samples} × {seq_len}.")
    text, source = corpus_text(calib_file)
    tok = load_tokenizer(Path(model_dir), "GPTQ calibration needs the model's tokenizer (use --method rtn without one)")
    ids = tok.encode(text).ids
    bad = next((i for i in ids if i >= vocab_size), None)
    if bad is not None:
        raise ConfigError(
            f"{model_dir}: the tokenizer gives id {bad} but the embedding has {vocab_size} rows: "
            "tokenizer and model vocabularies do not match."
        )
    stream = torch.tensor(ids, dtype=torch.long)
    seqs = windows(stream, n_samples, seq_len)
    return CalibrationSet(seqs, source, n_samples * seq_len > stream.numel())
