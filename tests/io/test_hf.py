import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nvq.errors import CheckpointError, ConfigError
from nvq.io.hf import SIDE_FILES, Checkpoint, HFConfig, load_config
from nvq.io.safetensors import INDEX_NAME, OutputTensor, ShardedWriter

REPO_ROOT = Path(__file__).resolve().parents[2]

GEMMA4_NESTED = {
    "model_type": "gemma4",
    "architectures": ["Gemma4ForConditionalGeneration"],
    "hidden_size": 999,  # a wrapper-level value that text_config must override
    "tie_word_embeddings": True,
    "text_config": {"model_type": "gemma4_text", "hidden_size": 64, "num_attention_heads": 8},
}
GEMMA4_FLAT = {
    "model_type": "gemma4_text",
    "architectures": ["Gemma4ForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 8,
    "tie_word_embeddings": True,
}


# ---------------------------------------------------------------------------------------------
# HFConfig / load_config


def test_text_config_fields_are_found_and_take_precedence():
    cfg = HFConfig(Path("config.json"), GEMMA4_NESTED)
    assert cfg.get("num_attention_heads") == 8  # only inside text_config
    assert cfg.require("num_attention_heads") == 8
    assert cfg.get("hidden_size") == 64  # text_config wins over the top level
    assert cfg.get("tie_word_embeddings") is True  # only at the top level
    assert cfg.get("num_experts", 0) == 0
    assert "num_attention_heads" in cfg and "num_experts" not in cfg
    assert (cfg.model_type, cfg.text_model_type) == ("gemma4", "gemma4_text")
    assert cfg.architectures == ["Gemma4ForConditionalGeneration"]


@pytest.mark.parametrize("raw", [GEMMA4_NESTED, GEMMA4_FLAT], ids=["nested", "flat"])
def test_both_gemma4_dialects_read_alike(raw):
    cfg = HFConfig(Path("config.json"), raw)
    assert [cfg.get(k) for k in ("hidden_size", "num_attention_heads", "tie_word_embeddings")] == [
        64,
        8,
        True,
    ]
    assert cfg.text_model_type == "gemma4_text"


def test_flat_config_text_is_the_config_itself():
    cfg = HFConfig(Path("config.json"), {"model_type": "llama", "text_config": None})
    assert cfg.text is cfg.raw
    assert cfg.text_model_type == "llama"
    assert cfg.architectures == []


@pytest.mark.parametrize(
    "raw,where",
    [(GEMMA4_NESTED, "top level and in text_config"), (GEMMA4_FLAT, "top level")],
)
def test_require_names_the_field_and_where_it_looked(raw, where):
    cfg = HFConfig(Path("/m/config.json"), raw)
    with pytest.raises(ConfigError) as e:
        cfg.require("intermediate_size")
    assert (
        str(e.value) == f"/m/config.json: field 'intermediate_size' is missing (looked at {where})."
    )


def _config_dir(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    return tmp_path


def test_load_config_reads_a_directory(tmp_path):
    cfg = load_config(_config_dir(tmp_path, json.dumps(GEMMA4_NESTED)))
    assert cfg.path == tmp_path / "config.json"
    assert cfg.raw == GEMMA4_NESTED


@pytest.mark.parametrize(
    "text,fragment",
    [
        (None, "has no config.json"),
        (
            '{"model_type": "llama",\n  "hidden_size": 64,,}',
            "not valid JSON: Expecting property name",
        ),
        ("[1, 2]", "holds a JSON list"),
        ('{"hidden_size": 64}', "no 'model_type'"),
    ],
    ids=["missing", "malformed", "not_an_object", "no_model_type"],
)
def test_bad_config_is_a_config_error_naming_the_file(tmp_path, text, fragment):
    if text is not None:
        _config_dir(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert fragment in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_malformed_config_reports_line_and_column(tmp_path):
    _config_dir(tmp_path, '{"model_type": "llama",\n  "hidden_size": 64,,}')
    with pytest.raises(ConfigError, match="at line 2 column 21"):
        load_config(tmp_path)


# ---------------------------------------------------------------------------------------------
# Checkpoint


def _model_dir(path: Path, tensors: dict[str, torch.Tensor], max_shard_bytes=1 << 30) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    plan = [OutputTensor(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    w = ShardedWriter(path, plan, max_shard_bytes)
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    return path


TENSORS = {
    f"layers.{i}.w": torch.arange(12, dtype=torch.float32).reshape(3, 4) + i for i in range(4)
}


def test_sharded_checkpoint_reads_through_its_index(tmp_path):
    root = _model_dir(tmp_path / "m", TENSORS, max_shard_bytes=50)
    assert (root / INDEX_NAME).exists()
    ckpt = Checkpoint.open(root)
    assert ckpt.path == root and ckpt.config.model_type == "llama"
    assert set(ckpt.tensors) == set(TENSORS)
    assert len({info.path for info in ckpt.tensors.values()}) == 4
    for name, t in TENSORS.items():
        assert torch.equal(ckpt.read(name), t)
    assert torch.equal(ckpt.read_rows("layers.2.w", 1, 3), TENSORS["layers.2.w"][1:3])
    with pytest.raises(CheckpointError, match="has no tensor named 'layers.9.w'"):
        ckpt.read("layers.9.w")


def test_single_file_checkpoint_without_index(tmp_path):
    root = _model_dir(tmp_path / "m", TENSORS)
    assert not (root / INDEX_NAME).exists()
    ckpt = Checkpoint.open(str(root))
    assert list(ckpt.tensors) == sorted(TENSORS)
    assert ckpt.file_metadata == {root / "model.safetensors": {"format": "pt"}}


def test_side_files_are_the_known_extras_only(tmp_path):
    root = _model_dir(tmp_path / "m", TENSORS, max_shard_bytes=50)
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "notes.txt"):
        (root / name).write_text("x")
    got = [p.name for p in Checkpoint.open(root).side_files()]
    assert got == ["tokenizer.json", "generation_config.json", "chat_template.jinja"]
    assert "config.json" not in SIDE_FILES and INDEX_NAME not in SIDE_FILES


def _index(root: Path) -> dict:
    return json.loads((root / INDEX_NAME).read_text())


def test_index_naming_a_missing_shard(tmp_path):
    root = _model_dir(tmp_path / "m", TENSORS, max_shard_bytes=50)
    (root / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(root)
    message = str(e.value)
    assert "model-00003-of-00004.safetensors" in message and "missing" in message
    assert str(root / INDEX_NAME) in message and "'layers.2.w'" in message


def test_index_naming_a_tensor_absent_from_its_shard(tmp_path):
    root = _model_dir(tmp_path / "m", TENSORS, max_shard_bytes=50)
    index = _index(root)
    index["weight_map"]["layers.0.bias"] = "model-00001-of-00004.safetensors"
    (root / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.0\.bias' in model-00001-of-00004"):
        Checkpoint.open(root)


def test_tensor_stored_in_two_shards(tmp_path):
    root = _model_dir(tmp_path / "m", TENSORS, max_shard_bytes=50)
    # Shard 1 also carries layers.1.w, which the index places in shard 2.
    both = {k: TENSORS[k] for k in ("layers.0.w", "layers.1.w")}
    save_file(both, root / "model-00001-of-00004.safetensors")
    with pytest.raises(CheckpointError, match=r"'layers\.1\.w' is stored twice"):
        Checkpoint.open(root)


def test_duplicate_tensor_across_files_without_index(tmp_path):
    root = _model_dir(tmp_path / "m", TENSORS)
    save_file({"layers.1.w": torch.zeros(2)}, root / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"'layers\.1\.w' is stored twice, in extra"):
        Checkpoint.open(root)


@pytest.mark.parametrize(
    "text,fragment",
    [("{not json", "not valid JSON"), ('{"weight_map": [1]}', "no 'weight_map' object")],
)
def test_malformed_index(tmp_path, text, fragment):
    root = _model_dir(tmp_path / "m", TENSORS, max_shard_bytes=50)
    (root / INDEX_NAME).write_text(text)
    with pytest.raises(CheckpointError, match=fragment):
        Checkpoint.open(root)


def test_corrupt_shard_names_the_shard(tmp_path):
    root = _model_dir(tmp_path / "m", TENSORS, max_shard_bytes=50)
    shard = root / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="model-00002-of-00004.safetensors is truncated"):
        Checkpoint.open(root)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(
        CheckpointError, match=r"holds no \*\.safetensors weights \(found pytorch_model\.bin"
    ):
        Checkpoint.open(tmp_path)


def test_directory_without_config(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="has no config.json"):
        Checkpoint.open(tmp_path)


def test_a_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="model.gguf is not a directory"):
        Checkpoint.open(path)


def test_a_missing_path_that_is_no_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory .*org/name"):
        Checkpoint.open(tmp_path / "nothing" / "here")


# ---------------------------------------------------------------------------------------------
# Hub ids: the local cache only


def _fake_cache(cache: Path, repo: str = "org/tiny") -> Path:
    """A hub cache as huggingface_hub lays it out: models--org--name/{refs/main, snapshots/<hash>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return _model_dir(repo_dir / "snapshots" / commit, TENSORS)


_RESOLVE = """
import sys
from nvq.errors import ConfigError
from nvq.io.hf import Checkpoint
print(Checkpoint.open("org/tiny").path)
try:
    Checkpoint.open("org/absent")
except ConfigError as e:
    print("MISS", e)
"""


@pytest.mark.parametrize("var", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_resolves_offline_through_the_local_cache(tmp_path, var):
    cache = tmp_path / ("hub" if var == "HF_HUB_CACHE" else "home/hub")
    snapshot = _fake_cache(cache)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env[var] = str(cache if var == "HF_HUB_CACHE" else cache.parent)
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _RESOLVE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    found, miss = done.stdout.splitlines()
    assert Path(found).resolve() == snapshot.resolve()
    assert miss.startswith("MISS org/absent is neither a local directory nor in the local")
    assert "never downloads" in miss


def test_hub_cache_miss_is_a_config_error(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache|nor in the local"):
        Checkpoint.open("org/not-cached")


def test_a_local_directory_wins_over_a_hub_id(tmp_path, monkeypatch):
    local = _model_dir(tmp_path / "org" / "tiny", TENSORS)
    monkeypatch.chdir(tmp_path)
    assert Checkpoint.open("org/tiny").path.resolve() == local.resolve()


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ConfigError, match=r"needs huggingface_hub"):
        Checkpoint.open("org/not-here")
