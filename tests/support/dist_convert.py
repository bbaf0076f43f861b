"""`torchrun … dist_convert.py SRC OUT SCHEME SHARD_BYTES`: nvq's convert() on every rank, with
shard sizes below what the CLI accepts, so tiny models span several shards."""

import sys

from nvq.quant.pipeline import convert

if __name__ == "__main__":
    src, out, scheme, shard_bytes = sys.argv[1:5]
    convert(src, out, scheme, device="cpu", max_shard_bytes=int(shard_bytes))
