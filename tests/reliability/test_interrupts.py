"""Killed runs: OUT is never missing or half-written, and no temporary outlives its process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nvq.errors import OutputExistsError
from nvq.io import atomic
from nvq.io.atomic import atomic_output_dir

REPO = Path(__file__).resolve().parents[2]

# Fills the temporary directory, says so, then waits to be signalled; exits as nvq's CLI would.
WRITER = """
import sys, time
from pathlib import Path
from nvq.io.atomic import atomic_output_dir
try:
    with atomic_output_dir(Path(sys.argv[1]), force=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half" * 1000)
        print("ready", flush=True)
        time.sleep(60)
except KeyboardInterrupt as e:
    sys.exit(getattr(e, "exit_code", 130))
"""


def _entries(parent):
    return sorted(p.name for p in parent.iterdir())


def _writer_killed_with(out: Path, signum: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signum)
    return proc.wait(timeout=30)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped, so the pid names no process (unless reused, which is vanishingly rare)
    return proc.pid


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_catchable_signals_clean_up_and_keep_the_old_output(tmp_path, signum):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    code = _writer_killed_with(out, signum)
    assert code == (130 if signum == signal.SIGINT else 128 + signum)
    assert _entries(tmp_path) == ["model"]
    assert _entries(out) == ["config.json"] and (out / "config.json").read_text() == "old"


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "model"
    assert _writer_killed_with(out, signal.SIGKILL) == -signal.SIGKILL
    assert [n for n in _entries(tmp_path) if ".nvq-tmp-" in n]  # what SIGKILL cannot prevent
    with atomic_output_dir(out) as tmp:
        (tmp / "config.json").write_text("new")
    assert _entries(tmp_path) == ["model"] and _entries(out) == ["config.json"]


def test_a_kill_between_the_two_renames_is_repaired(tmp_path):
    out = tmp_path / "model"
    old = tmp_path / f".model.nvq-old-{_dead_pid()}"  # the old output, moved aside; OUT missing
    old.mkdir()
    (old / "config.json").write_text("old")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_output_dir(out):
            pytest.fail("OUT was restored, so this run must refuse to replace it")
    assert _entries(tmp_path) == ["model"] and (out / "config.json").read_text() == "old"


def test_old_copies_are_deleted_when_the_output_is_present(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("current")
    stale = tmp_path / f".model.nvq-old-{_dead_pid()}"
    stale.mkdir()
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert _entries(tmp_path) == ["model"] and (out / "config.json").read_text() == "new"


def test_temporaries_of_live_processes_and_other_outputs_are_left_alone(tmp_path):
    live = subprocess.Popen(["sleep", "30"])
    try:
        mine = tmp_path / f".model.nvq-tmp-{live.pid}"
        other = tmp_path / f".other.nvq-tmp-{_dead_pid()}"
        mine.mkdir()
        other.mkdir()
        with atomic_output_dir(tmp_path / "model"):
            pass
        assert _entries(tmp_path) == sorted([mine.name, other.name, "model"])
    finally:
        live.kill()
        live.wait()


def test_replace_is_one_atomic_exchange_where_available(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    if not atomic._exchange(a, b):
        pytest.skip("this kernel or filesystem has no renameat2 RENAME_EXCHANGE")
    a.rmdir(), b.rmdir()
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")

    def no_rename(*args):
        raise AssertionError("a two-step rename would leave a moment without OUT")

    monkeypatch.setattr(atomic.os, "rename", no_rename)
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert _entries(tmp_path) == ["model"] and (out / "config.json").read_text() == "new"


def test_replace_without_exchange_still_lands_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert _entries(tmp_path) == ["model"] and (out / "config.json").read_text() == "new"


def test_certificate_leftovers_of_dead_runs_are_tidied(tmp_path):
    from nvq.verify.certificate import write_atomically

    dead = _dead_pid()
    (tmp_path / f".cert.json.nvq-tmp-{dead}").write_text("half")
    (tmp_path / f".cert.md.nvq-old-{dead}").write_text("old markdown")  # cert.md itself missing
    write_atomically({tmp_path / "cert.json": "{}", tmp_path / "cert.xml": "<x/>"})
    assert _entries(tmp_path) == [f".cert.md.nvq-old-{dead}", "cert.json", "cert.xml"]  # not this run's file
    write_atomically({tmp_path / "cert.md": "new"})
    assert _entries(tmp_path) == ["cert.json", "cert.md", "cert.xml"]
    assert (tmp_path / "cert.md").read_text() == "new"
