"""Convert under torchrun: two gloo ranks split the fusion groups, write into shared shards, and
produce the same bytes as one process, file for file. The launches go through the real CLI
(`python -m torch.distributed.run … -m nvq convert`), as a user runs it."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nvq import dist
from nvq.io.hf import Checkpoint
from nvq.quant.pipeline import convert

SHARD_BYTES = 20_000  # the tiny models span several shards, and groups of both ranks share some
LAUNCHER = Path(__file__).parents[1] / "support" / "dist_convert.py"


def digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, ranks: int = 2, module: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    target = ["-m", "nvq"] if module else [str(LAUNCHER)]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *target, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_two_ranks_write_the_bytes_of_one_process(tiny_llama, tmp_path, scheme):
    single = tmp_path / "single"
    convert(tiny_llama, single, scheme, device="cpu")
    run = torchrun("convert", tiny_llama, tmp_path / "two", "--scheme", scheme, "--device", "cpu")
    assert run.returncode == 0, run.stderr[-3000:]
    assert digest(tmp_path / "two") == digest(single)
    assert run.stdout.count("weights quantized") == 1, run.stdout  # rank 0 alone prints the summary
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporaries left behind"


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma4_moe"])
def test_two_ranks_share_many_shards(request, model, tmp_path):
    src = request.getfixturevalue(model)
    single = tmp_path / "single"
    convert(src, single, "nvfp4", device="cpu", max_shard_bytes=SHARD_BYTES)
    assert len(list(single.glob("*.safetensors"))) > 2
    run = torchrun(src, tmp_path / "two", "nvfp4", SHARD_BYTES, module=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert digest(tmp_path / "two") == digest(single)


def test_gptq_calibrates_on_rank_zero_and_matches_one_process(tiny_llama, tmp_path):
    args = ["--scheme", "gptq", "--device", "cpu", "--calib-samples", "2", "--calib-seq-len", "16"]
    single = subprocess.run([sys.executable, "-m", "nvq", "convert", str(tiny_llama), str(tmp_path / "single"), *args],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    run = torchrun("convert", tiny_llama, tmp_path / "two", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert digest(tmp_path / "two") == digest(tmp_path / "single")


def test_a_refusal_on_rank_zero_stops_every_rank_with_exit_2(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run = torchrun("convert", tiny_llama, out, "--scheme", "nvfp4", "--device", "cpu")
    assert run.returncode != 0  # torchrun reports its own failure; each rank says one sentence
    assert run.stderr.count("already exists; pass --force to replace it.") == 2, run.stderr[-3000:]
    assert "/nvq/" not in run.stderr, run.stderr[-3000:]  # no traceback out of nvq
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "mine"


def test_groups_are_split_by_size_the_same_way_on_every_rank(tiny_gemma4_moe):
    ckpt = Checkpoint.open(tiny_gemma4_moe)
    sizes = [t.nbytes for t in ckpt.tensors.values()]
    owners = dist.split_by_size(sizes, 3)
    assert owners == dist.split_by_size(sizes, 3)
    load = [sum(s for s, o in zip(sizes, owners, strict=True) if o == r) for r in range(3)]
    assert max(load) - min(load) <= max(sizes)  # greedy: within one item of balanced
    assert dist.split_by_size([5, 5, 1], 1) == [0, 0, 0]


def test_world_without_torchrun_variables_is_one_process(monkeypatch):
    monkeypatch.setattr(dist, "_joined", None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = dist.join()
    assert (world.rank, world.size, world.distributed) == (0, 1, False)
    assert world.broadcast("x") == "x" and world.gather(3) == [3]
