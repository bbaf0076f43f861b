"""Header parse time of nvq.io.gguf.GGUFFile vs gguf-py's GGUFReader on a synthetic 256k vocab.

    python bench/gguf_header.py [--merges] [--reader]

Writes a GGUF (in a temporary directory) whose metadata holds a 262144-token vocabulary like
gemma-3's (tokens, scores, token types; `--merges` adds 262143 BPE merges as a gpt2-style vocab
would) and one small tensor, then times `GGUFFile.open` (best of 5) and, with `--reader`,
`gguf.GGUFReader` (once; it takes seconds). oracle.md §1 measured GGUFReader at 11 s on the real
gemma-3-270m file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

N_VOCAB = 1 << 18


def write(path: Path, merges: bool) -> None:
    import gguf

    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzé▁你")
    lengths = rng.integers(1, 9, N_VOCAB)
    tokens = [f"{i}" + "".join(rng.choice(alphabet, n)) for i, n in enumerate(lengths)]
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_token_list(tokens)
    w.add_token_scores([float(-i) for i in range(N_VOCAB)])
    w.add_token_types([1] * N_VOCAB)
    if merges:
        w.add_token_merges([f"{tokens[i]} {tokens[i + 1]}" for i in range(N_VOCAB - 1)])
    w.add_tensor("token_embd.weight", np.zeros((16, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    from nvq.io.gguf import GGUFFile

    ap = argparse.ArgumentParser()
    ap.add_argument("--merges", action="store_true")
    ap.add_argument("--reader", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "vocab.gguf"
        write(path, args.merges)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            GGUFFile.open(path)
            times.append(time.perf_counter() - t0)
        what = "tokens+scores+types" + ("+merges" if args.merges else "")
        print(f"{path.stat().st_size / 1e6:.1f} MB header, {what}: GGUFFile.open best {min(times):.3f} s")
        if args.reader:
            import gguf

            t0 = time.perf_counter()
            gguf.GGUFReader(path)
            print(f"gguf.GGUFReader: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
