"""Atomic output directories: build everything in a hidden sibling, fsync, swap it in last.

A reader of OUT sees either the old contents or the complete new ones, never a half-written
directory. A failure, Ctrl-C, SIGTERM or SIGHUP leaves OUT as it was and no temporary behind;
after a SIGKILL (or power loss) the next run for the same OUT removes or restores what the dead
process left: `.OUT.nvq-tmp-PID` is deleted, `.OUT.nvq-old-PID` is put back when OUT is missing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nvq.errors import OutputExistsError, OutputWriteError
from nvq.io import output_guard

_SIBLING = re.compile(r"\.(?P<name>.+)\.nvq-(?P<kind>tmp|old)-(?P<pid>\d+)")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
# Errors that mean "this kernel or filesystem has no atomic exchange": fall back to two renames.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_CLEANUP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so every cleanup path runs; exits 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.exit_code = 128 + signum


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


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a sibling with our pid was left by a dead process that had it before
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(out: Path) -> None:
    """Tidy what dead runs for `out` left: restore `.OUT.nvq-old-PID` when OUT is missing (a kill
    between the two renames of a replace), delete every other temporary and old sibling."""
    if not out.parent.is_dir():
        return
    found = [(m, p) for p in out.parent.iterdir() if (m := _SIBLING.fullmatch(p.name))]
    for m, p in sorted(found, key=lambda mp: mp[0]["kind"] != "old"):  # restore before deleting
        if m["name"] != out.name or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not out.exists() and not out.is_symlink():
            os.rename(p, out)
        else:
            _remove(p)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where that is unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace(tmp: Path, out: Path) -> None:
    """Put `tmp` at `out`, where `out` is an existing directory; OUT is never missing when the
    exchange is available, and otherwise only between two renames that recover_stale repairs."""
    if _exchange(tmp, out):
        _fsync_path(out.parent)
        _remove(tmp)  # now the old contents
        return
    old = out.parent / f".{out.name}.nvq-old-{os.getpid()}"
    _remove(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _fsync_path(out.parent)
    _remove(old)


def _check_target(out: Path, force: bool, replace_any: bool) -> None:
    if out.is_symlink():
        raise OutputExistsError(f"{out} is a symlink; nvq does not write through links, choose another path.")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"{out} already exists and is a file, not a directory; remove it or choose another "
            f"output path."
        )
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it.")
    if out.exists() and not replace_any:
        output_guard.refuse_foreign_replace(out)


def _missing_ancestors(path: Path) -> list[Path]:
    """`path`'s ancestors that do not exist yet, deepest first, to remove again on failure."""
    missing = []
    for p in path.parents:
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def _unwind_parents(made: list[Path]) -> None:
    for p in made:
        try:
            p.rmdir()
        except OSError:
            break  # not empty: someone else put something there


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM/SIGHUP raise Terminated so cleanup runs as for Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in _CLEANUP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _write_error(out: Path, e: OSError) -> OutputWriteError:
    where = f" ({e.filename})" if e.filename else ""
    return OutputWriteError(f"{out} could not be written: {e.strerror or e}{where}; nothing was left behind.")


@contextmanager
def atomic_output_dir(
    out: str | Path, force: bool = False, *, replace_any: bool = False, inputs: list[Path] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success it replaces `out` atomically.

    Refuses (OutputExistsError) an `out` that is '.', '..', a file, a link, equal to / holding /
    inside one of `inputs`, or that exists without `force`; with `force`, one that does not look
    like an nvq output unless `replace_any`. OSErrors (disk full, read-only) become one sentence.
    """
    out = Path(out)
    output_guard.refuse_dot_names(out)
    output_guard.refuse_overlap(out, list(inputs))
    with signals_as_interrupts():
        made = _missing_ancestors(out)
        try:
            recover_stale(out)
            _check_target(out, force, replace_any)
            out.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            _unwind_parents(made)
            raise OutputExistsError(
                f"{out} cannot be created: a file stands where its parent directory should be."
            ) from None
        except OSError as e:
            _unwind_parents(made)
            raise _write_error(out, e) from None
        except BaseException:
            _unwind_parents(made)
            raise
        tmp = out.parent / f".{out.name}.nvq-tmp-{os.getpid()}"
        try:
            _remove(tmp)
            tmp.mkdir()
            yield tmp
            _fsync_tree(tmp)
            # Checked again: OUT may have appeared while we were writing.
            _check_target(out, force, replace_any)
            if out.exists():
                _replace(tmp, out)
            else:
                os.rename(tmp, out)
            _fsync_path(out.parent)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            _unwind_parents(made)
            if isinstance(e, OSError):
                raise _write_error(out, e) from None
            raise
