"""Links out of the source directory are refused; copied side files keep their private modes."""

from __future__ import annotations

import os
import stat

from tests.reliability.conftest import assert_refused, nvq

CONVERT = ("--scheme", "nvfp4", "--device", "cpu")


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_side_file_linked_to_a_secret_is_refused(src, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "hunter2"}')
    secret.chmod(0o600)
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").symlink_to(secret)
    out = tmp_path / "o"
    assert_refused(nvq("convert", src, out, *CONVERT), "tokenizer_config.json", "outside the checkpoint")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.json", "src"]


def test_shard_linked_out_of_the_source_is_refused(src, tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"
    (src / "model.safetensors").rename(elsewhere)
    (src / "model.safetensors").symlink_to(elsewhere)
    assert_refused(nvq("plan", src, "--scheme", "nvfp4"), "model.safetensors", "outside the checkpoint")


def test_config_linked_out_of_the_source_is_refused(src, tmp_path):
    elsewhere = tmp_path / "config.json"
    (src / "config.json").rename(elsewhere)
    (src / "config.json").symlink_to(elsewhere)
    assert_refused(nvq("convert", src, tmp_path / "o", *CONVERT), "config.json", "outside the checkpoint")


def test_links_inside_the_source_are_followed(src, tmp_path):
    (src / "real").mkdir()
    (src / "tokenizer.json").rename(src / "real" / "tokenizer.json")
    (src / "tokenizer.json").symlink_to("real/tokenizer.json")
    out = tmp_path / "o"
    assert nvq("convert", src, out, *CONVERT).exit_code == 0
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (src / "real" / "tokenizer.json").read_bytes()


def test_copied_side_files_never_get_a_wider_mode(src, tmp_path):
    (src / "tokenizer_config.json").chmod(0o600)
    (src / "tokenizer.json").chmod(0o640)
    out = tmp_path / "o"
    assert nvq("convert", src, out, *CONVERT).exit_code == 0
    assert _mode(out / "tokenizer_config.json") & ~0o600 == 0
    assert _mode(out / "tokenizer.json") & ~0o640 == 0
