"""Convert speed from a cold page cache: raw read, nvq, and llm-compressor's model_free_ptq on the
same random bf16 checkpoint, in one run.

    python bench/convert_speed.py WORK_DIR [--preset llama-8b] [--layers N] [--device cuda|cpu]
        [--schemes nvfp4,mxfp4] [--peer-workers 1,4] [--ranks 1]

Builds (once, in WORK_DIR) the preset's checkpoint with bench/verify_scale.py's builder, then for
each run evicts the source's pages (fsync + POSIX_FADV_DONTNEED, and drop_caches where allowed)
and times the whole command as a child process (wall, peak RSS of the child). nvq's NVFP4/MXFP4
output is compared tensor by tensor with the peer's (same bytes expected on every tensor both
write). Targets (convert-speed issue, 8B shape, one H200): nvq nvfp4 ≤ 1.3× the raw read and
≥ 2.5× faster than the peer at its best `max_workers`. Prints one JSON object per run, then a
summary object.

The peer runs only where llmcompressor imports (its wheels are carried to the GPU machine); its
package __init__ pulls in a training stack, so a stand-in `datasets` module is installed first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import verify_scale  # noqa: E402

PEER_SCHEMES = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}
PEER = """
import sys, types
try:
    import datasets  # noqa: F401
except ImportError:  # only type hints and the calibration path use it: a stand-in will do
    stand_in = types.ModuleType("datasets")
    stand_in.__getattr__ = lambda name: type(name, (), {}) if not name.startswith("__") else None
    sys.modules["datasets"] = stand_in
import llmcompressor.core.session_functions  # noqa: F401  (import order the package needs)
from llmcompressor.entrypoints.model_free import model_free_ptq
src, out, scheme, workers, device = sys.argv[1:6]
model_free_ptq(src, out, scheme=scheme, ignore=["lm_head"], max_workers=int(workers), device=device)
"""


def evict(paths: list[Path]) -> str:
    """Drop the checkpoint's cached pages so the next read comes from the disk. Only those: a
    global drop_caches would also evict torch's libraries and time their reload instead."""
    os.sync()
    how = "fadvise"
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return how


def run_child(name: str, cmd: list[str], inputs: list[Path], env: dict | None = None, cold: bool = True) -> dict:
    how = evict(inputs) if cold else "warm"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"run": name, "wall_s": round(wall, 2), "rc": proc.returncode, "evict": how,
           "peak_rss_gib": round(after.ru_maxrss / 2**20, 2),  # max over children so far
           "user_s": round(after.ru_utime - before.ru_utime, 1), "sys_s": round(after.ru_stime - before.ru_stime, 1)}
    if proc.returncode:
        row["stderr"] = proc.stderr[-2000:]
    elif cmd[1:4] == ["-m", "nvq", "convert"] and "--json" in cmd:
        row["nvq_seconds"] = json.loads(proc.stdout)["seconds"]  # inside convert(), after imports
    print(json.dumps(row), flush=True)
    return row


