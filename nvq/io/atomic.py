"""Atomic output directories: build everything in a hidden sibling, fsync, rename it last.

A reader of OUT sees either the old contents or the complete new ones, never a half-written
directory; a failure or Ctrl-C leaves OUT as it was and no temporary directory behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nvq.errors import OutputExistsError


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath, name)
            if not file.is_symlink():
                _fsync_path(file)
        _fsync_path(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _check_target(out: Path, force: bool) -> None:
    if out.is_symlink() and not out.exists():
        raise OutputExistsError(f"{out} is a dangling symlink; remove it or choose another path.")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"{out} already exists and is a file, not a directory; remove it or choose another "
            f"output path."
        )
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it.")


@contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success it replaces `out` atomically.

    Refuses (OutputExistsError) when `out` exists, unless `force` and `out` is a directory.
    With `force`, the old directory is moved aside, the new one renamed into place, and only
    then the old one deleted.
    """
    out = Path(out)
    _check_target(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputExistsError(
            f"{out} cannot be created: a file stands where its parent directory should be."
        ) from None
    pid = os.getpid()
    tmp = out.parent / f".{out.name}.nvq-tmp-{pid}"
    _remove(tmp)  # left over by a dead process that had our pid
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        # Checked again: OUT may have appeared while we were writing.
        _check_target(out, force)
        if out.exists():
            old = out.parent / f".{out.name}.nvq-old-{pid}"
            _remove(old)
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            _fsync_path(out.parent)
            _remove(old)
        else:
            os.rename(tmp, out)
        _fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
