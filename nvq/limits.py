"""Bounds on numeric options and on what nvq reads from user files, so a typo or a hostile
value fails in one sentence before any memory or time is spent on it."""

from __future__ import annotations

import math
import stat
from pathlib import Path

from nvq.errors import ConfigError

_INT, _FLOAT = "an integer", "a finite number"
# option → (kind, smallest, largest) accepted value. The caps sit far above any real run: 64 Ki
# calibration windows of 128 Ki tokens, or 1 Mi verify tokens, already cost hours.
OPTION_RANGES: dict[str, tuple[str, float, float]] = {
    "--calib-samples": (_INT, 1, 65536),
    "--calib-seq-len": (_INT, 2, 131072),
    "--tokens": (_INT, 2, 1 << 20),
    "--max-tokens": (_INT, 2, 1 << 20),
    "--sequences": (_INT, 1, 1 << 20),
    "--draws": (_INT, 1, 16),
    "--tp": (_INT, 1, 4096),
    "--factor": (_FLOAT, 1.0, 1e6),
    "--damp": (_FLOAT, 0.0, 1e3),
    "--max-shard-gb": (_FLOAT, 0.001, 1e6),
}

# A prompt file is text read whole into memory; 16 MiB is thousands of times any prompt.
MAX_PROMPT_FILE_BYTES = 16 << 20
# A calibration corpus is tokenized whole; 256 MiB is far more text than 64 Ki windows use.
MAX_CALIB_FILE_BYTES = 256 << 20


def parse_int(text: str) -> int | str:
    """The CLI's parser for integer options. It never fails, so that check_option (run with the
    other checks) refuses 'nan' or '1e9' in one sentence, as typed, instead of a usage box."""
    try:
        return int(text)
    except ValueError:
        return text


def parse_float(text: str) -> float | str:
    """The CLI's parser for real-valued options; see parse_int."""
    try:
        return float(text)
    except ValueError:
        return text


def check_option(flag: str, value: float | str | None) -> None:
    """Refuse a value outside OPTION_RANGES[flag], not finite, or not of its kind; None means
    'not given'."""
    if value is None:
        return
    kind, low, high = OPTION_RANGES[flag]
    number = isinstance(value, int if kind is _INT else (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{flag} {value}: must be {kind} from {low:g} to {high:g}.")


def check_options(values: dict[str, float | str | None]) -> None:
    """check_option for every {flag: value} (--group-size has its own rule)."""
    for flag, value in values.items():
        if flag == "--group-size":
            check_group_size(value)
        else:
            check_option(flag, value)


def check_group_size(value: int | str | None) -> None:
    """GPTQ groups: a positive size, or -1 for one group per row. 0 used to mean 'default'."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or (value != -1 and not 0 < value <= 1 << 20)):
        raise ConfigError(f"--group-size {value}: must be a positive group size (e.g. 128, 64, 32) "
                          "or -1 for one group per row.")


def read_text_file(path: str | Path, flag: str, max_bytes: int = MAX_PROMPT_FILE_BYTES) -> str:
    """A regular UTF-8 file of at most max_bytes; devices and pipes (/dev/zero) never end."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"{flag} {path} cannot be read as UTF-8 text ({e.strerror or e}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{flag} {path} is not a regular file; give a text file.")
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ConfigError(f"{flag} {path} cannot be read as UTF-8 text ({e.strerror or e}).") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{flag} {path} is larger than {max_bytes >> 20} MiB; give a shorter text.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path} is not UTF-8 text.") from None