def same_tensors(a: Path, b: Path) -> dict:
    """Tensors both directories hold, and how many are byte-identical."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out |= {k: f for k in h.keys()}  # noqa: SIM118 - safe_open has no __iter__
        return out

    ia, ib = index(a), index(b)
    common = sorted(set(ia) & set(ib))
    differ = []
    for name in common:
        with safe_open(ia[name], "pt") as ha, safe_open(ib[name], "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
            if x.shape != y.shape or not x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)):
                differ.append(name)
    return {"common": len(common), "identical": len(common) - len(differ), "differ": differ[:5],
            "only_nvq": sorted(set(ia) - set(ib))[:5], "only_peer": sorted(set(ib) - set(ia))[:5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--preset", default="llama-8b", choices=sorted(verify_scale.PRESETS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--schemes", default="nvfp4,mxfp4")
    ap.add_argument("--peer-workers", default="1,4")
    ap.add_argument("--ranks", default="1", help="comma list of torchrun process counts for nvq (nvfp4)")
    ap.add_argument("--read-threads", default="", help="comma list of NVQ_READ_THREADS values to try (nvfp4)")
    ap.add_argument("--warm", action="store_true", help="also time nvq nvfp4 with the source in the page cache")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="python of a venv holding llmcompressor 0.14 (its pins differ from nvq's)")
    args = ap.parse_args()
    layers = args.layers or verify_scale.PRESETS[args.preset]["layers"]
    src = args.work / f"{args.preset}-L{layers}" / "bf16"
    if not src.exists():
        t0 = time.perf_counter()
        verify_scale.build(src, args.preset, layers, args.device)
        print(json.dumps({"build_s": round(time.perf_counter() - t0, 1)}), flush=True)
    shards = sorted(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    py = sys.executable
    rows = {"raw": run_child("raw read (cat)", ["sh", "-c", " ".join(["cat", *map(str, shards), "> /dev/null"])], shards)}
    probe = subprocess.run([args.peer_python, "-c", PEER.split("src, out")[0]], capture_output=True, text=True)
    peer_ok = probe.returncode == 0
    if not peer_ok:
        print(json.dumps({"peer": "not importable", "stderr": probe.stderr[-1500:]}), flush=True)
    compare = {}
    for scheme in args.schemes.split(","):
        out = args.work / f"out-nvq-{scheme}"
        shutil.rmtree(out, ignore_errors=True)
        nvq_cmd = [py, "-m", "nvq", "convert", str(src), str(out), "--scheme", scheme, "--device", args.device,
                   "--json"]
        rows[f"nvq-{scheme}"] = run_child(f"nvq {scheme}", nvq_cmd, shards)
        if scheme == "nvfp4":
            for n in [int(x) for x in args.read_threads.split(",") if x]:
                shutil.rmtree(out, ignore_errors=True)
                rows[f"nvq-{scheme}-t{n}"] = run_child(f"nvq {scheme} NVQ_READ_THREADS={n}", nvq_cmd, shards,
                                                       env={"NVQ_READ_THREADS": str(n)})
            if args.warm:
                shutil.rmtree(out, ignore_errors=True)
                rows[f"nvq-{scheme}-warm"] = run_child(f"nvq {scheme} (warm cache)", nvq_cmd, shards, cold=False)
        for ranks in [int(r) for r in args.ranks.split(",") if int(r) > 1 and scheme == "nvfp4"]:
            out_r = args.work / f"out-nvq-{scheme}-r{ranks}"
            shutil.rmtree(out_r, ignore_errors=True)
            rows[f"nvq-{scheme}-r{ranks}"] = run_child(
                f"nvq {scheme} torchrun {ranks}",
                [py, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "-m", "nvq", "convert", str(src),
                 str(out_r), "--scheme", scheme, "--device", args.device], shards,
                env={"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
            rows[f"nvq-{scheme}-r{ranks}"]["identical_to_one_rank"] = all(
                subprocess.run(["cmp", str(f), str(out_r / f.name)], capture_output=True).returncode == 0
                for f in sorted(out.iterdir()))
        if not peer_ok:
            continue
        for w in [int(x) for x in args.peer_workers.split(",")]:
            peer_out = args.work / f"out-peer-{scheme}-w{w}"
            shutil.rmtree(peer_out, ignore_errors=True)
            dev = "cuda:0" if args.device == "cuda" else "cpu"
            rows[f"peer-{scheme}-w{w}"] = run_child(
                f"llm-compressor model_free_ptq {PEER_SCHEMES[scheme]} max_workers={w}",
                [args.peer_python, "-c", PEER, str(src), str(peer_out), PEER_SCHEMES[scheme], str(w), dev], shards)
        kept = args.work / f"out-peer-{scheme}-w{args.peer_workers.split(',')[0]}"
        compare[scheme] = same_tensors(out, kept)
        for p in args.work.glob(f"out-*-{scheme}*"):  # disk: the next scheme's outputs need the room
            shutil.rmtree(p, ignore_errors=True)
    import torch

    summary = {"preset": args.preset, "layers": layers, "source_gb": round(size / 1e9, 2),
               "raw_read_gbps": round(size / 1e9 / rows["raw"]["wall_s"], 2), "compare": compare,
               "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "ranks_identical": {k: r["identical_to_one_rank"] for k, r in rows.items() if "identical_to_one_rank" in r}}
    for scheme in args.schemes.split(","):
        nvq = rows[f"nvq-{scheme}"]["wall_s"]
        summary[f"{scheme}_vs_raw"] = round(nvq / rows["raw"]["wall_s"], 2)
        peers = [r["wall_s"] for k, r in rows.items() if k.startswith(f"peer-{scheme}-") and not r["rc"]]
        if peers:
            summary[f"{scheme}_peer_best_over_nvq"] = round(min(peers) / nvq, 2)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
