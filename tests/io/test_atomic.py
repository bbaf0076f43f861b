import os

import pytest
import torch

from nvq.errors import OutputExistsError
from nvq.io.atomic import atomic_output_dir
from nvq.io.safetensors import OutputTensor, ShardedWriter, read_header


def _entries(parent):
    return sorted(p.name for p in parent.iterdir())


def test_success_renames_the_temporary_sibling_into_place(tmp_path):
    out = tmp_path / "model"
    with atomic_output_dir(out, force=False) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name == f".model.nvq-tmp-{os.getpid()}"
        assert not out.exists()
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"
    assert _entries(tmp_path) == ["model"]


def test_sharded_writer_output_lands_complete(tmp_path):
    out = tmp_path / "q"
    with atomic_output_dir(out, force=False) as tmp:
        with ShardedWriter(tmp, [OutputTensor("w", "F32", (2, 2))], 1 << 20) as w:
            w.write("w", torch.ones(2, 2))
    infos, meta = read_header(out / "model.safetensors")
    assert list(infos) == ["w"] and meta == {"format": "pt"}


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_exception_inside_leaves_nothing_behind(tmp_path, exc):
    out = tmp_path / "model"
    with pytest.raises(exc):
        with atomic_output_dir(out, force=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise exc("stop")
    assert _entries(tmp_path) == []


def test_a_failing_writer_inside_leaves_nothing_behind(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="'w' got 0 of its 16 bytes"):
        with atomic_output_dir(out, force=False) as tmp:
            ShardedWriter(tmp, [OutputTensor("w", "F32", (4,))], 1 << 20).close()
    assert _entries(tmp_path) == []


def test_existing_output_is_refused_without_force_and_left_untouched(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError) as e:
        with atomic_output_dir(out, force=False):
            pytest.fail("the body must not run")
    assert str(e.value) == f"{out} already exists; pass --force to replace it."
    assert (out / "keep.txt").read_text() == "old"
    assert _entries(tmp_path) == ["model"]


def test_force_replaces_the_old_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "model.safetensors").exists()  # the old output stays readable until the end
    assert _entries(out) == ["new.txt"]
    assert _entries(tmp_path) == ["model"]


def test_force_with_a_failure_keeps_the_old_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(ValueError):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError("bad tensor")
    assert _entries(out) == ["config.json"]
    assert _entries(tmp_path) == ["model"]


@pytest.mark.parametrize("force", [False, True])
def test_an_existing_file_is_refused_even_with_force(tmp_path, force):
    out = tmp_path / "model"
    out.write_text("a file")
    with pytest.raises(OutputExistsError, match="is a file, not a directory"):
        with atomic_output_dir(out, force=force):
            pass
    assert out.read_text() == "a file"


def test_output_appearing_during_the_write_is_not_clobbered(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_output_dir(out, force=False) as tmp:
            (tmp / "new.txt").write_text("new")
            out.mkdir()  # someone else made it meanwhile (an empty dir would be replaced by rename)
    assert _entries(tmp_path) == ["model"]
    assert _entries(out) == []


def test_missing_parents_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "model"
    with atomic_output_dir(out, force=False) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"


def test_a_stale_temporary_directory_is_replaced(tmp_path):
    out = tmp_path / "model"
    stale = tmp_path / f".model.nvq-tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "leftover").write_text("x")
    with atomic_output_dir(out, force=False) as tmp:
        assert _entries(tmp) == []
    assert _entries(out) == []
    assert _entries(tmp_path) == ["model"]
