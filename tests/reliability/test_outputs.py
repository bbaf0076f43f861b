"""--force never destroys an input or someone's folder; certificates never overwrite what they certify."""

from __future__ import annotations

import pytest

from tests.reliability.conftest import assert_refused, nvq, tree

CONVERT = ("--scheme", "nvfp4", "--device", "cpu")


@pytest.mark.parametrize("flag", ["--force", "--force-replace-any"])
def test_force_onto_the_source_is_refused(src, flag):
    before = tree(src)
    assert_refused(nvq("convert", src, src, *CONVERT, flag), "is the input", str(src))
    assert tree(src) == before


@pytest.mark.parametrize("flag", ["--force", "--force-replace-any"])
def test_force_onto_a_folder_holding_the_source_is_refused(src, tmp_path, flag):
    (tmp_path / "notes.txt").write_text("unrelated")
    before = tree(tmp_path)
    assert_refused(nvq("convert", src, tmp_path, *CONVERT, flag), "contains the input")
    assert tree(tmp_path) == before


def test_output_inside_the_source_is_refused(src):
    before = tree(src)
    assert_refused(nvq("convert", src, src / "nvfp4", *CONVERT, "--force"), "is inside the input")
    assert tree(src) == before


def test_force_onto_a_link_to_the_source_is_refused(src, tmp_path):
    link = tmp_path / "alias"
    link.symlink_to(src)
    before = tree(src)
    assert_refused(nvq("convert", src, link, *CONVERT, "--force"), "is the input")
    assert tree(src) == before


def test_force_refuses_a_folder_that_is_not_an_nvq_output(src, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg")
    assert_refused(nvq("convert", src, out, *CONVERT, "--force"), "holiday.jpg", "--force-replace-any")
    assert (out / "holiday.jpg").read_bytes() == b"jpeg"
    result = nvq("convert", src, out, *CONVERT, "--force-replace-any")
    assert result.exit_code == 0, result.output
    assert not (out / "holiday.jpg").exists() and (out / "config.json").is_file()


def test_force_refuses_a_folder_with_subfolders(src, tmp_path):
    out = tmp_path / "o"
    (out / "runs").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    assert_refused(nvq("convert", src, out, *CONVERT, "--force"), "'runs'")
    assert (out / "runs").is_dir()


def test_force_replaces_an_earlier_output(src, tmp_path):
    out = tmp_path / "o"
    assert nvq("convert", src, out, *CONVERT).exit_code == 0
    result = nvq("convert", src, out, "--scheme", "mxfp4", "--device", "cpu", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "src"]


@pytest.mark.parametrize("flag", ["--force", "--force-replace-any"])
def test_gguf_convert_onto_the_folder_holding_the_gguf_is_refused(small_gguf, flag):
    before = tree(small_gguf.parent)
    assert_refused(nvq("convert", small_gguf, small_gguf.parent, "--scheme", "bf16", flag), "contains the input")
    assert tree(small_gguf.parent) == before


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_outputs_are_refused(src, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert_refused(nvq("convert", src, name, *CONVERT, "--force-replace-any"), "directory name of its own")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--junit"])
def test_certificate_onto_the_oracle_is_refused(small_gguf, src, flag):
    before = small_gguf.read_bytes()
    assert_refused(nvq("verify", src, "--oracle", small_gguf, flag, small_gguf), f"{flag} ", "is the input")
    assert small_gguf.read_bytes() == before


def test_certificate_inside_the_candidate_is_refused(small_gguf, src):
    before = tree(src)
    assert_refused(nvq("verify", src, "--oracle", small_gguf, "--json", src / "config.json"), "is inside the input")
    assert tree(src) == before
