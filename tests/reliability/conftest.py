"""Helpers for the bad-input corpus: every case runs through the CLI and must end with exit 2,
one line on stderr, no traceback, and nothing written."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from nvq.cli import app

runner = CliRunner()


def refused(*args, out=None, match: str = "", usage: bool = False) -> str:
    """Run `nvq ARGS`; assert exit 2, a single 'error: ...' line naming `match`, no output dir.
    usage=True: the option parser itself refuses (its own 'Invalid value' box, still exit 2)."""
    result = runner.invoke(app, [str(a) for a in args])
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text, text
    if usage:
        assert "Invalid value" in text and match in text, text
        return text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert match in lines[0], text
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "output left behind"
    return lines[0]


@pytest.fixture
def llama_copy(tiny_llama, tmp_path):
    """A writable copy of the session's tiny Llama."""
    return shutil.copytree(tiny_llama, tmp_path / "src")
