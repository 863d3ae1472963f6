"""Reading a study file's tables: a TOML table in, typed values out, each error naming the file, the field and
the fix; a key nobody asked for is refused. Also the checks on a file a field names.
"""

from __future__ import annotations

import errno
import math
import os
import stat
from pathlib import Path
from typing import Any

from hpo.errors import SpecError, closest, did_you_mean


def why_not_a_file(path: Path) -> str | None:
    """Why an existing name cannot be read as a regular file (a dangling symbolic link or a
    loop of them, a FIFO, a socket, a device); None when it is a file, a directory, or
    nothing at all (the caller names those)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that loops (it leads back to itself)"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device")
    # Reading a FIFO would wait for a writer for ever.
    return f"is {kind}, not a regular file"


def read_text_file(path: Path, source: str, field: str, what: str) -> str:
    """A UTF-8 text file's content (TOML and our CSV reading need UTF-8, without a BOM).

    Raises:
        SpecError: `path` is a directory, unreadable, binary, not UTF-8 or starts with a
            byte-order mark; naming `source` and `field`.
    """
    if path.is_dir():
        raise SpecError(source, field, f"{path} is a directory, not a {what}; give the path of the file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(source, field, f"cannot read {path}: {e.strerror}; fix the path or its permissions") from e
    if data.startswith(b"\xef\xbb\xbf"):
        raise SpecError(source, field, f"{path} starts with a byte-order mark (BOM); save it as UTF-8 without BOM")
    if b"\0" in data:
        raise SpecError(source, field, f"{path} is a binary file, not a {what}; give the path of a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(source, field, f"{path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                                       "save it as UTF-8") from e


def hook_sha256(t: "Table", key: str, ref: str, base_dir: Path | None) -> str | None:
    # A spec read back from a study carries the hash it was created with (checked when a
    # worker loads the code); a study file gets the hash of the code found now.
    from hpo.specs.hooks import code_hash

    sha = t.str(f"{key}_sha256", default=None)
    return code_hash(ref, base_dir, t.source, f"{t.prefix}{key}") if sha is None else sha


class Table:
    """One TOML table being read: typed getters that name the field on error, and a
    `finish` that rejects keys nobody asked for."""

    def __init__(self, raw: Any, source: str, prefix: str) -> None:
        if not isinstance(raw, dict):
            raise SpecError(source, prefix.rstrip("."), f"expected a table, got {raw!r}")
        self.raw = dict(raw)
        self.source = source
        self.prefix = prefix
        self._seen: list[str] = []

    def get(self, key: str, default: Any, listed: bool = True) -> Any:
        """The key's value (popped: `finish` refuses what is left); not `listed` among the
        keys an unknown one is told of (what hpo writes itself, not the user)."""
        if listed:
            self._seen.append(key)
        return self.raw.pop(key, default)

    def table(self, key: str) -> "Table":
        return Table(self.get(key, {}), self.source, f"{self.prefix}{key}.")

    def _fail(self, key: str, message: str) -> SpecError:
        return SpecError(self.source, f"{self.prefix}{key}", message)

    def str(self, key: str, default: Any = None, required: bool = False, listed: bool = True) -> Any:
        if required and key not in self.raw:
            near = closest(key, [k for k in self.raw if isinstance(k, str)])
            typo = f" ({near!r} is not a key here: a misspelling of {key}?)" if near else ""
            raise self._fail(key, f"is missing{typo}; add {key} = \"...\"")
        v = self.get(key, default, listed)
        if v is not None and not isinstance(v, str):
            raise self._fail(key, f"expected a string, got {v!r}; put it in quotes")
        return v

    def int(self, key: str, default: int, low: int, high: int, expected: str = "a whole number") -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._fail(key, f"expected {expected}, got {v!r}")
        if not low <= v <= high:
            raise self._fail(key, f"{v} is outside {low}..{high}; choose a value in that range")
        return v

    def float(self, key: str, default: float, low: float, high: float) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._fail(key, f"expected a number, got {v!r}")
        if not low <= v <= high:
            raise self._fail(key, f"{v} is outside {low}..{high}; choose a value in that range")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self._fail(key, f"expected true or false, got {v!r}")
        return v

    def choice(self, key: str, value: Any, allowed: tuple) -> bool:
        if value not in allowed:
            raise self._fail(key, f"{value!r} is not one of {', '.join(map(repr, allowed))}"
                                  f"{did_you_mean(str(value), [str(a) for a in allowed])}")
        return True

    def finish(self) -> None:
        for key in self.raw:
            known = self._seen
            raise self._fail(key, f"unknown key{did_you_mean(key, known)}; "
                                  f"known keys here: {', '.join(known) or 'none'}")


def display_path(path: Path) -> str:
    # The file as read from here: relative below the working directory, else absolute
    # (a shipped study run from another folder is not at studies/NAME.toml there).
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())
